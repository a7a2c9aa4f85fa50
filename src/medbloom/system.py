"""Facts about the machine that several modules need."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as ``taskset`` or a container
    sets it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
