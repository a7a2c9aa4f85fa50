"""Read run directories for the dashboard and the report: plain Python, read-only.

A run directory is written by :mod:`medbloom.runs` while the run goes on: the CSVs
grow a row at a time, ``summary.json`` is replaced after every round, and a run that
crashed or is still starting may lack any of its files. Everything here therefore
reads defensively: a missing, empty, half-written or corrupt file becomes an empty
value plus a sentence in :attr:`RunData.notes`, never an exception. This module
imports neither torch nor Flower, so the dashboard starts fast and never touches a
running experiment's state.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

#: What ``summary.json`` may say, plus the two states a reader infers:
#: ``starting`` (created, no summary yet) and ``unknown`` (summary unreadable).
STATUSES = ("running", "finished", "failed", "interrupted", "starting", "unknown")
#: States in which files may still change: the dashboard keeps refreshing these.
LIVE_STATUSES = ("running", "starting")
#: Any of these marks a folder as a run directory.
MARKER_FILES = ("config.json", "summary.json", "metrics.csv")
#: A live run whose files have not changed for this long is flagged as possibly dead.
STALE_AFTER_SECONDS = 900.0
#: The tail of ``logs/server.log`` that :func:`log_tail` returns, at most.
LOG_TAIL_BYTES = 64_000

Row = dict[str, Any]


@dataclass(frozen=True)
class ClientShare:
    """One hospital's share of the training set, from ``partitions.json``."""

    client_id: int
    num_train: int
    num_val: int
    label_counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.num_train + self.num_val


@dataclass(frozen=True)
class RunInfo:
    """What the run picker shows: cheap to read (summary.json and config.json only)."""

    path: Path
    status: str
    dataset: str | None
    strategy: str | None
    model: str | None
    num_clients: int | None
    rounds_planned: int | None
    rounds_completed: int | None
    created: float

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """One line for a picker: name, data set, strategy, clients, status."""
        parts = [self.name]
        if self.dataset:
            parts.append(self.dataset)
        if self.strategy:
            parts.append(self.strategy)
        if self.num_clients is not None:
            parts.append(f"{self.num_clients} clients")
        parts.append(self.status)
        return " · ".join(parts)


