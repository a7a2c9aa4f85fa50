"""Every use of Flower beyond its public API, in one place.

medbloom's apps use Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.simulation``). A few things it needs are not offered there,
and each depends on how Flower 1.42 is built inside:

* the long-lived ClientApp worker of a hospital process runs tasks as Flower's own
  ``flwr-clientapp`` does, with the functions of ``flwr.supernode.runtime``
  (:func:`task_acquirer`, :func:`run_clientapp_task`);
* the worker is woken when the SuperNode has stored a message, instead of polling its
  Runtime API (:func:`on_message_stored`: wraps the SuperNode loop's ``pull_objects``);
* the SuperNode polls sooner than every 3 s (:func:`supernode_sleeps`: the loop
  module's ``time``);
* the SuperLink's HTTP middleware layers act only on the routes they act on
  (:func:`gate_superlink_middleware`: replaces ``flwr.superlink.main._get_middleware``);
* a pull of a message part that is not there yet is retried after 0.05 s, not 1 s
  (:func:`shorten_pull_backoff`), and a pull of a reply's parts gives up after the
  round's timeout, not after Flower's two hours (:func:`bound_pull_time`; both set
  defaults of Flower's pull functions);
* an error Flower makes up for a reply it could not pull is attributed to the hospital
  (:func:`attribute_error_reply`: the message metadata's private source node);
* whether a grid is the Simulation Engine's (:func:`is_simulation_grid`);
* the record layout of a legacy ``FitRes``, which Flower's ``secaggplus_mod`` reads the
  update to mask from (:func:`legacy_fit_result`: ``flwr.compat``'s converter).

The patches (everything but the worker's task functions, which are imported) are
applied only on the Flower version they were written for, :data:`FLOWER_VERSION`. On
any other version each says so in one line on standard error, once, and medbloom runs
on Flower's own behaviour: correct, slower on one machine. The worker's task functions
cannot be left out that way: on a Flower that moved them, a hospital process fails at
its first task with the ImportError, naming what is gone. ``tests/test_flower_internals.py``
checks every assumption listed in :func:`assumption_failures` against the installed
Flower, so a change of the pin that breaks one fails loudly there.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Context, Message

FLOWER_VERSION = "1.42.0"  # the version every patch here was written for and tested on
INSTALLED_VERSION = importlib.metadata.version("flwr")

log = logging.getLogger("medbloom.worker")
_warned = False


def patching() -> bool:
    """Whether patches apply: the installed Flower is the one they were written for.
    Otherwise say so once per process, on one line."""
    global _warned
    if INSTALLED_VERSION == FLOWER_VERSION:
        return True
    if not _warned:
        _warned = True
        print(
            f"medbloom: warning: Flower {INSTALLED_VERSION} is installed, medbloom's patches "
            f"are for Flower {FLOWER_VERSION}: not applying them (Flower's own behaviour)",
            file=sys.stderr,
            flush=True,
        )
    return False


# --------------------------------------------------------------------------------------
# Entry points of Flower's own processes
# --------------------------------------------------------------------------------------


def run_superlink(argv: Sequence[str]) -> None:
    """``flower-superlink ARGV`` in this process."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


