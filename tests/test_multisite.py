"""The multi-site commands of the README, for real on 127.0.0.1: `medbloom certs`,
`medbloom server` (TLS + node authentication), `flwr supernode register`, one
`medbloom node` per hospital on a data root of its own, and `flwr run` of the project.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic import write_npz

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_and_hospital_nodes_run_a_secure_federation(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    counts = {"train": 80, "val": 20, "test": 30}
    server_data = tmp_path / "server-data"
    write_npz(server_data, "pneumoniamnist", counts=counts, seed=1)
    hospitals = []
    for i in range(2):  # each hospital has its own data, no partitioning
        hospitals.append(tmp_path / f"hospital-{i}")
        write_npz(hospitals[-1], "pneumoniamnist", counts=counts, seed=10 + i)

    def medbloom(*args: str, log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "medbloom", *args],
            env=env,
            cwd=tmp_path,
            stdout=(tmp_path / log).open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    procs: list[subprocess.Popen[bytes]] = []
    port = _free_port()
    out = tmp_path / "trial-1"
    try:
        made = subprocess.run(
            [sys.executable, "-m", "medbloom", "certs", "--out", "certs", "--num-nodes", "3"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        certs = tmp_path / "certs"
        procs.append(
            medbloom(
                "server",
                "--port",
                str(port),
                "--certs",
                str(certs),
                "--flwr-home",
                env["FLWR_HOME"],
                log="server.log",
            )
        )
        deadline = time.monotonic() + 60
        while "Uvicorn running on https" not in (tmp_path / "server.log").read_text():
            assert procs[0].poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.3)
        for i in range(2):  # node_2's key is never registered
            reg = flwr("supernode", "register", str(certs / f"node_{i}.pub"), "medbloom")
            assert reg.returncode == 0, reg.stdout + reg.stderr

        def node(i: int) -> subprocess.Popen[bytes]:
            return medbloom(
                "node",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(certs / f"node_{i}"),
                "--port",
                str(_free_port()),
                "--node-config",
                f"data-dir='{hospitals[i] if i < 2 else hospitals[0]}'",
                log=f"node_{i}.log",
            )

        procs += [node(0), node(1)]
        intruder = node(2)
        procs.append(intruder)
        assert intruder.wait(timeout=90) == 1, (tmp_path / "node_2.log").read_text()
        assert "Exit Code: 305" in (tmp_path / "node_2.log").read_text()

        run = flwr(
            "run",
            str(REPO),
            "medbloom",
            "--stream",
            "-c",
            f"num-clients=2 rounds=2 min-partition-size=5 batch-size=16 "
            f"data-dir='{server_data}' out='{out}'",
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() or (
            json.loads((out / "summary.json").read_text())["status"] == "running"
        ):
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.5)
        assert json.loads((out / "summary.json").read_text())["status"] == "finished"
        with (out / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["round"]) for r in rows] == [0, 1, 2]
        assert all(r["clients_ok"] == "2" and r["clients_failed"] == "0" for r in rows[1:])
        with (out / "clients.csv").open() as fh:
            examples = {int(r["num_examples"]) for r in csv.DictReader(fh)}
        # every hospital trained on all of its own training split (minus local validation)
        assert examples == {72}
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text()[-3000:]}")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