@dataclass
class RunData:
    """Everything one run directory holds that the dashboard and report show."""

    path: Path
    status: str
    summary: Row = field(default_factory=dict)
    info: Row = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    partitions: list[ClientShare] = field(default_factory=list)
    metrics: list[Row] = field(default_factory=list)
    clients: list[Row] = field(default_factory=list)
    per_class: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_modified: float = 0.0

    # ------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Row:
        """The resolved experiment settings (``config.json`` → ``config``)."""
        cfg = self.info.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def _setting(self, summary_key: str, config_key: str) -> Any:
        value = self.summary.get(summary_key)
        return value if value is not None else self.config.get(config_key)

    @property
    def dataset(self) -> str | None:
        return _str_or_none(self._setting("dataset", "dataset"))

    @property
    def strategy(self) -> str | None:
        return _str_or_none(self._setting("strategy", "strategy"))

    @property
    def model(self) -> str | None:
        return _str_or_none(self._setting("model", "model"))

    @property
    def num_clients(self) -> int | None:
        return _int_or_none(self._setting("num_clients", "num-clients"))

    @property
    def error(self) -> str | None:
        return _str_or_none(self.summary.get("error"))

    # ------------------------------------------------------------ progress
    @property
    def rounds_planned(self) -> int | None:
        return _int_or_none(self._setting("rounds_planned", "rounds"))

    @property
    def rounds_completed(self) -> int | None:
        """The last federated round recorded (0: only the initial model is evaluated)."""
        if self.metrics:
            return int(self.metrics[-1]["round"])
        return _int_or_none(self.summary.get("rounds_completed"))

    def elapsed_seconds(self, now: float | None = None) -> float | None:
        """Wall time so far (live runs) or in all (ended runs)."""
        now = time.time() if now is None else now
        started = _timestamp(self.summary.get("started_at"))
        if self.status in LIVE_STATUSES and started is not None:
            return max(0.0, now - started)
        wall = _float_or_none(self.summary.get("wall_seconds"))
        if wall is not None:
            return wall
        if self.metrics:
            return self.metrics[-1].get("elapsed_seconds")
        return None

    def mean_round_seconds(self) -> float | None:
        """Mean duration of the federated rounds so far (round 0 is setup, not a round)."""
        secs = [
            r["round_seconds"] + (r.get("eval_seconds") or 0.0)
            for r in self.metrics
            if r["round"] >= 1 and r.get("round_seconds") is not None
        ]
        return sum(secs) / len(secs) if secs else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Estimated time left for a live run: remaining rounds at the mean pace so far."""
        if self.status not in LIVE_STATUSES:
            return None
        planned, done, mean = self.rounds_planned, self.rounds_completed, self.mean_round_seconds()
        if planned is None or done is None or mean is None:
            return None
        now = time.time() if now is None else now
        in_flight = max(0.0, now - self.last_modified) if self.last_modified else 0.0
        return max(0.0, (planned - done) * mean - in_flight)

    def idle_seconds(self, now: float | None = None) -> float | None:
        """Seconds since any file of the run last changed."""
        if not self.last_modified:
            return None
        now = time.time() if now is None else now
        return max(0.0, now - self.last_modified)

    def is_stale(self, now: float | None = None) -> bool:
        """A live run whose files stopped changing for much longer than a round takes:
        its process was probably killed before it could record how it ended."""
        if self.status not in LIVE_STATUSES:
            return False
        idle = self.idle_seconds(now)
        if idle is None:
            return False
        longest = max(
            (
                (r.get("round_seconds") or 0.0) + (r.get("eval_seconds") or 0.0)
                for r in self.metrics
            ),
            default=0.0,
        )
        timeout = _float_or_none(self.config.get("round-timeout")) or 0.0
        return idle > max(STALE_AFTER_SECONDS, 3 * longest, timeout + 60.0)

    # ------------------------------------------------------------ results
    @property
    def final(self) -> Row | None:
        """The last recorded metrics row."""
        if self.metrics:
            return self.metrics[-1]
        final = self.summary.get("final")
        return final if isinstance(final, dict) else None

    @property
    def best(self) -> Row | None:
        """The row with the highest validation AUC (ties: the earlier round), as the run
        itself selects its best checkpoint."""
        best = self.summary.get("best")
        if isinstance(best, dict):
            return best
        scored = [r for r in self.metrics if r.get("val_auc") is not None]
        if not scored:
            return None
        top = max(r["val_auc"] for r in scored)
        return next(r for r in scored if r["val_auc"] == top)

    @property
    def benchmark(self) -> dict[str, dict[str, float]]:
        """Published centralized results for this data set: ``{name: {"auc", "acc"}}``."""
        raw = self.summary.get("benchmark")
        out: dict[str, dict[str, float]] = {}
        if not isinstance(raw, dict):
            return out
        for name, ref in raw.items():
            if isinstance(ref, dict):
                nums = {k: v for k, v in ref.items() if _float_or_none(v) is not None}
                if nums:
                    out[str(name)] = {k: float(v) for k, v in nums.items()}
        return out

    @property
    def latest_per_class(self) -> Row | None:
        return self.per_class[-1] if self.per_class else None


# ---------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """True for a folder holding any file a medbloom run writes first."""
    try:
        return path.is_dir() and any((path / m).is_file() for m in MARKER_FILES)
    except OSError:
        return False


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """The run directories in ``runs_dir`` (or ``runs_dir`` itself), newest first.

    Hidden folders are skipped: they are run directories still being created.
    """
    candidates: list[Path] = []
    if is_run_dir(runs_dir):
        candidates.append(runs_dir)
    try:
        children = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    except OSError:
        children = []
    candidates.extend(p for p in children if not p.name.startswith(".") and is_run_dir(p))
    infos = [_run_info(p) for p in candidates]
    return sorted(infos, key=lambda i: (i.created, i.name), reverse=True)


def _run_info(path: Path) -> RunInfo:
    summary, _ = read_json(path / "summary.json")
    info, _ = read_json(path / "config.json")
    data = RunData(path=path, status=_status(path, summary), summary=summary, info=info)
    created = _timestamp(info.get("created_at")) or _timestamp(summary.get("started_at"))
    if created is None:
        created = _mtime(path)
    return RunInfo(
        path=path,
        status=data.status,
        dataset=data.dataset,
        strategy=data.strategy,
        model=data.model,
        num_clients=data.num_clients,
        rounds_planned=data.rounds_planned,
        rounds_completed=_int_or_none(summary.get("rounds_completed")),
        created=created,
    )


# ---------------------------------------------------------------- one run


def read_run(path: Path) -> RunData:
    """Read every file of one run directory; problems go to ``notes``, never raise."""
    notes: list[str] = []
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        return RunData(path=path, status="unknown", notes=[f"{path}: {exc.strerror}"])
    if not is_dir:
        return RunData(path=path, status="unknown", notes=[f"{path} is not a folder"])
    summary, note = read_json(path / "summary.json")
    _note(notes, note)
    info, note = read_json(path / "config.json")
    _note(notes, note)
    class_names, shares, note = read_partitions(path / "partitions.json")
    _note(notes, note)
    metrics, more = read_metrics(path / "metrics.csv")
    notes.extend(more)
    clients, more = read_clients(path / "clients.csv")
    notes.extend(more)
    per_class, more = read_per_class(path / "per_class.jsonl")
    notes.extend(more)
    if not class_names:
        names = summary.get("class_names")
        if isinstance(names, list):
            class_names = [str(n) for n in names]
    last_modified = max(
        (
            _mtime(path / name)
            for name in ("summary.json", "metrics.csv", "clients.csv", "logs/server.log")
        ),
        default=0.0,
    )
    return RunData(
        path=path,
        status=_status(path, summary),
        summary=summary,
        info=info,
        class_names=class_names,
        partitions=shares,
        metrics=metrics,
        clients=clients,
        per_class=per_class,
        notes=notes,
        last_modified=last_modified,
    )


def _status(path: Path, summary: Row) -> str:
    status = summary.get("status")
    if isinstance(status, str) and status in STATUSES:
        return status
    if not summary:
        # No summary yet: the recorder writes one before the first round.
        return "starting" if not (path / "summary.json").exists() else "unknown"
    return "unknown"


def read_json(path: Path) -> tuple[Row, str | None]:
    """A JSON object file as a dict, or ``{}`` and a note saying why not."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"{path.name}: cannot be read ({exc.strerror})"
    try:
        data = json.loads(text)
    except ValueError:
        return {}, f"{path.name}: not valid JSON (half-written or corrupt); ignored"
    if not isinstance(data, dict):
        return {}, f"{path.name}: expected a JSON object; ignored"
    return data, None


