"""The dashboard on real run directories, written by the project's own recorder.

Each run directory here is made by :func:`medbloom.runs.create_run_dir` and
:class:`medbloom.runs.RunRecorder` exactly as ``medbloom run`` makes it; then the
Streamlit app is run headless with Streamlit's own testing API (``AppTest``) and
its page is inspected: no exception, the right status, charts and tables present,
the published numbers shown. ``write_run`` is shared with test_plots.py and
test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medbloom.config import PERSONAL, ExperimentConfig
from medbloom.dashboard import APP, check_port, dashboard_command, launch, rundir
from medbloom.data.partition import ClientPartition, partition_map
from medbloom.data.registry import spec_of
from medbloom.errors import MedbloomError
from medbloom.runs import RunRecorder, create_run_dir, run_info

KINDS = ("finished", "running", "failed", "interrupted")
FAILURE = "RuntimeError: round 3: no client returned a usable update"
CHART = "vega_lite_chart"


# ------------------------------------------------------------------ run writer


def _spec_summary(dataset: str) -> dict[str, Any]:
    """What the server passes to RunRecorder (medbloom.experiment.spec_summary), built
    from the same registry entry without importing Flower."""
    spec = spec_of(dataset, 28)
    return {
        "task": spec.task,
        "class_names": list(spec.class_names),
        "image_size": spec.image_size,
        "in_channels": spec.in_channels,
        "spatial_dims": spec.spatial_dims,
        "benchmark": spec.benchmark,
        "benchmark_source": "MedMNIST v2 (Yang et al., Scientific Data 2023), centralized"
        if spec.benchmark
        else None,
    }


def _partitions(num_clients: int, num_classes: int, seed: int) -> tuple[list[Any], np.ndarray]:
    """A skewed (Dirichlet 0.5) split of 600 labelled samples, as ``medbloom run`` makes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=600)
    owner = np.empty(len(labels), dtype=np.int64)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        share = rng.dirichlet([0.5] * num_clients)
        owner[idx] = rng.choice(num_clients, size=len(idx), p=share)
    owner[:num_clients] = np.arange(num_clients)  # nobody is left empty
    parts = []
    for cid in range(num_clients):
        idx = rng.permutation(np.flatnonzero(owner == cid))
        n_val = max(1, len(idx) // 10) if len(idx) > 1 else 0
        parts.append(ClientPartition(cid, np.sort(idx[n_val:]), np.sort(idx[:n_val])))
    return parts, labels


def _metrics_row(rnd: int, rounds: int, rng: np.random.Generator) -> dict[str, Any]:
    """A plausible round: scores rise and losses fall, with noise; round 0 has no training."""
    t = rnd / max(rounds, 1)
    noise = float(rng.normal(0, 0.01))
    acc = 0.55 + 0.3 * (1 - math.exp(-4 * t)) + noise
    auc = 0.65 + 0.28 * (1 - math.exp(-4 * t)) + noise
    loss = 0.95 - 0.55 * (1 - math.exp(-4 * t)) - noise
    trained = rnd > 0
    nan = float("nan")
    return {
        "round": rnd,
        "loss": loss,
        "accuracy": acc,
        "auc": auc,
        "balanced_accuracy": acc - 0.04,
        "precision": acc - 0.02,
        "recall": acc - 0.04,
        "f1": acc - 0.05,
        "train_loss": loss - 0.1 if trained else nan,
        "train_accuracy": acc + 0.03 if trained else nan,
        "val_loss": loss - 0.05,
        "val_accuracy": acc + 0.04,
        "val_auc": auc + 0.02,
        "clients_ok": 3 if trained else nan,
        "clients_failed": 0 if trained else nan,
        "round_seconds": 30.0 + 10 * float(rng.random()) if trained else 0.0,
        "elapsed_seconds": 35.0 * rnd,
    }


def _per_class(class_names: list[str], rng: np.random.Generator) -> dict[str, Any]:
    n = len(class_names)
    cm = rng.integers(0, 20, size=(n, n)) + np.diag(rng.integers(40, 90, size=n))
    support = cm.sum(axis=1)
    recall = np.diag(cm) / support
    precision = np.diag(cm) / np.maximum(cm.sum(axis=0), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-9)
    return {
        "class_names": class_names,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "confusion_matrix": cm.tolist(),
    }


class RunWriter:
    """Writes a run directory round by round, the way ``medbloom run`` does."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        dataset: str = "pneumoniamnist",
        strategy: str = "fedavg",
        rounds: int = 5,
        num_clients: int = 3,
        seed: int = 0,
        started_ago: float = 0.0,
        clean_test: dict[str, Any] | None = None,
    ) -> None:
        cfg = ExperimentConfig(
            dataset=dataset,
            num_clients=num_clients,
            rounds=rounds,
            strategy=strategy,
            seed=seed,
            out=str(root / name),
        )
        self.spec = _spec_summary(dataset)
        self.spec["clean_test"] = clean_test
        self.parts, labels = _partitions(num_clients, len(self.spec["class_names"]), seed)
        self.path = create_run_dir(
            root / name,
            {
                "config.json": run_info(cfg, ["medbloom", "run", "--rounds", str(rounds)]),
                "partitions.json": partition_map(
                    self.parts, labels, tuple(self.spec["class_names"])
                ),
            },
        )
        self.rounds = rounds
        self.personal = strategy in PERSONAL
        self.rng = np.random.default_rng(seed)
        self.recorder = RunRecorder(self.path, cfg, self.spec)
        self.recorder.started -= started_ago  # as if the run began that long ago
        self.done = -1

    def next_round(self) -> None:
        """Record the next round: the clients' replies, then the global model's scores."""
        rnd = self.done + 1
        if rnd > 0:
            self.recorder.record_clients(
                [
                    {
                        "round": rnd,
                        "client_id": p.client_id,
                        "node_id": 1000 + p.client_id,
                        "status": "ok",
                        "num_examples": len(p.train),
                        "train_loss": 0.8 - 0.05 * rnd + 0.02 * p.client_id,
                        "train_accuracy": 0.6 + 0.03 * rnd,
                        "local_val_accuracy": 0.62 + 0.03 * rnd,
                        "site_accuracy": self._site(rnd, p.client_id),
                        "seconds": 0.5 + 0.1 * p.client_id,
                        **self._own(rnd, p.client_id),
                    }
                    for p in self.parts
                ]
            )
        row = _metrics_row(rnd, self.rounds, self.rng)
        if self.spec["clean_test"]:  # twins left out: the clean split scores lower
            for metric in ("accuracy", "auc", "balanced_accuracy", "f1"):
                row[f"clean_{metric}"] = row[metric] - 0.07
        if rnd > 0:
            sites = [self._site(rnd, p.client_id) for p in self.parts]
            row["worst_site_accuracy"] = min(sites)
            row["median_site_accuracy"] = float(np.median(sites))
            row["site_accuracy_spread"] = max(sites) - min(sites)
            if self.personal:
                own = [self._own(rnd, p.client_id)["personal_accuracy"] for p in self.parts]
                row["personal_mean_accuracy"] = float(np.mean(own))
                row["personal_worst_accuracy"] = min(own)
        self.recorder.record_round(
            row,
            {"w": torch.zeros(2)},
            _per_class(self.spec["class_names"], self.rng),
        )
        self.done = rnd

    def _own(self, rnd: int, client_id: int) -> dict[str, Any]:
        """A personalised run: hospital ``client_id``'s own model's scores in ``rnd``."""
        if not self.personal:
            return {}
        acc = round(0.8 + 0.02 * rnd - 0.01 * client_id, 4)
        return {"personal_accuracy": acc, "personal_balanced_accuracy": acc - 0.05, "val_size": 40}

    @staticmethod
    def _site(rnd: int, client_id: int) -> float:
        """Hospital ``client_id``'s ACC of the global model it received in ``rnd``."""
        return round(0.5 + 0.04 * rnd - 0.05 * client_id, 4)

    def fail(self) -> None:
        """A round whose clients all fail, then the run fails as the server records it."""
        self.recorder.record_clients(
            [
                {
                    "round": self.done + 1,
                    "client_id": p.client_id,
                    "node_id": 1000 + p.client_id,
                    "status": "failed",
                    "error": "RuntimeError: CUDA out of memory",
                }
                for p in self.parts
            ]
        )
        self.recorder.close("failed", FAILURE)

    def detach(self) -> None:
        """Leave the run as a live process holds it: files closed, summary still running."""
        for fh, _ in (self.recorder._metrics, self.recorder._clients):
            fh.close()


def write_run(
    root: Path,
    name: str,
    kind: str,
    *,
    dataset: str = "pneumoniamnist",
    strategy: str = "fedavg",
    rounds: int = 5,
    done: int | None = None,
    num_clients: int = 3,
    seed: int = 0,
) -> Path:
    """Write a run directory the way ``medbloom run`` does and leave it ``kind``.

    ``finished`` records every round; the others stop after ``done`` rounds:
    ``running`` leaves it mid-run (summary says running, never closed),
    ``failed`` adds a round whose clients all failed and closes with an error,
    ``interrupted`` closes as a Ctrl-C does. Rounds look as if each took 30-40 s.
    """
    assert kind in KINDS
    done = rounds if kind == "finished" else (done if done is not None else 2)
    writer = RunWriter(
        root,
        name,
        dataset=dataset,
        strategy=strategy,
        rounds=rounds,
        num_clients=num_clients,
        seed=seed,
        started_ago=35.0 * done + 5,
    )
    for _ in range(done + 1):
        writer.next_round()
    if kind == "failed":
        writer.fail()
    elif kind == "interrupted":
        writer.recorder.close("interrupted", "stopped by the user")
    elif kind == "finished":
        writer.recorder.close("finished")
    else:
        writer.detach()
    return writer.path


# ------------------------------------------------------------------ AppTest helpers


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with a run of each kind, oldest first, plus two broken ones."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "a-finished", "finished", rounds=5, seed=1)
    write_run(root, "b-failed", "failed", rounds=5, done=2, seed=2)
    write_run(root, "c-interrupted", "interrupted", rounds=6, done=3, strategy="fedprox", seed=3)
    write_run(root, "d-running", "running", dataset="dermamnist", rounds=10, done=4, num_clients=4)
    half = write_run(root, "e-half-written", "running", rounds=8, done=3, seed=5)
    with (half / "metrics.csv").open("a", encoding="utf-8") as fh:
        fh.write("4,0.41,0.83")  # the writer was mid-row
    # created, nothing recorded yet: no summary.json, header-only CSVs absent
    starting = write_run(root, "f-starting", "running", rounds=4, done=0, seed=6)
    for name in ("summary.json", "metrics.csv", "clients.csv", "per_class.jsonl"):
        (starting / name).unlink()
    return root


def _app(runs: Path, monkeypatch: pytest.MonkeyPatch, run: str | None = None) -> Any:
    """Run the app headless on ``runs`` (and pick ``run``); fail on any exception in it."""
    # Imported here: test_plots.py borrows write_run and needs no Streamlit.
    testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv("MEDBLOOM_RUNS_DIR", str(runs))
    at = testing.AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    if run is not None:
        at.radio(key="run").set_value(str(runs / run)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: Any) -> str:
    """Every piece of text on the page, for 'is it said somewhere' checks."""
    parts: list[str] = []
    for kind in ("success", "info", "warning", "error", "caption", "markdown", "title"):
        parts.extend(str(e.value) for e in getattr(at, kind))
    return "\n".join(parts)


def metrics_line(at: Any) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _frames(at: Any) -> list[Any]:
    return [d.value for d in at.dataframe]


def _numbers(at: Any) -> set[float]:
    out: set[float] = set()
    for df in _frames(at):
        for v in df.to_numpy().ravel():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.add(round(float(v), 3))
    return out


# ------------------------------------------------------------------ tests


def test_reader_is_plain_python() -> None:
    """The reader must not drag torch or Flower into the dashboard's process."""
    import subprocess
    import sys

    code = (
        "import sys, medbloom.dashboard.rundir, medbloom.dashboard; "
        "print([m for m in ('torch', 'flwr', 'streamlit') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_picker_lists_runs_newest_first(runs_dir: Path) -> None:
    runs = rundir.list_runs(runs_dir)
    assert [r.name for r in runs] == [
        "f-starting",
        "e-half-written",
        "d-running",
        "c-interrupted",
        "b-failed",
        "a-finished",
    ]
    by_name = {r.name: r for r in runs}
    assert by_name["d-running"].label == "d-running · dermamnist · fedavg · 4 clients · running"
    assert by_name["b-failed"].status == "failed"
    assert by_name["f-starting"].status == "starting"


def test_reader_drops_a_half_written_last_line(runs_dir: Path) -> None:
    run = rundir.read_run(runs_dir / "e-half-written")
    assert [r["round"] for r in run.metrics] == [0, 1, 2, 3]
    assert any("incomplete" in n for n in run.notes)
    assert run.status == "running"
    assert run.rounds_completed == 3 and run.rounds_planned == 8


def test_finished_run(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch, "a-finished")
    assert "Finished" in at.success[0].value
    assert "round 5 of 5" in at.success[0].value
    assert len(at.get(CHART)) >= 6  # curves, partition, clients, confusion, comparison
    assert len(at.dataframe) >= 4
    # final and best beside the published centralized results (resnet18-28: 0.944 / 0.854)
    assert {0.944, 0.854, 0.956, 0.864} <= _numbers(at)
    results, published = _frames(at)[:2]
    best = json.loads((runs_dir / "a-finished" / "summary.json").read_text())["best"]
    assert list(results["result"]) == ["final", "best by val AUC"]
    assert list(results["round"]) == [5, best["round"]]
    assert round(float(results["test AUC"][1]), 6) == round(best["auc"], 6)
    assert list(published["model"]) == [
        "resnet18-28",
        "resnet18-224",
        "resnet50-28",
        "resnet50-224",
    ]
    assert (published["test AUC"][0], published["test ACC"][0]) == (0.944, 0.854)
    assert "below** the published resnet18-28 (0.944)" in _texts(at)
    assert metrics_line(at)["Elapsed"] == "3 min 00 s"  # 5 rounds of 35 s, + 5 s
    # the run has ended: no time left to estimate
    metrics = {m.label: m for m in at.metric}
    assert metrics["Round"].value == "5 / 5"
    assert not metrics["Elapsed"].delta


CLEAN = {
    "threshold": 16,
    "test_images": 624,
    "clean_images": 500,
    "left_out": 124,
    "left_out_exact": 100,
    "left_out_near": 24,
}


def test_clean_test_split_beside_the_official_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RunWriter(tmp_path, "leaky", rounds=2, clean_test=CLEAN)
    for _ in range(3):
        writer.next_round()
    writer.recorder.close("finished")
    plain = write_run(tmp_path, "plain", "finished", rounds=2, seed=4)
    at = _app(tmp_path, monkeypatch, "leaky")
    results = _frames(at)[0]
    final = json.loads((writer.path / "summary.json").read_text())["final"]
    assert round(float(results["clean test ACC"][0]), 6) == round(final["clean_accuracy"], 6)
    assert round(float(results["clean test AUC"][0]), 6) == round(final["clean_auc"], 6)
    assert "Clean test split: 500 of 624 test images. 124 were left out" in _texts(at)
    assert "100 with identical pixels, 24 within 16 bits" in _texts(at)
    at.radio(key="run").set_value(str(plain)).run()
    assert not at.exception
    assert "Clean test split: not computed for this run" in _texts(at)


def test_running_run(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch, "d-running")
    assert "Running" in at.info[0].value and "round 4 of 10" in at.info[0].value
    metrics = {m.label: m for m in at.metric}
    assert metrics["Round"].value == "4 / 10"
    assert metrics["Elapsed"].delta.startswith("~") and metrics["Elapsed"].delta.endswith("left")
    assert len(at.get(CHART)) >= 5
    # 7 classes in the confusion matrix table, hospitals' label counts
    texts = _texts(at)
    assert "**4 hospitals**" in texts
    per_class = next(df for df in _frames(at) if "recall" in df.columns)
    assert len(per_class) == 7
    hospitals = next(df for df in _frames(at) if "rounds ok" in df.columns)
    assert list(hospitals["rounds ok"]) == [4, 4, 4, 4]
    # the per-hospital panel: the global model on each hospital's validation split
    assert list(hospitals["site ACC"]) == pytest.approx([0.66, 0.61, 0.56, 0.51])
    assert "worst hospital ACC **0.510**, median 0.585" in texts
    assert "melanoma" in hospitals.columns


def test_failed_run_shows_its_error(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch, "b-failed")
    assert len(at.error) == 1
    assert "Failed" in at.error[0].value and FAILURE in at.error[0].value
    assert "round 2 of 5" in at.error[0].value
    # what it recorded before failing is still shown
    assert len(at.get(CHART)) >= 5
    failed = next(df for df in _frames(at) if "error" in df.columns)
    assert set(failed["error"]) == {"RuntimeError: CUDA out of memory"}
    hospitals = next(df for df in _frames(at) if "rounds failed" in df.columns)
    assert list(hospitals["rounds failed"]) == [1, 1, 1]


def test_interrupted_run(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch, "c-interrupted")
    assert "Interrupted" in at.warning[0].value
    assert "round 3 of 6" in at.warning[0].value and "stopped by the user" in at.warning[0].value
    assert len(at.get(CHART)) >= 5


def test_half_written_metrics(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch, "e-half-written")
    assert "round 3 of 8" in at.info[0].value
    assert "metrics.csv: the last line is incomplete" in _texts(at)
    assert {m.label: m.value for m in at.metric}["Round"] == "3 / 8"


def test_run_without_summary_or_metrics(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_dir, monkeypatch)  # the newest run is selected by default
    assert "Starting" in at.info[0].value
    assert "No round recorded yet" in _texts(at)
    assert len(at.get(CHART)) >= 1  # the partition heatmap is already known


def test_empty_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(tmp_path, monkeypatch)
    assert "No runs yet" in at.info[0].value
    at = _app(tmp_path / "absent", monkeypatch)
    assert "does not exist" in at.info[0].value


def test_header_only_and_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path, "r", "running", rounds=3, done=1)
    (run / "metrics.csv").write_text("round,loss,accuracy,auc\n", encoding="utf-8")
    (run / "summary.json").write_text('{"status": "runn', encoding="utf-8")
    (run / "partitions.json").write_text("[1, 2", encoding="utf-8")
    at = _app(tmp_path, monkeypatch)
    assert "Status unknown" in at.warning[0].value
    texts = _texts(at)
    assert "No round recorded yet" in texts
    assert "summary.json: not valid JSON" in texts
    assert "partitions.json: not valid JSON" in texts


def test_many_runs_use_a_drop_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(14):  # created, nothing recorded yet: cheap, and still real run dirs
        cfg = ExperimentConfig(num_clients=2, rounds=3, seed=i, out=str(tmp_path / f"run{i:02d}"))
        create_run_dir(Path(cfg.out), {"config.json": run_info(cfg, ["medbloom", "run"])})
    at = _app(tmp_path, monkeypatch)
    assert not at.radio
    picker = at.selectbox(key="run")
    assert len(picker.options) == 14
    assert "Starting" in at.info[0].value


# ------------------------------------------------------------------ reader details


def test_time_left_and_a_stalled_run(runs_dir: Path) -> None:
    run = rundir.read_run(runs_dir / "d-running")
    mean = run.mean_round_seconds()
    assert mean is not None and 30 <= mean <= 40
    # just after round 4 of 10 was written: six rounds at the mean pace
    eta = run.eta_seconds(now=run.last_modified)
    assert eta == pytest.approx(6 * mean)
    assert not run.is_stale(now=run.last_modified + 60)
    assert run.is_stale(now=run.last_modified + 2 * 3600)
    ended = rundir.read_run(runs_dir / "a-finished")
    assert ended.eta_seconds() is None and not ended.is_stale(now=time.time() + 1e6)
    elapsed = ended.elapsed_seconds()
    assert elapsed is not None and 175 <= elapsed <= 190  # 5 rounds of 35 s + 5 s


def test_partial_per_class_line(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", "running", rounds=4, done=2)
    with (run / "per_class.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"round": 3, "split": "test", "class_na')
    data = rundir.read_run(run)
    assert [r["round"] for r in data.per_class] == [0, 1, 2]
    assert any("per_class.jsonl: the last line is incomplete" in n for n in data.notes)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "—"), (float("nan"), "—"), (42.4, "42 s"), (185, "3 min 05 s"), (3720, "1 h 02 min")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert rundir.format_duration(seconds) == text


# ------------------------------------------------------------------ launcher


def test_dashboard_command_binds_localhost(tmp_path: Path) -> None:
    cmd = dashboard_command(tmp_path, 8600)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    flags = dict(zip(cmd[5:-3:2], cmd[6:-3:2], strict=True))
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--server.port"] == "8600"
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"
    assert cmd[-3:] == ["--", "--runs", str(tmp_path)]


def test_launch_refuses_bad_ports_and_runs_paths(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MedbloomError, match=f"--port {port}: cannot listen"):
            check_port(port)
    for bad in (0, 70000):
        with pytest.raises(MedbloomError, match="out of range"):
            launch(tmp_path, bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedbloomError, match="not a folder"):
        launch(tmp_path / "file", 8600)


def test_the_privacy_guarantee_is_stated_or_its_absence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run without --privacy says it has no formal guarantee; a private one states its
    epsilon, delta and unit, as summary.json records them."""
    plain = RunWriter(tmp_path, "plain", rounds=1)
    plain.next_round()
    plain.recorder.close("finished")
    private = RunWriter(tmp_path, "private", rounds=1)
    private.next_round()
    private.recorder.cfg = private.recorder.cfg.replace(privacy="sample", target_epsilon=3.0)
    private.recorder.record_clients([{"round": 1, "client_id": 0, "status": "ok", "epsilon": 2.5}])
    private.recorder.close("finished")
    at = _app(tmp_path, monkeypatch, "plain")
    assert "Privacy: no formal privacy guarantee (--privacy none)." in _texts(at)
    at.radio(key="run").set_value(str(private.path)).run()
    assert not at.exception
    assert "Privacy: epsilon 2.50 (delta 1e-05) per image" in _texts(at)


def test_a_personalised_run_shows_each_hospitals_own_model_beside_the_global_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RunWriter(tmp_path, "own", strategy="fedper", rounds=2)
    for _ in range(3):
        writer.next_round()
    writer.recorder.close("finished")
    plain = write_run(tmp_path, "plain", "finished", rounds=2, seed=4)
    at = _app(tmp_path, monkeypatch, "own")
    assert "Each hospital's own model on its own validation data" in _texts(at)
    hospitals = next(df for df in _frames(at) if "rounds ok" in df.columns)
    assert list(hospitals["own model ACC"]) == pytest.approx([0.84, 0.83, 0.82])
    assert list(hospitals["own balanced ACC"]) == pytest.approx([0.79, 0.78, 0.77])
    assert list(hospitals["site ACC"]) == pytest.approx([0.58, 0.53, 0.48])  # the global one
    at.radio(key="run").set_value(str(plain)).run()
    assert not at.exception
    assert "own model" not in _texts(at)
    hospitals = next(df for df in _frames(at) if "rounds ok" in df.columns)
    assert "own model ACC" not in hospitals.columns
