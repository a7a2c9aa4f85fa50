"""The multi-site commands of the README, for real on 127.0.0.1: `medbloom certs`,
`medbloom server` (TLS + node authentication), `flwr supernode register`, one
`medbloom node` per hospital on a data root of its own, and `flwr run` of the project.
Also what the security rests on: the SuperLink serves the certificate `medbloom
certs` made, a node with an unregistered key is refused, and a node that does not
trust the CA fails the TLS handshake.
"""

from __future__ import annotations

import csv
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from conftest import end_process_groups, flower_cli_env
from medbloom.certs import make_certs
from synthetic import write_npz

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_and_hospital_nodes_run_a_secure_federation(tmp_path: Path) -> None:
    env = flower_cli_env(tmp_path / "flwr-home")
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
        # TLS: the port presents the server certificate `medbloom certs` made.
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        assert served == x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())

        node_ids = []
        for i in range(2):  # node_2's key is never registered
            reg = flwr(
                "supernode",
                "register",
                str(certs / f"node_{i}.pub"),
                "medbloom",
                "--format",
                "json",
            )
            assert reg.returncode == 0, reg.stdout + reg.stderr
            node_ids.append(int(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"]))

        def status() -> dict[int, str]:
            out = flwr("supernode", "list", "medbloom", "--format", "json")
            assert out.returncode == 0, out.stdout + out.stderr
            nodes = json.loads(out.stdout[out.stdout.index("{") :])["nodes"]
            return {int(n["node-id"]): n["status"] for n in nodes}

        assert [status().get(n) for n in node_ids] == ["registered", "registered"]

        def node(i: int, ca: Path, log: str) -> subprocess.Popen[bytes]:
            return medbloom(
                "node",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(certs / f"node_{i}"),
                "--port",
                str(_free_port()),
                "--node-config",
                f"data-dir='{hospitals[min(i, 1)]}'",
                log=log,
            )

        procs += [node(0, certs / "ca.crt", "node_0.log"), node(1, certs / "ca.crt", "node_1.log")]
        intruder = node(2, certs / "ca.crt", "node_2.log")
        other_ca = make_certs(tmp_path / "other", num_nodes=0).ca_cert  # a CA the server never used
        distrustful = node(0, other_ca, "node_wrong_ca.log")
        procs += [intruder, distrustful]
        assert intruder.wait(timeout=90) == 1, (tmp_path / "node_2.log").read_text()
        assert "Exit Code: 305" in (tmp_path / "node_2.log").read_text()
        assert (
            "No SuperNode found with the given public key" in (tmp_path / "server.log").read_text()
        )
        assert distrustful.wait(timeout=90) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "node_wrong_ca.log").read_text()

        run = flwr(
            "run",
            str(REPO),
            "medbloom",
            "--stream",
            "-c",
            f"num-clients=2 rounds=2 min-partition-size=5 batch-size=16 "
            f"data-dir='{server_data}' out='{out}' secure-aggregation='on'",
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert [status().get(n) for n in node_ids] == ["online", "online"]
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
        # under secure aggregation: the server saw only the sum of the two updates
        summary = json.loads((out / "summary.json").read_text())
        assert summary["privacy"]["secure_aggregation"]["threshold"] == 2
        for name in ("node_0.log", "node_1.log"):
            assert "round 2: unmasking shares ready" in (tmp_path / name).read_text()
        # what the SuperLink keeps after the run: the messages are gone once delivered,
        # and the ServerApp's logs it stored are a few lines of text
        import sqlite3

        db = sqlite3.connect(tmp_path / "flwr-home" / "state.db")
        try:
            for table in ("message", "message_ins", "message_res", "objects"):
                assert db.execute(f"select count(*) from {table}").fetchone()[0] == 0, table
            logs = "".join(row[0] for row in db.execute("select log from task_logs"))
        finally:
            db.close()
        assert len(logs) < 20_000
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text()[-3000:]}")
        raise
    finally:
        end_process_groups(procs)
