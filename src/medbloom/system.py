"""Facts about the machine that several modules need."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

ABLATE_VARIABLE = "MEDBLOOM_ABLATE"


def ablated(name: str) -> bool:
    """Whether the one-machine heuristic ``name`` (pin, wake, polls, pulls, gates) is
    switched off for an ablation (``MEDBLOOM_ABLATE=name,name``;
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
