"""One hospital's process: a Flower SuperNode with medbloom's ClientApp inside it.

``medbloom node`` runs Flower's own ``flower-supernode`` (same flags) in process
isolation, plus, in a thread of the same process, the long-lived ClientApp worker
of :mod:`medbloom.federation.worker`. So each hospital is one process that keeps
its data, partition and model loaded for the whole run. The worker is woken when
the SuperNode has received a message, instead of polling the Runtime API over HTTP,
and the Runtime API's tracing layer is skipped unless tracing is on (both in
:mod:`medbloom.federation.flower_internals`).

With ``--cpu-turns`` (hospitals sharing one machine, set by ``medbloom launch``) a
hospital pinned to a single CPU trains only when no other hospital pinned to that
CPU does (:class:`medbloom.system.CpuTurns`).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence

import medbloom  # noqa: F401  (sets Flower's offline environment first)
from medbloom.system import CpuTurns, ablated, exit_without_teardown

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
    parser.add_argument("--port", type=int, default=9094, help="this node's Runtime API port")
    parser.add_argument(
        "--cpu-turns",
        metavar="DIR",
        default=None,
        help="for hospitals that share one machine (medbloom launch sets it): while this "
        "process is pinned to a single CPU, it trains only when no other node using DIR "
        "and pinned to that CPU does",
    )

    args, rest = parser.parse_known_args(argv)
    if "--isolation" in rest:
        parser.error("--isolation is set by medbloom node (process)")
    from medbloom.federation import flower_internals
    from medbloom.federation.worker import serve, setup_logging

    setup_logging()
    if not ablated("gates"):
        flower_internals.gate_supernode_tracing()
    wake = threading.Event()
    woken = not ablated("wake") and flower_internals.on_message_stored(wake.set)
    turns = CpuTurns(args.cpu_turns) if args.cpu_turns and not ablated("turns") else None
    # The SuperNode's Runtime API listens on 127.0.0.1 in plain HTTP, also when its
    # link to the SuperLink uses TLS; only this process's own thread talks to it.
    threading.Thread(
        target=serve,
        args=(f"127.0.0.1:{args.port}",),
        kwargs={
            "poll": WAKE_FALLBACK if woken else UNWOKEN_POLL,
            "wake": wake if woken else None,
            "turns": turns,
        },
        daemon=True,
        name="clientapp",
    ).start()
    try:
        flower_internals.run_supernode(["--isolation", "process", "--port", str(args.port), *rest])
    except SystemExit as exc:
        # Flower has run its exit handlers (Runtime API stopped) when it raises this.
        # What is left is the interpreter's teardown of torch and Flower: 1.5-2 CPU-s
        # a process, which with ten hospitals on two cores made a launch take 10 s to
        # stop. A node writes nothing but its log, so flush that and leave now.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        exit_without_teardown(code)


if __name__ == "__main__":
    main()
