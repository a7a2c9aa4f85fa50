"""`medbloom launch`: a SuperLink and one process per hospital on 127.0.0.1, for real.

Nothing is mocked: Flower's Deployment Engine, real gRPC/HTTP on the loopback, real
OS processes, killed for real.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic import write_npz

pytestmark = pytest.mark.slow

FLOWER_PROCS = (
    "medbloom.federation.superlink",
    "flower-superlink",
    "flower-superexec",
    "flwr-serverapp",
    "medbloom.federation.node",
)


def _data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 150, "val": 30, "test": 30}, seed=5)
    return root


def _launch(
    tmp_path: Path, out: Path, *extra: str, relative: bool = False
) -> subprocess.Popen[str]:
    """``medbloom launch``; with ``relative`` it runs in ``tmp_path`` and names the data
    root relative to it, as a user typing ``--data-dir data`` does."""
    data = _data(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "medbloom",
        "launch",
        "--data-dir",
        data.name if relative else str(data),
        "--out",
        str(out),
        "--local-epochs",
        "1",
        "--min-partition-size",
        "5",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path if relative else None,
    )


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    out = []
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if text in args and any(p in args for p in FLOWER_PROCS):
            out.append((int(pid), args))
    return out


def _assert_nothing_left(where: Path) -> None:
    """No Flower or hospital process of this test is alive (their command lines name
    the test's folder: the data root or the run directory)."""
    # Flower's own app processes name only the SuperLink's address: find those too.
    addresses = [
        line.split('"')[1]
        for toml in where.rglob("flwr/config.toml")
        for line in toml.read_text().splitlines()
        if line.startswith("address")
    ]
    # Every process the launcher started, by the PIDs it recorded.
    started = [
        pid for f in where.rglob("flwr/pids.json") for pid in json.loads(f.read_text()).values()
    ]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = _processes_mentioning(str(where)) + [
            p for a in addresses for p in _processes_mentioning(a)
        ]
        for pid in started:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(p in args for p in (*FLOWER_PROCS, "flwr run")):
                left.append((pid, args))
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes left behind: {left}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C first, so the launcher stops the processes it started; kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _rows(run_dir: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with (run_dir / name).open() as fh:
        return list(csv.DictReader(fh))


def _wait_for_round(run_dir: Path, rnd: int, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.csv").exists() and any(
            int(r["round"]) >= rnd for r in _rows(run_dir)
        ):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    pytest.fail(f"round {rnd} not reached in {timeout} s")


def test_launch_three_hospitals_two_rounds(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A relative data root: every process starts in the run directory, so the run's
    # config must hold it as an absolute path.
    # --secure: TLS, and node keys made and registered by the launcher (the multi-site
    # commands are tested in test_multisite.py).
    proc = _launch(tmp_path, out, "--num-clients", "3", "--rounds", "2", "--secure", relative=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "round   2/2" in stdout
    assert "TLS" in stdout
    assert (out / "certs" / "ca.crt").exists() and (out / "certs" / "node_2").exists()
    assert "https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()
    rows = _rows(out)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == "3" for r in rows[1:])
    # each hospital process scored the global model it received on its own validation
    # data, and the server summarised those scores
    clients = _rows(out, "clients.csv")
    assert len(clients) == 6 and all(0 <= float(r["site_accuracy"]) <= 1 for r in clients)
    for row in rows[1:]:
        accs = [float(r["site_accuracy"]) for r in clients if r["round"] == row["round"]]
        assert float(row["worst_site_accuracy"]) == pytest.approx(min(accs))
    pids = json.loads((out / "flwr" / "pids.json").read_text())
    for name in ("superlink", "client_0", "client_1", "client_2", "server", "flwr-run"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0, name
    # each hospital process ran its ClientApp in-process, once per round
    for i in range(3):
        log = (out / "logs" / f"client_{i}.log").read_text()
        assert "waiting for ClientApp tasks" in log
        # with a timestamp, when each round's message reached it and its reply was ready
        assert log.count("train message received") == log.count("train reply ready") == 2
        # stopped on SIGTERM through Flower's exit handlers, its log flushed before
        # the node skips the interpreter's teardown; after the last line only Flower's
        # retry warning may come, from a connection thread that saw the SuperLink stop
        finished = f"Finished server process [{pids[f'client_{i}']}]"
        assert finished in log, log
        after = log.rsplit(finished, 1)[1].strip().splitlines()
        assert all("Connection attempt failed, retrying" in ln for ln in after), log
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    # the plots are written before summary.json says the run finished
    assert (out / "learning_curves.png").exists() and (out / "confusion_matrix.png").exists()
    assert json.loads((out / "config.json").read_text())["config"]["data-dir"] == str(
        tmp_path / "data"
    )
    _assert_nothing_left(tmp_path)


def test_a_hospital_killed_mid_run_does_not_stop_the_federation(
    tmp_path: Path, all_cpus: set[int]
) -> None:
    out = tmp_path / "run"
    proc = _launch(
        tmp_path,
        out,
        "--num-clients",
        "3",
        "--rounds",
        "4",
        "--min-clients",
        "2",
        "--round-timeout",
        "12",
    )
    try:
        _wait_for_round(out, 1, proc, 240)
        # killed once round 2's message has reached it (rounds can take well under a
        # second here: waiting a fixed time could miss the run), so it dies in round 2
        # or, at the latest, before it answers round 3's message
        log = out / "logs" / "client_1.log"
        deadline = time.monotonic() + 60
        while log.read_text().count("train message received") < 2:
            assert time.monotonic() < deadline, "round 2's message never reached hospital 1"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        victims = [
            p for p, args in _processes_mentioning(str(tmp_path)) if "partition-id=1" in args
        ]
        assert victims, "hospital 1's process not found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        pids = json.loads((out / "flwr" / "pids.json").read_text())
        # on one machine, hospitals are pinned to CPUs (packed by data size) once each
        # has trained once
        if len(os.sched_getaffinity(0)) > 1:
            deadline = time.monotonic() + 5  # the launcher looks at the run every 0.25 s
            while any(len(os.sched_getaffinity(pids[f"client_{i}"])) > 1 for i in (0, 2)):
                assert time.monotonic() < deadline, "hospitals 0 and 2 were not pinned"
                time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stdout + stderr
    rows = _rows(out)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    assert sum(int(r["clients_failed"]) for r in rows[1:]) >= 1
    # bounded by --round-timeout (12 s), also when the hospital died while uploading
    # its reply: Flower would wait for the parts until the SuperLink drops them (~3 min)
    assert all(float(r["round_seconds"]) < 45 for r in rows[1:]), rows
    assert rows[-1]["clients_ok"] == "2"
    failed = [r for r in _rows(out, "clients.csv") if r["status"] != "ok"]
    assert failed and {r["client_id"] for r in failed} == {"1"}
    assert (
        "failed" in (out / "logs" / "server.log").read_text()
        or "timeout" in (out / "logs" / "server.log").read_text()
    )
    _assert_nothing_left(tmp_path)


def test_a_server_killed_mid_run_resumes_from_its_last_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _launch(tmp_path, out, "--num-clients", "2", "--rounds", "3", "--strategy", "fedadam")
    try:
        _wait_for_round(out, 1, proc, 240)
        pid = json.loads((out / "flwr" / "pids.json").read_text())["superlink"]
        assert "medbloom.federation.superlink" in Path(f"/proc/{pid}/cmdline").read_text()
        os.kill(pid, signal.SIGKILL)  # the server machine dies
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 1, stdout + stderr
    assert "SuperLink process exited unexpectedly" in stderr, stderr
    done = [int(r["round"]) for r in _rows(out)]
    assert done[-1] < 3
    _assert_nothing_left(tmp_path)
    # said when launch returned, and not overwritten by the ServerApp on its way out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "SuperLink process exited unexpectedly" in summary["error"], summary["error"]

    resumed = subprocess.run(
        [sys.executable, "-m", "medbloom", "launch", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = _rows(out)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    clients = [(r["round"], r["client_id"]) for r in _rows(out, "clients.csv")]
    assert len(clients) == len(set(clients)) == 6
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    _assert_nothing_left(tmp_path)


def test_failure_reason_reads_the_server_error_when_nothing_was_recorded(tmp_path: Path) -> None:
    """A ServerApp that fails before it opens the run's records leaves no summary.json:
    the launcher names the exception from its output instead of crashing."""
    from medbloom.launch import failure_reason

    logs = tmp_path / "logs"
    logs.mkdir()
    assert str(logs) in failure_reason(tmp_path)
    (logs / "flwr-run.log").write_text(
        "\x1b[92mINFO \x1b[0m: starting\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "medbloom.errors.DataError: pneumoniamnist.npz is not in data/medmnist\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n"
    )
    assert failure_reason(tmp_path) == (
        "medbloom.errors.DataError: pneumoniamnist.npz is not in data/medmnist"
    )
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "error": "E: x"}))
    assert failure_reason(tmp_path) == "E: x"
