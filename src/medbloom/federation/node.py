"""One hospital's process: a Flower SuperNode with medbloom's ClientApp inside it.

``medbloom node`` runs Flower's own ``flower-supernode`` (same flags) in process
isolation, plus, in a thread of the same process, the long-lived ClientApp worker
of :mod:`medbloom.federation.worker`. So each hospital is one process that keeps
its data, partition and model loaded for the whole run. The worker is woken when
the SuperNode has received a message, instead of polling the Runtime API over HTTP,
and the Runtime API's tracing layer is skipped unless tracing is on (both in
:mod:`medbloom.federation.flower_internals`).

Flower's SuperNode sleeps 3 s after each poll of the SuperLink that found no message,
and checks for its ClientApp's reply every 0.5 s. The hospital that trains longest
ends every round and polls right after its reply: with 3 s sleeps it hears of the next
round up to 3 s late, its CPU idle meanwhile. Here (:class:`PollSchedule`) the node
polls 0.1 s after each message, then less and less often (x1.25) down to once every
``--poll-interval`` seconds, and checks its own state every 0.05 s (no request). A
message part not there yet is asked for again after 0.05 s, not Flower's 1 s
(:func:`medbloom.federation.flower_internals.shorten_pull_backoff`).
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Sequence

import medbloom  # noqa: F401  (sets Flower's offline environment first)
from medbloom.federation import flower_internals
from medbloom.system import ablated, exit_without_teardown


class PollSchedule:
    """How long the SuperNode loop sleeps: ``fastest`` after a message came, growing by
    ``growth`` a poll up to ``slowest`` while none comes; ``local`` at most between
    checks of the node's own state."""

    def __init__(
        self,
        slowest: float = 1.0,
        fastest: float = 0.1,
        growth: float = 1.25,
        local: float = 0.05,
        sleeper: Callable[[float], None] = time.sleep,
    ) -> None:
        self.slowest = max(slowest, fastest)
        self.fastest = fastest
        self.growth = growth
        self.local = local
        self.idle = fastest
        self.sleeper = sleeper

    def message_received(self) -> None:
        self.idle = self.fastest

    def sleep(self, seconds: float) -> None:
        """Sleep where Flower's loop would sleep ``seconds``."""
        if seconds < flower_internals.SUPERNODE_IDLE_SLEEP:  # a check of its own state
            self.sleeper(min(seconds, self.local))
            return
        wait, self.idle = self.idle, min(self.slowest, self.idle * self.growth)
        self.sleeper(wait)


WAKE_FALLBACK = 2.0  # seconds between the ClientApp thread's asks when nothing woke it
UNWOKEN_POLL = 0.25  # seconds between its asks where it cannot be woken


def main(argv: Sequence[str] | None = None) -> None:
    """Parse medbloom's own flags, hand the rest to ``flower-supernode``."""
    parser = argparse.ArgumentParser(
        prog="medbloom node",
        description=__doc__.splitlines()[0],
        epilog="Other flags are flower-supernode's: --superlink, --insecure, "
        "--root-certificates, --auth-supernode-private-key, --node-config.",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="longest wait between polls of the SuperLink, in seconds (polls start 0.1 s "
        "after each message and slow down to this while none comes)",
    )
    parser.add_argument("--port", type=int, default=9094, help="this node's Runtime API port")

    args, rest = parser.parse_known_args(argv)
    if "--isolation" in rest:
        parser.error("--isolation is set by medbloom node (process)")
    if args.poll_interval <= 0:
        parser.error("--poll-interval must be > 0")
    from medbloom.federation.worker import serve, setup_logging

    setup_logging()
    if not ablated("pulls"):
        flower_internals.shorten_pull_backoff()
    wake = threading.Event()
    on_message = [] if ablated("wake") else [wake.set]
    if not ablated("polls"):
        schedule = PollSchedule(args.poll_interval)
        if flower_internals.supernode_sleeps(schedule.sleep):
            on_message.append(schedule.message_received)
    woken = flower_internals.on_message_stored(*on_message) and not ablated("wake")
    # The SuperNode's Runtime API listens on 127.0.0.1 in plain HTTP, also when its
    # link to the SuperLink uses TLS; only this process's own thread talks to it.
    threading.Thread(
        target=serve,
        args=(f"127.0.0.1:{args.port}",),
        kwargs={
            "poll": WAKE_FALLBACK if woken else UNWOKEN_POLL,
            "wake": wake if woken else None,
        },
        daemon=True,
        name="clientapp",
    ).start()
    ended_by = flower_internals.record_exit_signal()

    def stop_early(signum: int, frame: object) -> None:
        # a signal before Flower has put in its own handlers (it starts the Runtime API
        # first): leave as a stopped node does
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_early)
    try:
        flower_internals.run_supernode(["--isolation", "process", "--port", str(args.port), *rest])
    except SystemExit as exc:
        # Flower has run its exit handlers (Runtime API stopped) when it raises this.
        # What is left is the interpreter's teardown of torch and Flower: 1.5-2 CPU-s
        # a process, which with ten hospitals on two cores made a launch take 10 s to
        # stop. A node writes nothing but its log, so flush that and leave now.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        signum = ended_by() or (code - 128 if code in (130, 143) else 0)
        # stopped by a signal: exit as a shell reports it (143 for SIGTERM, 130 Ctrl-C)
        exit_without_teardown(128 + signum if signum else code)


if __name__ == "__main__":
    main()
