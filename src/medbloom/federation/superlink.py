"""The server's process: Flower's own ``flower-superlink``, with its HTTP middlewares
applied only to the routes they act on.

Flower 1.41's SuperLink serves the Fleet API (the hospitals), the ServerApp's Runtime
API and the Control API (``flwr run``) from one FastAPI app, behind nine
``BaseHTTPMiddleware`` layers. Each layer costs every request a task, a memory stream
and a wrapped response, also where it only passes the request on: most of them act
on Control API routes alone, and a round is hundreds of Fleet and Runtime requests
(polls, message parts). With ten hospitals on two cores the SuperLink used 4.0 CPU-s
a round, taken from training; 2.8 with the gates below.

``python -m medbloom.federation.superlink`` (what ``medbloom launch`` and
``medbloom server`` start; same flags as ``flower-superlink``) puts each of those
layers behind a gate that sends a request past the layer only when the layer's own
code would have passed it on unchanged:

* the Control API layers (authentication, licence, event log, no-cache headers of
  the login routes) see every ``/v1/control/`` request, as before;
* the SuperNode authentication and the Fleet event log see every ``/v1/fleet/``
  request (the event log only when an event-log plugin is set);
* the tracing layer runs when ``FLWR_TRACING_ENABLED=1``, as Flower checks;
* the error translation and the protobuf translation, which act on every request,
  and any layer not listed here (extensions) are left as they are.

So every request meets the same checks as under ``flower-superlink``; what is
skipped is the cost of layers that do nothing for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import medbloom  # noqa: F401  (sets Flower's offline environment first)

CONTROL = "/v1/control/"
FLEET = "/v1/fleet/"

Scope = dict[str, Any]
Applies = Callable[[Scope], bool]


PATH_KEY = "medbloom.path"


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


def _tracing(scope: Scope) -> bool:
    return os.getenv("FLWR_TRACING_ENABLED") == "1"


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
    from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware

    rules: dict[Any, Applies] = {
        control.ControlAuthenticationMiddleware: _on_control,
        control.ControlLicenseMiddleware: _on_control,
        control.ControlEventLogMiddleware: _on_control,
        NodeAuthMiddleware: _on_fleet,
        FleetEventLogMiddleware: _fleet_event_log,
        RuntimeTracingMiddleware: _tracing,
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


def install() -> None:
    """Make the SuperLink app of this process use :func:`gated` middleware."""
    from flwr.superlink import main as app_module

    flower_middleware = app_module._get_middleware

    def middleware() -> list[Any]:
        return gated(flower_middleware())

    app_module._get_middleware = middleware


def install_on_supernode() -> None:
    """The same gate for the one layer of a SuperNode's Runtime API that can pass
    requests on unchanged (tracing; its other two translate every request)."""
    from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
    from flwr.supernode import main as app_module
    from starlette.middleware import Middleware

    if vars(app_module).get("RuntimeTracingMiddleware") is not RuntimeTracingMiddleware:
        return  # a Flower whose SuperNode app is built otherwise: leave it as it is
    tracing = Middleware(RuntimeTracingMiddleware)

    def gated_tracing(app: Any) -> Gate:
        return Gate(app, layer=tracing, applies=_tracing)

    # the name create_app adds (its module imported it from Flower's tracing module)
    vars(app_module)["RuntimeTracingMiddleware"] = gated_tracing


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``flower-superlink`` with the arguments given, its middleware gated."""
    from medbloom.system import ablated

    if not ablated("gates"):
        install()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
