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


def run_forwarding_signals(
    cmd: list[str], env: dict[str, str] | None = None, grace: float = 10.0
) -> int:
    """Run ``cmd`` as a child and wait for it; SIGTERM and SIGINT sent to this process
    are passed on to the child, which then shuts down as it would on its own, so
    stopping the parent (a scheduler, ``systemd``, ``timeout``, ``kill``) never leaves
    the child running. A child still running ``grace`` seconds after the first signal
    is killed. Returns the exit code as a shell reports it: 143 (128 + SIGTERM) when
    this process was asked to stop by SIGTERM, 128 + N when signal N ended the child."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env)
    received: list[tuple[int, float]] = []

    def forward(signum: int, frame: object) -> None:
        received.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > grace:
                    proc.kill()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if received and received[0][0] == signal.SIGTERM:
        return 128 + signal.SIGTERM
    return 128 - code if code < 0 else code
