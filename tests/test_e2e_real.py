"""End-to-end runs on the real PneumoniaMNIST file: `medbloom run` and `flwr run .`.

Real processes, Flower's own Simulation Engine; nothing mocked.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, ray_processes, tagged_env

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

REQUIRED_COLUMNS = [
    "round",
    "loss",
    "accuracy",
    "auc",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "train_loss",
    "val_accuracy",
    "val_auc",
    "round_seconds",
    "eval_seconds",
    "elapsed_seconds",
]


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _medbloom(
    *args: str, timeout: float = 400, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("medbloom")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def test_medbloom_run_learns_and_writes_the_run_directory(
    shared_data_root: Path, tmp_path: Path
) -> None:
    tag = f"e2e-{tmp_path.name}"
    out = tmp_path / "run"
    proc = _medbloom(
        "run",
        "--data-dir",
        str(shared_data_root),
        "--rounds",
        "3",
        "--out",
        str(out),
        env=tagged_env(tag),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # progress: one line per round, round r of R
    for r in range(4):
        assert f"round {r:>3}/3" in proc.stdout

    rows = _read_metrics(out)
    header = list(rows[0].keys())
    assert header[0] == "round"
    assert set(REQUIRED_COLUMNS) <= set(header)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0
    assert all(int(r["clients_ok"]) == 10 and int(r["clients_failed"]) == 0 for r in rows[1:])
    final = rows[-1]
    assert float(final["auc"]) > 0.85, final  # chance is 0.5
    assert float(final["auc"]) > float(rows[0]["auc"]) + 0.1
    for col in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "val_auc"):
        assert 0.0 <= float(final[col]) <= 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["rounds_completed"] == 3
    assert summary["benchmark"]["resnet18-28"] == {"auc": 0.944, "acc": 0.854}
    best_round = summary["best"]["round"]
    assert summary["best"]["val_auc"] == max(float(r["val_auc"]) for r in rows)

    config = json.loads((out / "config.json").read_text())
    assert config["config"]["num-clients"] == 10 and config["seed"] == 42
    assert config["versions"]["flwr"] == "1.42.0"

    parts = json.loads((out / "partitions.json").read_text())
    assert len(parts["clients"]) == 10
    assert sum(sum(c["label_counts"]) for c in parts["clients"]) == 4708

    with (out / "clients.csv").open() as fh:
        client_rows = list(csv.DictReader(fh))
    assert len(client_rows) == 30
    assert {int(r["client_id"]) for r in client_rows} == set(range(10))

    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    latest = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert best["round"] == best_round and latest["round"] == 3
    assert (out / "logs" / "server.log").stat().st_size > 0

    # no Ray process of this run is left behind
    deadline = time.monotonic() + 15
    while (left := ray_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def test_flwr_run_is_the_same_experiment(shared_data_root: Path, tmp_path: Path) -> None:
    """`flwr run .` on this project, as on any Flower App, writes the same records."""
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "flwr CLI not installed"
    out = tmp_path / "flwr-run"
    # as in an activated virtual environment: `flwr run` starts `flower-superlink` by name
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
    }
    overrides = f"rounds=1 num-clients=4 data-dir='{shared_data_root}' out='{out}'"
    proc = subprocess.Popen(
        [flwr, "run", ".", "--federation-config", "num-supernodes=4", "-c", overrides, "--stream"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        # `flwr run` leaves its managed local SuperLink running: stop the one it started.
        _stop_local_superlink(tmp_path / "flwr-home")
    assert proc.returncode == 0, output
    assert "medbloom round 1/1" in output
    rows = _read_metrics(out)
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def _stop_local_superlink(flwr_home: Path) -> None:
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "flower-superlink" in args and str(flwr_home) in args:
            os.kill(int(pid), signal.SIGTERM)
