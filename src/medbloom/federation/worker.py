"""A long-lived ClientApp worker for one SuperNode (Flower's ``--isolation process``).

By default a Flower 1.42 SuperNode starts a fresh ``flwr-clientapp`` process for
every message: Python, torch and Flower are imported again, the data is read and
partitioned again, the model is built again, every round (seen: 14-26 s a round
for a tiny model). With ``flower-supernode --isolation process`` the SuperNode
instead waits for an outside process to acquire each task from its Runtime API.
This is that worker, run in a thread of the hospital process
(:mod:`medbloom.federation.node`): it acquires tasks in a loop and runs medbloom's
ClientApp in-process, so everything the ClientApp caches (data tensors, the
partition, the model) lives for the whole run. The app it runs is the installed
medbloom, the same code the FAB carries.
"""

from __future__ import annotations

import logging
import threading
import time

from flwr.app import Context, Message

from medbloom.federation import flower_internals
from medbloom.federation.client_app import app as client_app

log = logging.getLogger("medbloom.worker")


def run_task(address: str, token: str, root_certificates: str | None = None) -> bool:
    """Run one acquired ClientApp task in this process; True if the app succeeded."""

    def handle(message: Message, context: Context) -> Message:
        started = time.monotonic()
        kind = message.metadata.message_type
        log.info("%s message received", kind)
        reply = client_app(message=message, context=context)
        log.info("%s reply ready after %.2f s", kind, time.monotonic() - started)
        return reply

    return flower_internals.run_clientapp_task(address, token, handle, root_certificates)


def serve(
    address: str,
    root_certificates: str | None = None,
    poll: float = 0.05,
    wake: threading.Event | None = None,
) -> None:
    """Acquire and run ClientApp tasks from a SuperNode's Runtime API, forever.

    Without ``wake`` it asks every ``poll`` seconds. With it (the SuperNode runs in this
    process and sets it when a message has arrived) it asks when woken, and every
    ``poll`` seconds in case a wake-up was missed.
    """
    acquire = flower_internals.task_acquirer(address, root_certificates)
    log.info("waiting for ClientApp tasks from %s", address)
    while True:
        if wake is not None:
            wake.clear()  # before asking: a message stored after this wakes the wait below
        try:
            token = acquire()
        except Exception as exc:  # the SuperNode may still be starting, or restarting
            log.debug("acquire failed: %s", exc)
            time.sleep(0.5)
            continue
        if token:
            run_task(address, token, root_certificates)
        elif wake is not None:
            wake.wait(poll)
        else:
            time.sleep(poll)


def setup_logging() -> None:
    """medbloom's messages at INFO; httpx would log every 50 ms poll, so only its warnings."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("medbloom").addHandler(handler)
    logging.getLogger("medbloom").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
