"""The run directory: config, partitions, metrics.csv, clients.csv, summary, checkpoints, logs.

Every file is written to a temporary name and renamed, except the two CSVs, which
are appended a row at a time and flushed, so a reader (the dashboard, ``tail -f``)
sees each round as soon as it ends and a crash loses at most the round in flight.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, cast

import torch

from medbloom.config import ExperimentConfig
from medbloom.errors import ConfigError, MedbloomError, RecordWriteError

log = logging.getLogger("medbloom")

METRICS_COLUMNS = (
    "round",
    "loss",
    "accuracy",
    "auc",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "clean_accuracy",
    "clean_auc",
    "clean_balanced_accuracy",
    "clean_f1",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_auc",
    "worst_site_accuracy",
    "median_site_accuracy",
    "site_accuracy_spread",
    "personal_mean_accuracy",
    "personal_median_accuracy",
    "personal_worst_accuracy",
    "personal_mean_balanced_accuracy",
    "personal_worst_balanced_accuracy",
    "small_sites",
    "epsilon",
    "clients_ok",
    "clients_failed",
    "round_seconds",
    "eval_seconds",
    "elapsed_seconds",
)
CLIENT_COLUMNS = (
    "round",
    "client_id",
    "node_id",
    "status",
    "num_examples",
    "site_accuracy",
    "site_auc",
    "site_loss",
    "site_balanced_accuracy",
    "personal_accuracy",
    "personal_auc",
    "personal_balanced_accuracy",
    "personal_loss",
    "val_size",
    "train_loss",
    "train_accuracy",
    "lr",
    "local_val_accuracy",
    "epsilon",
    "seconds",
    "upload_bytes",
    "error",
)
PACKAGES = (
    "medbloom",
    "flwr",
    "flwr-datasets",
    "torch",
    "numpy",
    "scikit-learn",
    "medmnist",
    "ray",
)


def default_run_dir(cfg: ExperimentConfig, root: str | os.PathLike[str] = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{cfg.dataset}-{cfg.strategy}"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never a half file.
    A failure to write (a full disk) is a :class:`RecordWriteError` naming ``path``."""
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` via a temporary file and a rename: a crash mid-write leaves the
    previous checkpoint whole. Saved through a Python file object, so that a full
    disk surfaces as the OSError behind torch's own error.

    NumPy arrays become tensors and NumPy scalars Python numbers, so that the file
    holds only what ``torch.load(weights_only=True)`` reads (:func:`load_checkpoint`).
    """
    plain = _plain(obj)
    _atomic_write(path, lambda fh: torch.save(plain, fh))


def _plain(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = RecordWriteError.of(path, exc) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise


def jsonable(x: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def check_writable(path: Path) -> None:
    """Fail early, before any work, if the run directory cannot be created here."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file, expected a folder for the run (new or empty)")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--out {path}: already exists and is not an empty directory")
    parent = path.parent
    probe_root = parent
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir() or not os.access(probe_root, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: cannot create it, {probe_root} is not writable")


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """Fail early if ``path`` cannot be a folder of outputs that may be overwritten
    (a regular file there, or nowhere writable to create it)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, expected a folder")
    probe_root = path
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir() or not os.access(probe_root, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write there, {probe_root} is not writable")


def create_run_dir(path: Path, files: Mapping[str, Any]) -> Path:
    """Create the run directory with its first JSON files in one step.

    The files are written into a hidden sibling that is renamed into place, so a
    failure here leaves no half-made run directory behind.
    """
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create it: {exc.strerror}") from None
    try:
        (staging / "checkpoints").mkdir()
        (staging / "logs").mkdir()
        for name, data in files.items():
            atomic_write_json(staging / name, data)
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


class RunRecorder:
    """Appends per-round rows and keeps summary.json and checkpoints current."""

    def __init__(
        self,
        path: Path,
        cfg: ExperimentConfig,
        spec_summary: Mapping[str, Any],
        resume_round: int | None = None,
    ) -> None:
        """Open a run directory for recording.

        With ``resume_round`` the records are cut back to that round (rows of a
        round that was in flight when the run died are dropped, so it is recorded
        once, when it is run again) and the best row is read back.
        """
        self.path = path
        self.cfg = cfg
        self.spec_summary = dict(spec_summary)
        self.started = time.time()
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.rows = 0
        self.intervals: dict[str, Any] | None = None  # bootstrap CIs, set when the run ends
        self.calibration: dict[str, Any] | None = None  # temperature scaling, at the end
        if resume_round is not None:
            rows = truncate_records(path, resume_round)
            self.rows = len(rows)
            self.last = rows[-1] if rows else None
            scored = [r for r in rows if r.get("val_auc") is not None]
            self.best = max(scored, key=lambda r: r["val_auc"], default=None)
        # each hospital's privacy spent so far (--privacy sample), as it last reported
        self.spent: dict[str, float] = {}
        if resume_round is not None:
            self._note_spent(read_metrics(path, "clients.csv"))
        eps = (self.last or {}).get("epsilon")
        if cfg.privacy == "hospital" and isinstance(eps, int | float) and math.isfinite(eps):
            self.spent["server"] = float(eps)
        self._metrics = self._open_csv("metrics.csv", METRICS_COLUMNS)
        self._clients = self._open_csv("clients.csv", CLIENT_COLUMNS)
        self.write_summary("running")

    def _note_spent(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            eps, client = row.get("epsilon"), row.get("client_id")
            if isinstance(eps, int | float) and math.isfinite(eps) and client not in ("", None):
                self.spent[str(client)] = float(eps)

    def note_server_epsilon(self, epsilon: float) -> None:
        """Hospital-level DP: what the server's accountant has spent so far."""
        self.spent["server"] = float(epsilon)

    def epsilon(self) -> float:
        """The largest privacy spent by any hospital so far; NaN without privacy."""
        if self.cfg.privacy == "none":
            return float("nan")
        return max(self.spent.values(), default=0.0)

    def privacy_summary(self) -> dict[str, Any]:
        """summary.json's ``privacy``: the guarantee, with its unit and delta, and whether
        the server saw only the sum of the updates (``secure_aggregation``)."""
        out = self._dp_summary()
        if self.cfg.secure_aggregation == "on":
            out["secure_aggregation"] = {
                "protocol": "SecAgg+ (Flower's secaggplus_mod at each hospital)",
                "threshold": self.cfg.secure_threshold(),
            }
        return out

    def _dp_summary(self) -> dict[str, Any]:
        if self.cfg.privacy == "none":
            return {"mode": "none", "guarantee": "no formal privacy guarantee"}
        from medbloom.privacy import ACCOUNTANT, HOSPITAL_ACCOUNTANT

        if self.cfg.privacy == "hospital":
            return {
                "mode": "hospital",
                "unit": "hospital (all of one hospital's data; clipping and noise at the server)",
                "epsilon": self.spent.get("server"),
                "delta": self.cfg.delta,
                "target_epsilon": self.cfg.target_epsilon,
                "clip_norm": self.cfg.clip_norm,
                "accountant": HOSPITAL_ACCOUNTANT,
            }

        return {
            "mode": self.cfg.privacy,
            "unit": "image (record-level DP-SGD at each hospital)",
            "epsilon": max(self.spent.values()) if self.spent else None,
            "delta": self.cfg.delta,
            "target_epsilon": self.cfg.target_epsilon,
            "clip_norm": self.cfg.clip_norm,
            "accountant": ACCOUNTANT,
            "per_hospital": dict(sorted(self.spent.items(), key=lambda kv: int(kv[0]))),
        }

    def _open_csv(self, name: str, columns: tuple[str, ...]) -> tuple[Any, csv.DictWriter[str]]:
        file = self.path / name
        new = not file.exists()
        if not new:
            # a resumed run keeps the columns its file has (a run begun by an older
            # medbloom may lack newer ones): rows must line up with the header
            with file.open(newline="", encoding="utf-8") as existing:
                header = next(csv.reader(existing), None)
            columns = tuple(header) if header else columns
            new = header is None
        fh = file.open("a", newline="", encoding="utf-8")
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
            fh.flush()
        return fh, writer

    @staticmethod
    def _append(target: tuple[Any, csv.DictWriter[str]], row: Mapping[str, Any]) -> None:
        fh, writer = target
        try:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise RecordWriteError(f"cannot write {fh.name}: {exc.strerror or exc}") from exc

    def record_clients(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self._append(self._clients, row)
        self._note_spent(rows)

    def record_round(
        self,
        row: Mapping[str, Any],
        state: Mapping[str, torch.Tensor],
        per_class: Mapping[str, Any] | None = None,
        resume_state: Mapping[str, Any] | None = None,
    ) -> bool:
        """Append one metrics row (and the test split's per-class report to
        ``per_class.jsonl``) and refresh checkpoints; return True if it is the new best.

        The rows are written before ``latest.pt``: if the run dies in between, a
        resumed run repeats that round and drops its rows first. ``resume_state``
        (strategy state, random state, ...) goes into ``latest.pt`` only.

        The best model is the one with the highest validation AUC (ties: the earlier
        round), as the MedMNIST benchmark selects models on its validation split.
        """
        row = dict(row)
        if per_class:
            with (self.path / "per_class.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(
                    json.dumps(jsonable({"round": row["round"], "split": "test", **per_class}))
                )
                fh.write("\n")
        self._append(self._metrics, row)
        self.rows += 1
        self.last = row
        ckpt = {
            "round": row["round"],
            "model": dict(state),
            "metrics": row,
            "config": self.cfg.to_run_config(),
        }
        atomic_torch_save(self.path / "checkpoints" / "latest.pt", {**ckpt, **(resume_state or {})})
        score = row.get("val_auc")
        is_best = (
            score is not None
            and math.isfinite(score)
            and (self.best is None or score > self.best["val_auc"])
        )
        if is_best:
            self.best = row
            atomic_torch_save(self.path / "checkpoints" / "best.pt", ckpt)
        self.write_summary("running")
        return is_best

    def write_summary(self, status: str, error: str | None = None) -> None:
        summary: dict[str, Any] = {
            "status": status,
            "dataset": self.cfg.dataset,
            "strategy": self.cfg.strategy,
            "model": self.cfg.model,
            "num_clients": self.cfg.num_clients,
            "rounds_planned": self.cfg.rounds,
            "rounds_completed": int(self.last["round"]) if self.last else None,
            "started_at": datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "updated_at": datetime.now().isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - self.started, 3),
            "final": self.last,
            "best": self.best,
            "best_by": "val_auc",
            "privacy": self.privacy_summary(),
            **self.spec_summary,
        }
        if self.intervals:
            summary["intervals"] = self.intervals
        if self.calibration:
            summary["calibration"] = self.calibration
        if error:
            summary["error"] = error
        atomic_write_json(self.path / "summary.json", summary)

    def close(self, status: str, error: str | None = None) -> None:
        """The final summary, then the files closed. With ``error`` (the run failed),
        a summary that cannot be written either (the disk that failed the run is
        still full) is logged, not raised over the error that ended the run."""
        try:
            self.write_summary(status, error)
        except RecordWriteError as exc:
            if not error:
                raise
            log.error("could not mark the run %s in summary.json: %s", status, exc)
        finally:
            for fh, _ in (self._metrics, self._clients):
                with contextlib.suppress(OSError):
                    fh.close()


def mark_summary(run_dir: Path, status: str, error: str) -> None:
    """Record how a run ended when its own process could not (it was killed, or its
    server went away): ``summary.json`` keeps what it holds and gets ``status`` and
    ``error``. A finished run is left as it is."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict) or summary.get("status") == "finished":
        return
    summary.update(
        status=status, error=error, updated_at=datetime.now().isoformat(timespec="seconds")
    )
    atomic_write_json(path, summary)


class UnsafeCheckpoint(MedbloomError):
    """A checkpoint that holds more than tensors and plain data: loading it could run
    code, so it is refused."""


def load_checkpoint(path: Path, keys: tuple[str, ...] = ("model", "round")) -> dict[str, Any]:
    """A checkpoint (``latest.pt``, ``best.pt``) read with ``weights_only=True``:
    tensors, numbers, strings, lists and dicts, never a pickled object, so a planted
    file cannot run code. A one-line :class:`MedbloomError` names what is wrong:
    missing, unreadable (truncated, garbage), or holding other objects
    (:class:`UnsafeCheckpoint`, also for checkpoints of earlier medbloom versions,
    which pickled the strategy). ``keys``: what the file must hold (a hospital's
    personal model file holds ``run`` and ``entries``)."""
    if not path.is_file():
        raise MedbloomError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of garbage before it refuses it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # a class or function to import: what a planted payload needs (anything else
        # the weights-only unpickler refuses is damage, such as an unknown opcode)
        text = str(exc).lower()
        if "unsupported global" in text or "unsupported class" in text:
            raise UnsafeCheckpoint(
                f"{path} holds Python objects besides tensors and plain data, and loading "
                "it could run code: refused (medbloom writes only tensors, numbers and "
                "strings; do not load a checkpoint you did not make)"
            ) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError... on damage
        raise _unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or not set(keys) <= set(ckpt):
        raise MedbloomError(f"{path} is not a medbloom checkpoint (no {' and '.join(keys)})")
    if "strategy" in ckpt:
        raise UnsafeCheckpoint(
            f"{path} carries a pickled strategy (written by an earlier medbloom), which "
            "would run code when loaded: refused; its model weights are under 'model'"
        )
    return cast(dict[str, Any], ckpt)


def _unreadable(path: Path, exc: BaseException) -> MedbloomError:
    detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return MedbloomError(
        f"{path} is unreadable ({type(exc).__name__}"
        + (f": {detail}" if detail else "")
        + "): truncated or not a checkpoint"
    )


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``checkpoints/latest.pt`` of a run to resume (see :func:`load_checkpoint`), or a
    one-line :class:`MedbloomError` when it is missing, unreadable, unsafe or not a
    resume checkpoint.

    Checkpoints are written to a temporary file and renamed, so a crash while writing
    leaves the previous one whole; a broken file was damaged afterwards.
    """
    path = run_dir / "checkpoints" / "latest.pt"
    if not path.exists():
        raise MedbloomError(f"--resume {run_dir}: no checkpoints/latest.pt, nothing to resume")
    try:
        ckpt = load_checkpoint(path)
    except MedbloomError as exc:
        raise type(exc)(f"--resume {run_dir}: {exc}; the run cannot go on from it") from None
    if "strategy_state" not in ckpt:
        raise MedbloomError(f"--resume {run_dir}: {path} has no resume state")
    return ckpt


def _parse(value: str) -> Any:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def read_metrics(path: Path, name: str = "metrics.csv") -> list[dict[str, Any]]:
    """The complete rows of a run's metrics.csv (or another of its CSV records, such as
    clients.csv), numbers parsed, empty cells as None."""
    file = path / name
    if not file.exists():
        return []
    with file.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: _parse(v) for k, v in r.items()} for r in rows if None not in r.values()]


def truncate_records(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Drop every row of rounds after ``last_round`` from the run's CSV and JSONL
    records; return the metrics rows kept."""
    for name in ("metrics.csv", "clients.csv"):
        file = path / name
        if not file.exists():
            continue
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = lines[:1] + [
            # Only whole lines: a line cut by a crash has no newline yet.
            ln
            for ln in lines[1:]
            if ln.endswith("\n") and int(ln.split(",", 1)[0]) <= last_round
        ]
        atomic_write_text(file, "".join(kept))
    per_class = path / "per_class.jsonl"
    if per_class.exists():
        kept = [
            ln
            for ln in per_class.read_text(encoding="utf-8").splitlines(keepends=True)
            if ln.endswith("\n") and json.loads(ln)["round"] <= last_round
        ]
        atomic_write_text(per_class, "".join(kept))
    return read_metrics(path)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        # repr is the shortest text that reads back as the same float: no rounding.
        return "" if math.isnan(v) else repr(v)
    return v


def attach_log_file(path: Path, level: int = logging.INFO) -> logging.Handler:
    """Send Flower's and medbloom's log records to a file as well."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("flwr", "medbloom"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    for name in ("flwr", "medbloom"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def run_info(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """The content of config.json: enough to reproduce the run."""
    return {
        "config": cfg.to_run_config(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "command": argv if argv is not None else sys.argv,
        "created_at": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
    }
