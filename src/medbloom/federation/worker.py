"""A long-lived ClientApp process for one SuperNode (Flower's ``--isolation process``).

By default a Flower 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for
every message: Python, torch and Flower are imported again, the data is read and
partitioned again, the model is built again, every round (seen: 14-26 s a round
for a tiny model). With ``flower-supernode --isolation process`` the SuperNode
instead waits for an outside process to acquire each task from its Runtime API.
This module is that process: it acquires tasks in a loop and runs medbloom's
ClientApp in-process, so everything the ClientApp caches (data tensors, the
partition, the model) lives for the whole run.

It follows ``flwr.supernode.runtime.run_clientapp`` step by step (pull the task
input, run the app, push the reply and the task output, heartbeat meanwhile),
without the per-process parts (FAB installation, exit, signal handlers): the app
it runs is the installed medbloom, the same code the FAB carries.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Sequence

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from medbloom.federation.client_app import app as client_app
from medbloom.system import CpuTurns

log = logging.getLogger("medbloom.worker")


def _client(address: str, root_certificates: str | None, token: str | None) -> RuntimeHttpClient:
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(
    address: str, token: str, root_certificates: str | None = None, turns: CpuTurns | None = None
) -> bool:
    """Run one acquired ClientApp task in this process; True if the app succeeded.

    With ``turns`` the app runs in this process's turn on its CPU (see
    :class:`medbloom.system.CpuTurns`); pulling and pushing the messages does not wait.
    """
    client = _client(address, root_certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        started = time.monotonic()
        log.info("%s message received", message.metadata.message_type)
        with turns or contextlib.nullcontext():
            if turns is not None and turns.waited > 0.05:
                log.info("waited %.2f s for this CPU", turns.waited)
            reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        log.info(
            "%s reply ready after %.2f s", message.metadata.message_type, time.monotonic() - started
        )
    except Exception as ex:  # the error travels to the server as the reply
        log.exception("ClientApp raised an exception")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status == SubStatus.COMPLETED


def serve(
    address: str,
    root_certificates: str | None = None,
    poll: float = 0.05,
    wake: threading.Event | None = None,
    turns: CpuTurns | None = None,
) -> None:
    """Acquire and run ClientApp tasks from a SuperNode's Runtime API, forever.

    Without ``wake`` it asks every ``poll`` seconds. With it (the SuperNode runs in this
    process and sets it when a message has arrived) it asks when woken, and every
    ``poll`` seconds in case a wake-up was missed.
    """
    client = _client(address, root_certificates, None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log.info("waiting for ClientApp tasks from %s", address)
    while True:
        if wake is not None:
            wake.clear()  # before asking: a message stored after this wakes the wait below
        try:
            res = client.AcquireTask(request)
        except Exception as exc:  # the SuperNode may still be starting, or restarting
            log.debug("acquire failed: %s", exc)
            time.sleep(0.5)
            continue
        if res.HasField("task") and res.token:
            run_task(address, res.token, root_certificates, turns)
        elif wake is not None:
            wake.wait(poll)
        else:
            time.sleep(poll)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    parser.add_argument("--root-certificates", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    serve(args.runtime_api_address, args.root_certificates)


def setup_logging() -> None:
    """medbloom's messages at INFO; httpx would log every 50 ms poll, so only its warnings."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("medbloom").addHandler(handler)
    logging.getLogger("medbloom").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
