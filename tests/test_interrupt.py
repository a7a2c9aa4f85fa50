"""Ctrl-C during `medbloom run`: a clean stop, an honest record, nothing left running."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ray_processes, tagged_env
from synthetic import write_npz

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_the_run_and_keeps_the_record(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 300, "val": 40, "test": 40}, seed=3)
    out = tmp_path / "run"
    tag = f"interrupt-{tmp_path.name}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medbloom",
            "run",
            "--data-dir",
            str(root),
            "--out",
            str(out),
            "--num-clients",
            "3",
            "--rounds",
            "500",
            "--local-epochs",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tagged_env(tag),
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            metrics = out / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break  # header, round 0, round 1
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("no round finished within 180 s")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    with (out / "metrics.csv").open() as fh:
        rounds = [int(r["round"]) for r in csv.DictReader(fh)]
    assert rounds == list(range(len(rounds))) and 2 <= len(rounds) < 500
    assert (out / "checkpoints" / "latest.pt").exists()
    deadline = time.monotonic() + 15
    while (left := ray_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"