def read_partitions(path: Path) -> tuple[list[str], list[ClientShare], str | None]:
    """Class names and each hospital's sample and label counts from ``partitions.json``."""
    data, note = read_json(path)
    if not data:
        return [], [], note
    names = data.get("class_names")
    class_names = [str(n) for n in names] if isinstance(names, list) else []
    shares: list[ClientShare] = []
    clients = data.get("clients")
    for i, c in enumerate(clients if isinstance(clients, list) else []):
        if not isinstance(c, dict):
            continue
        counts = c.get("label_counts")
        cid = _int_or_none(c.get("client_id"))
        shares.append(
            ClientShare(
                client_id=cid if cid is not None else i,
                num_train=_int_or_none(c.get("num_train")) or 0,
                num_val=_int_or_none(c.get("num_val")) or 0,
                label_counts=tuple(
                    _int_or_none(v) or 0 for v in (counts if isinstance(counts, list) else [])
                ),
            )
        )
    return class_names, shares, note


def read_csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Complete rows of a CSV that may be growing: a last line without its newline
    (the writer is mid-row) and rows with the wrong number of fields are dropped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{path.name}: cannot be read ({exc.strerror})"]
    notes: list[str] = []
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        notes.append(f"{path.name}: the last line is incomplete (still being written); not shown")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        return [], notes
    rows: list[dict[str, str]] = []
    bad = 0
    for fields in reader:
        if len(fields) != len(header):
            bad += 1
            continue
        rows.append(dict(zip(header, fields, strict=True)))
    if bad:
        notes.append(f"{path.name}: {bad} malformed line(s) skipped")
    return rows, notes


