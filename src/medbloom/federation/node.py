"""One hospital's process: a Flower SuperNode with medbloom's ClientApp inside it.

``medbloom node`` runs Flower's own ``flower-supernode`` (same flags) in process
isolation, plus, in a thread of the same process, the long-lived ClientApp worker
of :mod:`medbloom.federation.worker`. So each hospital is one process that keeps
its data, partition and model loaded for the whole run.

The SuperNode polls the SuperLink for new messages every 3 s when idle and for its
ClientApp's reply every 0.5 s; both waits are fixed in Flower 1.41. Here they are
capped at ``--poll-interval`` (default 0.25 s), which removes about 2 s of latency
from every round. Polling costs CPU (an HTTP request each time, in every hospital
process): with ten hospitals on a 2-core machine, a 0.05 s interval spent more of the
machine on polling than it saved (measured in benchmarks/bench_deployment.py).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import types
from collections.abc import Sequence

import medbloom  # noqa: F401  (sets Flower's offline environment first)


def _fast_polling(interval: float) -> None:
    """Cap the sleeps in Flower's SuperNode main loop at ``interval`` seconds."""
    from flwr.supernode import start_client_internal as loop

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, interval))

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    names["sleep"] = sleep
    loop.time = types.SimpleNamespace(**names)  # type: ignore[attr-defined,assignment]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse medbloom's two flags, hand the rest to ``flower-supernode``."""
    parser = argparse.ArgumentParser(
        prog="medbloom node",
        description=__doc__.splitlines()[0],
        epilog="Other flags are flower-supernode's: --superlink, --insecure, "
        "--root-certificates, --auth-supernode-private-key, --node-config, --port.",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        help="seconds between polls of the SuperLink and of the local Runtime API",
    )
    parser.add_argument("--port", type=int, default=9094, help="this node's Runtime API port")
    args, rest = parser.parse_known_args(argv)
    if "--isolation" in rest:
        parser.error("--isolation is set by medbloom node (process)")
    from medbloom.federation.worker import serve, setup_logging

    setup_logging()
    # The SuperNode's Runtime API listens on 127.0.0.1 in plain HTTP, also when its
    # link to the SuperLink uses TLS; only this process's own thread talks to it.
    runtime = f"127.0.0.1:{args.port}"
    threading.Thread(
        target=serve, args=(runtime, None, args.poll_interval), daemon=True, name="clientapp"
    ).start()
    _fast_polling(args.poll_interval)

    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", "--isolation", "process", "--port", str(args.port), *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