def run_supernode(argv: Sequence[str]) -> None:
    """``flower-supernode ARGV`` in this process."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def clip_zero_updates() -> bool:
    """Let Flower's fixed clipping pass an update of norm 0 (a hospital whose model did
    not move: under hospital-level DP noise a saturated network can have gradients that
    are exactly 0) instead of dividing by it: ``clip_inputs_inplace`` scales by
    ``min(1, clip / norm)`` and raised ZeroDivisionError, ending the run. A zero update
    clipped is itself. Returns whether the patch applied."""
    module = importlib.import_module("flwr.supercore.differential_privacy")
    original = getattr(module, "clip_inputs_inplace", None)
    if original is None or getattr(original, "_medbloom", False):
        return original is not None

    def clip_inputs_inplace(input_arrays: Any, clipping_norm: float) -> None:
        if module.get_norm(input_arrays) == 0:
            return
        original(input_arrays, clipping_norm)

    clip_inputs_inplace._medbloom = True  # type: ignore[attr-defined]
    module.clip_inputs_inplace = clip_inputs_inplace  # type: ignore[attr-defined]
    return True


def record_exit_signal() -> Callable[[], int | None]:
    """Have Flower's signal handler (SuperLink, SuperNode) remember the signal that made
    it exit; return a function that gives it (None: no signal). Flower exits with code
    0 after a SIGTERM or SIGINT, where a shell, ``timeout`` or a scheduler expects 143
    or 130 (128 + the signal)."""
    module = importlib.import_module("flwr.supercore.exit.signal_handler")
    signal_of = {int(code): int(sig) for sig, code in module.SIGNAL_TO_EXIT_CODE.items()}
    original = module.flwr_exit
    seen: list[int] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        code = kwargs.get("code", args[0] if args else None)
        if code in signal_of:
            seen.append(signal_of[code])
        return original(*args, **kwargs)

    module.flwr_exit = recording  # type: ignore[attr-defined]
    return lambda: seen[0] if seen else None


# --------------------------------------------------------------------------------------
# The ClientApp worker's side of Flower's Runtime API (process isolation)
# --------------------------------------------------------------------------------------


def _runtime_client(address: str, root_certificates: str | None, token: str | None) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def task_acquirer(address: str, root_certificates: str | None = None) -> Callable[[], str | None]:
    """A function that asks the SuperNode's Runtime API at ``address`` for a ClientApp
    task: the task's token, or None when there is none (it raises while the SuperNode
    is unreachable)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = _runtime_client(address, root_certificates, None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def acquire() -> str | None:
        res = client.AcquireTask(request)
        return str(res.token) if res.HasField("task") and res.token else None

    return acquire


def run_clientapp_task(
    address: str,
    token: str,
    handle: Callable[[Message, Context], Message],
    root_certificates: str | None = None,
) -> bool:
    """Run one acquired task in this process, as ``flwr.supernode.runtime.run_clientapp``
    does without its per-process parts (FAB installation, exit, signal handlers): pull
    the task input, ``handle`` it, push the reply and the task output, heartbeat
    meanwhile. An exception from ``handle`` travels to the server as an error reply.
    True if ``handle`` succeeded."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(address, root_certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        reply = handle(message, context)
        status, details = SubStatus.COMPLETED, ""
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
    return bool(status == SubStatus.COMPLETED)


# --------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------


def on_message_stored(*callbacks: Callable[[], None]) -> bool:
    """Call ``callbacks`` whenever this process's SuperNode has stored an incoming message
    and its parts (``pull_objects`` is the loop's last step of receiving one). False
    where not patched."""
    if not patching():
        return False
    from flwr.supernode import start_client_internal as loop

    pull_objects = loop.pull_objects  # type: ignore[attr-defined]

    def pull_then_call(*args: Any, **kwargs: Any) -> Any:
        try:
            return pull_objects(*args, **kwargs)
        finally:
            for callback in callbacks:
                callback()

    loop.pull_objects = pull_then_call  # type: ignore[attr-defined]
    return True


SUPERNODE_IDLE_SLEEP = 3.0  # Flower 1.42's sleep between polls when no message came
SUPERNODE_REPLY_CHECK = 0.5  # its sleep between checks for the ClientApp's reply


def supernode_sleeps(sleep: Callable[[float], None]) -> bool:
    """Make this process's SuperNode loop call ``sleep(seconds)`` where it would call
    ``time.sleep(seconds)``: :data:`SUPERNODE_IDLE_SLEEP` between polls of the SuperLink,
    :data:`SUPERNODE_REPLY_CHECK` between checks of its own state. False where not
    patched."""
    if not patching():
        return False
    import time
    import types

    from flwr.supernode import start_client_internal as loop

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    loop.time = types.SimpleNamespace(**{**names, "sleep": sleep})  # type: ignore[attr-defined,assignment]
    return True


def _set_defaults(fn: Callable[..., Any], **values: object) -> None:
    """Replace keyword defaults of ``fn`` by name (positional and keyword-only)."""
    params = inspect.signature(fn).parameters
    missing = set(values) - set(params)
    if missing:
        raise RuntimeError(f"{fn.__qualname__} has no parameters {sorted(missing)}")
    positional = [
        p.name
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    ]
    if fn.__defaults__:
        defaults = list(fn.__defaults__)
        for i, name in enumerate(positional):
            if name in values:
                defaults[i] = values[name]
        fn.__defaults__ = tuple(defaults)
    kw = dict(fn.__kwdefaults__ or {})
    kw.update({k: v for k, v in values.items() if k in kw})
    fn.__kwdefaults__ = kw or None


def _set_pull_defaults(**values: object) -> None:
    """The same defaults for both of Flower's pull functions, which every caller in
    Flower uses."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    _set_defaults(iu.pull_objects, **values)
    _set_defaults(iu.pull_and_inflate_object_from_tree, **values)


def bound_pull_time(seconds: float) -> bool:
    """Give up pulling a message's parts after ``seconds`` (Flower's default: 2 hours).

    A hospital killed while it uploads its reply leaves the reply registered at the
    SuperLink and its parts missing; the ServerApp, pulling them, would wait until
    the SuperLink drops the upload (about 3 minutes) however short ``--round-timeout``
    is. Flower then turns the reply into an error, which the round records as that
    hospital's failure. False where not patched.
    """
    if not patching():
        return False
    _set_pull_defaults(max_time=seconds)
    return True


PULL_INITIAL_BACKOFF = 0.05
PULL_BACKOFF_CAP = 1.0
PULL_MAX_TRIES = 10_000  # Flower's 500 tries at up to 10 s each, at up to 1 s each


def shorten_pull_backoff() -> bool:
    """Ask again for a message part that is not there yet after 0.05 s, doubling to at
    most 1 s, instead of Flower's 1, 2, 4, 8, 10 s (more tries, so the longest wait for
    one object stays what Flower allows).

    In a round that is the common case: a receiver hears of a message as soon as it is
    registered, before its parts have arrived (a SuperNode's ClientApp asks while the
    SuperNode still pulls them; the ServerApp asks for a reply's parts while the
    hospital still pushes them), and each such wait cost up to a second a round, on
    the critical path. False where not patched.
    """
    if not patching():
        return False
    _set_pull_defaults(
        initial_backoff=PULL_INITIAL_BACKOFF,
        backoff_cap=PULL_BACKOFF_CAP,
        max_tries_per_object=PULL_MAX_TRIES,
    )
    return True


def attribute_error_reply(reply: Message, node_id: int) -> None:
    """An error Flower made up for a reply it could not pull names the ServerApp as its
    sender: name hospital ``node_id`` instead, so the failure is recorded against it."""
    if reply.has_error() and reply.metadata.src_node_id != node_id and patching():
        reply.metadata.__dict__["_src_node_id"] = node_id


def legacy_fit_result(update: list[Any], num_examples: int) -> Any:
    """A RecordDict holding ``update`` (numpy arrays) and ``num_examples`` as Flower's
    legacy ``FitRes``, the layout ``secaggplus_mod`` reads a hospital's update from."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, {})
    return fitres_to_recorddict(result, keep_input=False)


def is_simulation_grid(grid: object) -> bool:
    """Whether ``grid`` is the Simulation Engine's, held in this process."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


# The SuperLink's middleware, applied where it acts.
#
# Flower 1.42's SuperLink serves the Fleet API (the hospitals), the ServerApp's Runtime
# API and the Control API (``flwr run``) from one FastAPI app, behind eight
# ``BaseHTTPMiddleware`` layers (1.41 had a ninth, for tracing, which 1.42 removed, and the
# SuperNode's tracing layer with it). Each layer costs every request a task, a memory
# stream and a wrapped response, also where it only passes the request on: most of them
# act on Control API routes alone, and a round is hundreds of Fleet and Runtime requests
# (polls, message parts). With ten hospitals on two cores, on Flower 1.41, the SuperLink
# used 4.0 CPU-s a round, taken from training; 2.8 with the gates below. Each layer that
# can be skipped is put behind a gate that sends a request past it only when its own code
# would have passed the request on unchanged:
#
# * the Control API layers (authentication, licence, event log, no-cache headers of the
#   login routes) see every ``/v1/control/`` request, as before;
# * the SuperNode authentication and the Fleet event log see every ``/v1/fleet/`` request
#   (the event log only when an event-log plugin is set);
# * the error translation and the protobuf translation, which act on every request, and
#   any layer not listed here (extensions) are left as they are.

CONTROL = "/v1/control/"
FLEET = "/v1/fleet/"
PATH_KEY = "medbloom.path"

Scope = dict[str, Any]
Applies = Callable[[Scope], bool]


def _path(scope: Scope) -> str:
    """The path as the middlewares see it (``request.url.path``), worked out once
    per request: the gates of one request share its scope."""
    path = scope.get(PATH_KEY)
    if path is None:
        from starlette.requests import Request

        path = scope[PATH_KEY] = str(Request(scope).url.path)
    return str(path)


def _on_control(scope: Scope) -> bool:
    return _path(scope).startswith(CONTROL)


def _on_fleet(scope: Scope) -> bool:
    return _path(scope).startswith(FLEET)


def _fleet_event_log(scope: Scope) -> bool:
    app = scope.get("app")
    plugin = getattr(getattr(app, "state", None), "fleet_event_log_plugin", None)
    return plugin is not None and _on_fleet(scope)


class Gate:
    """ASGI middleware: HTTP requests go through ``layer`` where ``applies(scope)``,
    straight to the inner app elsewhere; other scopes (lifespan) through ``layer``."""

    def __init__(self, app: Any, layer: Any, applies: Applies) -> None:
        cls, args, kwargs = layer
        self.app = app
        self.layer = cls(app, *args, **kwargs)
        self.applies = applies

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.applies(scope):
            await self.app(scope, receive, send)
        else:
            await self.layer(scope, receive, send)


def _rules() -> dict[Any, Applies]:
    """Flower's middleware classes -> when each one acts (checked against Flower's
    own route lists, so a Flower that changes them leaves that layer ungated)."""
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware

    rules: dict[Any, Applies] = {
        control.ControlAuthenticationMiddleware: _on_control,
        control.ControlLicenseMiddleware: _on_control,
        control.ControlEventLogMiddleware: _on_control,
        NodeAuthMiddleware: _on_fleet,
        FleetEventLogMiddleware: _fleet_event_log,
    }
    if all(path.startswith(CONTROL) for _, path in control.CONTROL_SENSITIVE_ROUTE_KEYS):
        rules[control.ControlSensitiveResponseMiddleware] = _on_control
    return rules


def gated(middleware: Sequence[Any]) -> list[Any]:
    """Flower's middleware list with the layers of :func:`_rules` behind gates."""
    from starlette.middleware import Middleware

    rules = _rules()
    out = []
    for layer in middleware:
        applies = rules.get(layer.cls)
        out.append(layer if applies is None else Middleware(Gate, layer=layer, applies=applies))
    return out


def gate_superlink_middleware() -> bool:
    """Make the SuperLink app of this process use :func:`gated` middleware. False
    where not patched."""
    if not patching():
        return False
    from flwr.superlink import main as app_module

    flower_middleware = app_module._get_middleware

    def middleware() -> list[Any]:
        return gated(flower_middleware())

    app_module._get_middleware = middleware
    return True


# --------------------------------------------------------------------------------------
# What the code above relies on
# --------------------------------------------------------------------------------------


def assumption_failures() -> list[str]:
    """Each way the installed Flower differs from what this module relies on, in words
    (empty: every assumption holds). tests/test_flower_internals.py asserts it is empty."""
    return [
        what + (f" ({detail})" if detail else "")
        for what, holds, detail in assumption_report()
        if not holds
    ]


def assumption_report() -> list[tuple[str, bool, str]]:
    """Every assumption this module makes about the installed Flower: (what, whether it
    holds, why not). ``python -m medbloom.federation.flower_internals`` prints it."""
    report: list[tuple[str, bool, str]] = []

    def check(what: str, ok: Callable[[], object]) -> None:
        try:
            report.append((what, bool(ok()), ""))
        except Exception as exc:  # an import or attribute that is gone
            report.append((what, False, f"{type(exc).__name__}: {exc}"))

    def params(fn: Callable[..., Any]) -> set[str]:
        return set(inspect.signature(fn).parameters)

    def has(module: str, *names: str) -> bool:
        mod = importlib.import_module(module)
        return all(hasattr(mod, name) for name in names)

    check(f"Flower {FLOWER_VERSION} is installed", lambda: INSTALLED_VERSION == FLOWER_VERSION)
    check(
        "the SuperNode loop receives a message's parts with its module's pull_objects",
        lambda: (
            has("flwr.supernode.start_client_internal", "pull_objects")
            and "pull_objects"
            in inspect.getsource(
                importlib.import_module(
                    "flwr.supernode.start_client_internal"
                )._pull_and_store_message
            )
        ),
    )

    def loop_source() -> str:
        return inspect.getsource(importlib.import_module("flwr.supernode.start_client_internal"))

    def pulls() -> Any:
        return importlib.import_module("flwr.supercore.inflatable.inflatable_utils")

    check(
        "the SuperNode loop sleeps with its module's time.sleep, 3 s idle and 0.5 s for replies",
        lambda: (
            f"time.sleep({SUPERNODE_IDLE_SLEEP:g})" in loop_source()
            and f"time.sleep({SUPERNODE_REPLY_CHECK:g})" in loop_source()
        ),
    )
    pull_parameters = {"max_time", "initial_backoff", "backoff_cap", "max_tries_per_object"}
    check(
        f"Flower's pull functions take {sorted(pull_parameters)}",
        lambda: (
            pull_parameters <= params(pulls().pull_objects)
            and pull_parameters <= params(pulls().pull_and_inflate_object_from_tree)
        ),
    )
    check(
        "message metadata keeps its source node in _src_node_id",
        lambda: "_src_node_id" in vars(_metadata()),
    )
    check(
        "the SuperLink app builds its middleware with flwr.superlink.main._get_middleware",
        lambda: (
            has("flwr.superlink.main", "_get_middleware")
            and "_get_middleware()"
            in inspect.getsource(importlib.import_module("flwr.superlink.main"))
        ),
    )
    check(
        "every gated middleware class exists, the control ones in CONTROL_SENSITIVE_ROUTE_KEYS",
        lambda: len(_rules()) == 6,
    )
    check(
        "flwr.supernode.runtime.run_clientapp has the task functions the worker calls",
        lambda: has(
            "flwr.supernode.runtime.run_clientapp",
            "pull_task_input",
            "push_message",
            "push_task_output",
        ),
    )
    check(
        "Flower's fixed clipping calls its module's clip_inputs_inplace, which divides by "
        "the update's norm (get_norm)",
        lambda: (
            has("flwr.supercore.differential_privacy", "clip_inputs_inplace", "get_norm")
            and "clip_inputs_inplace(model_update"
            in inspect.getsource(
                importlib.import_module(
                    "flwr.supercore.differential_privacy"
                ).compute_clip_model_update
            )
        ),
    )
    check(
        "Flower's signal handler exits through its module's flwr_exit, with a code from "
        "SIGNAL_TO_EXIT_CODE",
        lambda: (
            has("flwr.supercore.exit.signal_handler", "flwr_exit", "SIGNAL_TO_EXIT_CODE")
            and "code=SIGNAL_TO_EXIT_CODE[signalnum]"
            in inspect.getsource(importlib.import_module("flwr.supercore.exit.signal_handler"))
        ),
    )
    check(
        "the simulation grid is flwr.superlink.grid.InMemoryGrid",
        lambda: has("flwr.superlink.grid", "InMemoryGrid"),
    )
    return report


def _metadata() -> Any:
    """A message metadata object, built as Flower builds one."""
    from flwr.app import MessageType, Metadata

    fields: dict[str, Any] = {
        name: 0 if p.annotation in ("int", "float") else ""
        for name, p in inspect.signature(Metadata).parameters.items()
        if p.default is p.empty
    }
    return Metadata(**{**fields, "message_type": MessageType.QUERY})


if __name__ == "__main__":
    for what, holds, detail in assumption_report():
        print(f"{'holds' if holds else 'FAILS'}  {what}" + (f" ({detail})" if detail else ""))
