"""The SuperLink of medbloom.federation.superlink: Flower's middleware, applied where it acts.

A gated layer must see every request its own code acts on, and a request it would
only have passed on must get the same answer without it. Checked on a small ASGI
app, on Flower's own middleware list, and on real SuperLink processes: the same
requests to ``flower-superlink`` and to medbloom's get the same answers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

from medbloom.federation.flower_internals import Gate, _on_control, _on_fleet, gated
from medbloom.launch import flower_env, free_port, wait_for_port


def _call(app: Any, path: str, body: bytes = b"", scope_type: str = "http") -> list[Any]:
    """Send one request (or a lifespan start-up) to an ASGI app; the messages it sent."""
    scope: dict[str, Any] = {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
    }
    sent: list[Any] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    if scope_type == "lifespan":
        incoming = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def _body(sent: list[Any]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _recording_app(seen: list[str]) -> Any:
    """An endpoint that echoes the body, behind a recording layer gated on the
    Control API and an outer layer that reads the body first (as Flower's protobuf
    translation does)."""

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            seen.append("endpoint:lifespan")
            return
        body = await Request(scope, receive).body()
        await Response(b"echo:" + body)(scope, receive, send)

    async def record(request: Request, call_next: Any) -> Response:
        seen.append("control-layer:" + request.url.path)
        response: Response = await call_next(request)
        response.headers["x-control"] = "1"
        return response

    async def read_body(request: Request, call_next: Any) -> Response:
        await request.body()
        response: Response = await call_next(request)
        return response

    inner = Gate(
        endpoint, layer=Middleware(BaseHTTPMiddleware, dispatch=record), applies=_on_control
    )
    return BaseHTTPMiddleware(inner, dispatch=read_body)


def test_a_gated_layer_sees_its_routes_and_only_those() -> None:
    seen: list[str] = []
    app = _recording_app(seen)
    control = _call(app, "/v1/control/list-runs", b"abc")
    fleet = _call(app, "/v1/fleet/pull-messages", b"xyz")
    assert seen == ["control-layer:/v1/control/list-runs"]
    # both got the endpoint's answer, the body intact after the outer layer read it
    assert _body(control) == b"echo:abc" and _body(fleet) == b"echo:xyz"
    headers = {k: dict(m.get("headers", [])) for k, m in (("c", control[0]), ("f", fleet[0]))}
    assert headers["c"].get(b"x-control") == b"1"
    assert b"x-control" not in headers["f"]


def test_other_scopes_always_go_through_the_layer() -> None:
    seen: list[str] = []

    async def layer_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append("layer:" + scope["type"])
        await receive()

    class Layer:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await layer_app(scope, receive, send)

    async def never(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("a lifespan scope skipped the layer")

    _call(
        Gate(never, layer=Middleware(Layer), applies=lambda scope: False),
        "/",
        scope_type="lifespan",
    )
    assert seen == ["layer:lifespan"]


def test_the_gates_follow_the_paths() -> None:
    def scope(path: str) -> dict[str, Any]:
        return {"type": "http", "path": path, "headers": [], "server": ("127.0.0.1", 80)}

    assert _on_control(scope("/v1/control/start-run"))
    assert not _on_control(scope("/v1/fleet/pull-messages"))
    assert _on_fleet(scope("/v1/fleet/pull-messages"))
    assert not _on_fleet(scope("/v1/runtime/pull-messages"))
    assert not _on_fleet(scope("/v1/fleetx/pull-messages"))


def test_flowers_translation_layers_stay_on_every_route() -> None:
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.superlink.main import _get_middleware

    flower = _get_middleware()
    ours = gated(flower)
    assert len(ours) == len(flower)
    kept = [m for m in ours if m.cls is not Gate]
    # the error translation (a dispatch function) and the protobuf translation
    assert {m.cls for m in kept} == {BaseHTTPMiddleware, ProtobufTranslationMiddleware}
    gated_names = sorted(m.kwargs["layer"].cls.__name__ for m in ours if m.cls is Gate)
    assert gated_names == sorted(
        [
            "ControlSensitiveResponseMiddleware",
            "ControlAuthenticationMiddleware",
            "ControlLicenseMiddleware",
            "ControlEventLogMiddleware",
            "NodeAuthMiddleware",
            "FleetEventLogMiddleware",
        ]
    )
    # the order, outermost first, is Flower's
    unwrapped = [m.kwargs["layer"].cls if m.cls is Gate else m.cls for m in ours]
    assert unwrapped == [m.cls for m in flower]


# Requests no client of Flower would send, so each is answered by one of the layers.
PROBES = [
    ("GET", "/health", b"", None),
    ("POST", "/v1/fleet/pull-messages", b"", "application/protobuf"),
    ("POST", "/v1/fleet/pull-messages", b"\x08\x01", "application/json"),
    ("POST", "/v1/fleet/pull-messages", b"\xff\xff\xff", "application/protobuf"),
    ("POST", "/v1/fleet/push-object", b"", "application/protobuf"),
    ("POST", "/v1/runtime/get-nodes", b"", "application/protobuf"),
    ("POST", "/v1/runtime/pull-messages", b"", "application/protobuf"),
    ("POST", "/v1/control/list-runs", b"", "application/protobuf"),
    ("POST", "/v1/control/get-login-details", b"", "application/protobuf"),
    ("POST", "/v1/nowhere", b"", "application/protobuf"),
]


def _answers(port: int) -> list[tuple[int, str, bytes]]:
    out = []
    for method, path, body, ctype in PROBES:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=body or None, method=method
        )
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                status, headers, content = res.status, res.headers, res.read()
        except urllib.error.HTTPError as err:
            status, headers, content = err.code, err.headers, err.read()
        cache = headers.get("Cache-Control", "")
        # list-runs answers with the time of the request: compare its shape
        out.append((status, cache, re.sub(rb"[0-9]", b"0", content)))
    return out


@pytest.mark.slow
def test_medblooms_superlink_answers_as_flowers_does(tmp_path: Path) -> None:
    answers = {}
    for name, cmd in (
        ("flower", [str(Path(sys.executable).with_name("flower-superlink"))]),
        ("medbloom", [sys.executable, "-m", "medbloom.federation.superlink"]),
    ):
        home = tmp_path / name
        home.mkdir()
        port = free_port()
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [
                *cmd,
                "--insecure",
                "--isolation",
                "process",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower_env(home),
            cwd=home,
            start_new_session=True,
        )
        try:
            wait_for_port(port, proc, 60, name)
            answers[name] = _answers(port)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        time.sleep(0.1)
    assert answers["medbloom"] == answers["flower"]
    statuses = [status for status, _, _ in answers["flower"]]
    assert statuses[0] == 200  # the probes reached the app
    assert {401, 415, 400, 404} <= set(statuses)  # and layers answered errors
    assert ("no-store" in answers["flower"][8][1]) and PROBES[8][1].endswith("login-details")
