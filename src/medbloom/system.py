"""Facts about the machine that several modules need."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

ABLATE_VARIABLE = "MEDBLOOM_ABLATE"


def ablated(name: str) -> bool:
    """Whether the one-machine heuristic ``name`` (pin, turns, wake, polls, pulls,
    gates) is switched off for an ablation (``MEDBLOOM_ABLATE=name,name``;
    benchmarks/bench_deployment.py --ablate)."""
    return name in os.environ.get(ABLATE_VARIABLE, "").split(",")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as ``taskset`` or a container
    sets it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def longest_first(loads: list[float]) -> list[int]:
    """Job numbers, the largest load first (ties: the lower number): the order in
    which a queue of jobs on several workers finishes soonest, as a rule of thumb."""
    return sorted(range(len(loads)), key=lambda j: (-loads[j], j))


def pack_onto_cpus(loads: list[float], cpus: list[int]) -> list[int]:
    """A CPU for each job, so the CPUs' summed loads come out as even as possible.

    Longest job first onto the least loaded CPU (ties: the lower CPU); with at
    least as many CPUs as jobs, every job gets a CPU of its own.
    """
    if not cpus:
        raise ValueError("no CPUs to pack onto")
    total = {cpu: 0.0 for cpu in cpus}
    out = [cpus[0]] * len(loads)
    for job in longest_first(loads):
        cpu = min(cpus, key=lambda c: (total[c], c))
        out[job] = cpu
        total[cpu] += loads[job]
    return out


def pin_process(pid: int, cpus: set[int]) -> bool:
    """Restrict every thread of process ``pid`` to ``cpus``; threads it starts later
    inherit that. False where the process is gone or the platform cannot."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    pinned = False
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(tid, cpus)
            pinned = True
    return pinned


class CpuTurns:
    """Processes pinned to the same single CPU take turns at their work.

    ``with turns:`` waits until no other process that shares ``lock_dir`` holds this
    process's CPU, and holds it until the block ends. A process that may run on more
    than one CPU does not wait. Five training processes time-sliced on one core take
    longer than the same five one after the other (each refills the caches the
    others evicted): on the default experiment, ten hospitals pinned onto two cores
    used 19-21 CPU-s a round to train where the simulation's two workers use 16.
    The lock is an ``flock``: it is released when its process dies.
    """

    LOCK_FILE = "cpu{}.lock"  # in lock_dir, one per CPU

    def __init__(self, lock_dir: str | Path) -> None:
        self.lock_dir = Path(lock_dir)
        self._held: int | None = None
        self.waited = 0.0  # seconds the last turn waited for its CPU

    def __enter__(self) -> CpuTurns:
        self._held, self.waited = self._lock()
        return self

    def _lock(self) -> tuple[int | None, float]:
        """This process's CPU's lock once it has it (None: no turns to take), and
        the seconds it waited for it."""
        import fcntl

        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        if len(cpus) != 1:
            return None, 0.0
        (cpu,) = cpus
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_dir / self.LOCK_FILE.format(cpu), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None, 0.0  # no place for locks: run unordered, as without turns
        start = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, time.monotonic() - start

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._held is not None:
            os.close(self._held)  # closing the descriptor releases the flock
            self._held = None


def exit_without_teardown(code: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process at once.

    For a process whose work is written and whose children have ended: the
    interpreter's own teardown of torch and Flower costs 1.5-2 CPU-s, and no
    atexit handler of theirs has anything left to do.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
