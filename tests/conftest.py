"""Shared fixtures: where the real data sets are, and process bookkeeping for end-to-end runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"
PNEUMONIA = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The real data root (``../shared/datasets``); tests that need it skip without it."""
    if not PNEUMONIA.is_file():
        pytest.skip(f"real data not found at {PNEUMONIA} (../shared/datasets beside the repo)")
    return SHARED_DATA


TAG_VARIABLE = "MEDBLOOM_TEST_TAG"


def tagged_env(tag: str) -> dict[str, str]:
    """This process's environment plus a tag that every process started from it inherits
    (Ray's GCS, raylet and workers too), so a test can find its own among other tests'."""
    return {**os.environ, TAG_VARIABLE: tag}


def _carries(pid: int, tag: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # ended, or not ours to read
        return False
    return f"{TAG_VARIABLE}={tag}".encode() in environ


def ray_processes(tag: str) -> set[int]:
    """PIDs of Ray's own processes (workers, raylet, GCS) started under ``tagged_env(tag)``:
    only this test's, also while other tests run their own Ray beside it."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if any(k in args for k in ("ray::", "raylet", "gcs_server", "default_worker.py")):
            if _carries(int(pid), tag):
                pids.add(int(pid))
    return pids


# Each pytest-xdist worker runs on CPUs of its own: N workers on at least N CPUs split
# them (on 2 cores, one each). Every process a test starts inherits the mask, and
# medbloom sizes its Ray instance by it (system.usable_cpus), so an in-process
# simulation starts one Ray worker per CPU it has, not per CPU of the machine: on 2
# cores, one worker, which saves the other's start-up (importing torch, Flower,
# torch._dynamo and scikit-learn, about 10 CPU-s) in every one of the suite's ~50
# simulations, while the other pytest worker keeps the other core busy
# (benchmarks/README.md, "The test suite"). MEDBLOOM_TEST_PIN=0 turns it off.
ALL_CPUS: set[int] = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if os.environ.get("MEDBLOOM_TEST_PIN", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return
    if not worker.startswith("gw") or count < 2 or len(ALL_CPUS) < count:
        return
    os.sched_setaffinity(0, sorted(ALL_CPUS)[int(worker[2:]) :: count])


@pytest.fixture
def all_cpus() -> Iterator[set[int]]:
    """The test (and what it starts) runs on every CPU this suite was given, not only its
    pytest worker's share: for tests of how medbloom spreads work over CPUs."""
    if not ALL_CPUS:
        yield ALL_CPUS
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        yield ALL_CPUS
    finally:
        os.sched_setaffinity(0, mine)


@pytest.fixture(autouse=True)
def _offline_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as medbloom's clients use; faster on a busy, shared CPU
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in a module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flower_cli_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's and medbloom's commands as separate processes:
    offline, no telemetry, a Flower home of the test's own, this venv's bin on PATH."""
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }


def end_process_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the process group of each process the test started (each in a session
    of its own), then SIGKILL those still there after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Any download attempt goes to a closed local port and fails at once, whether or not this
# machine is online: the missing-file case stays fast and deterministic.
OFFLINE = {
    k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
}


def medbloom_in_process(
    *args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """``medbloom.cli.main`` in this process with the environment test_cli_errors'
    ``medbloom`` runs it in: the same code path minus the 3 s interpreter start, for the many
    bad-input cases (a few run as real processes too)."""
    from medbloom.cli import main

    monkeypatch.chdir(cwd)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("MEDBLOOM_DATA_DIR", str(cwd / "no-default-data-root"))
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return medbloom_in_process(*args, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)

    return run


Cli = Callable[..., subprocess.CompletedProcess[str]]


def stop_after_round(cfg: Any, run_dir: Path, last: int) -> None:
    """Run ``cfg`` (a simulation) in ``run_dir`` and stop it, as Ctrl-C would, once
    round ``last`` is recorded."""
    import threading

    from medbloom.federation.server_app import RunInterrupted
    from medbloom.federation.simulation import run_simulation

    stop = threading.Event()

    def after(row: dict[str, Any]) -> None:
        if row["round"] == last:
            stop.set()

    with pytest.raises(RunInterrupted):
        run_simulation(cfg, run_dir, after, stop)
