"""SIGTERM, as schedulers, containers, systemd and `timeout` send it, does what Ctrl-C
does: every command stops cleanly, says so, and leaves no process of its own behind.
Real processes, real signals, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ray_processes, tagged_env
from synthetic import write_npz

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children...), from /proc."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state != "Z":
            left.add(pid)
    return left


def _wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def _medbloom(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "medbloom", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or dict(os.environ),
        **kw,  # type: ignore[arg-type]
    )


def _wait_for_round_1(proc: subprocess.Popen[str], out: Path) -> None:
    """Until the run in ``out`` has recorded round 1 (round 0 and 1 rows), with the
    process still running."""
    metrics = out / "metrics.csv"
    _wait_until(
        lambda: (
            proc.poll() is not None
            or (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
        ),
        180,
        "round 1 recorded",
    )
    assert proc.poll() is None, proc.communicate()


def _stop_server_like(proc: subprocess.Popen[str], port: int) -> None:
    """SIGTERM to the command's own process: it and everything it started end."""
    _wait_until(lambda: _listening(port) or proc.poll() is not None, 90, f"port {port} open")
    assert proc.poll() is None, proc.communicate()
    below = _descendants(proc.pid)
    assert below, "the command started no server process"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, proc.communicate()
    _wait_until(lambda: not _alive(below), 15, f"processes {below} ended")
    assert not _listening(port)


def test_sigterm_stops_medbloom_server_and_its_superlink(tmp_path: Path) -> None:
    port = _free_port()
    proc = _medbloom(
        "server", "--port", str(port), "--flwr-home", str(tmp_path / "home"),
    )  # fmt: skip
    _stop_server_like(proc, port)


def test_sigterm_stops_medbloom_dashboard_and_streamlit(tmp_path: Path) -> None:
    port = _free_port()
    proc = _medbloom("dashboard", "--runs", str(tmp_path), "--port", str(port))
    _stop_server_like(proc, port)


def test_sigterm_stops_medbloom_node(tmp_path: Path) -> None:
    """A hospital's node (no SuperLink to reach: it keeps trying) ends on SIGTERM with
    exit code 143 and closes its Runtime API port."""
    port = _free_port()
    proc = _medbloom(
        "node", "--superlink", f"127.0.0.1:{_free_port()}", "--insecure", "--port", str(port),
    )  # fmt: skip
    try:
        _wait_until(lambda: _listening(port) or proc.poll() is not None, 90, f"port {port} open")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, proc.communicate()
    assert not _listening(port)


def test_sigterm_stops_medbloom_launch_and_its_processes(tmp_path: Path) -> None:
    """SIGTERM to ``medbloom launch`` (not to its processes, which run in sessions of
    their own): the run stops after its current round as on Ctrl-C, the summary says
    interrupted, and the SuperLink and hospital processes it started are gone."""
    from test_launch import _assert_nothing_left

    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 120, "val": 20, "test": 20}, seed=3)
    out = tmp_path / "run"
    proc = _medbloom(
        "launch", "--data-dir", str(root), "--out", str(out), "--num-clients", "2",
        "--rounds", "200",
    )  # fmt: skip
    try:
        _wait_for_round_1(proc, out)
        pids = json.loads((out / "flwr" / "pids.json").read_text()).values()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, 143), stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert not _alive(set(pids))
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("whole_group", [False, True], ids=["the-process", "its-group"])
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path: Path, whole_group: bool) -> None:
    """``kill PID`` (the process) and ``timeout`` (the whole process group, Ray's
    workers included): the run stops within seconds, the summary says interrupted,
    the plots are written and no Ray process is left."""
    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 300, "val": 40, "test": 40}, seed=3)
    out = tmp_path / "run"
    tag = f"sigterm-{tmp_path.name}"
    proc = _medbloom(
        "run", "--data-dir", str(root), "--out", str(out), "--num-clients", "3",
        "--rounds", "500", env=tagged_env(tag), start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_round_1(proc, out)
        t0 = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (130, 143), stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert took < 60, f"took {took:.0f} s to stop"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (out / "learning_curves.png").exists()
    _wait_until(lambda: not ray_processes(tag), 20, "Ray's processes ended")