def read_metrics(path: Path) -> tuple[list[Row], list[str]]:
    """``metrics.csv`` as rows of floats (``None`` where empty), one per round, in order."""
    raw, notes = read_csv_rows(path)
    by_round: dict[int, Row] = {}
    for r in raw:
        rnd = _int_or_none(r.get("round"))
        if rnd is None:
            continue
        row: Row = {k: _float_or_none(v) for k, v in r.items() if k != "round"}
        row["round"] = rnd
        by_round[rnd] = row  # a repeated round: the later line wins
    return [by_round[k] for k in sorted(by_round)], notes


def read_clients(path: Path) -> tuple[list[Row], list[str]]:
    """``clients.csv``: one row per hospital per round, numbers parsed, text kept."""
    raw, notes = read_csv_rows(path)
    text_cols = {"status", "error", "node_id"}
    rows: list[Row] = []
    for r in raw:
        rnd = _int_or_none(r.get("round"))
        if rnd is None:
            continue
        row: Row = {k: (v if k in text_cols else _float_or_none(v)) for k, v in r.items()}
        row["round"] = rnd
        row["client_id"] = _int_or_none(r.get("client_id"))
        rows.append(row)
    return rows, notes


def read_per_class(path: Path) -> tuple[list[Row], list[str]]:
    """``per_class.jsonl``: the test split's per-class report of each round, in order."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{path.name}: cannot be read ({exc.strerror})"]
    rows: list[Row] = []
    bad = 0
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline
    for line in lines:
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(data, dict) and _int_or_none(data.get("round")) is not None:
            rows.append(data)
        else:
            bad += 1
    notes = [f"{path.name}: {bad} malformed line(s) skipped"] if bad else []
    if partial.strip():
        notes.append(f"{path.name}: the last line is incomplete (still being written); not shown")
    return rows, notes


def log_tail(path: Path, lines: int = 40) -> list[str]:
    """The last ``lines`` lines of ``logs/server.log`` (empty if there is none)."""
    log = path / "logs" / "server.log"
    try:
        with log.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


# ---------------------------------------------------------------- formatting


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; an em dash when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def round_progress(run: RunData) -> str:
    """``round 3 of 20`` (or what is known of it)."""
    done, planned = run.rounds_completed, run.rounds_planned
    if done is None:
        return f"no round yet of {planned}" if planned is not None else "no round yet"
    return f"round {done} of {planned}" if planned is not None else f"round {done}"


# ---------------------------------------------------------------- helpers


def _note(notes: list[str], note: str | None) -> None:
    if note:
        notes.append(note)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int_or_none(value: Any) -> int | None:
    x = _float_or_none(value)
    return int(x) if x is not None and x == int(x) else None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def column(rows: Iterable[Mapping[str, Any]], key: str) -> list[float | None]:
    """One column of parsed rows (``None`` where missing)."""
    return [_float_or_none(r.get(key)) for r in rows]
