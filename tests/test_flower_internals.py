"""medbloom's one module of Flower internals: what it relies on, and what it does on a
Flower it was not written for."""

from __future__ import annotations

import inspect
import time

import pytest

from medbloom.federation import flower_internals as fi


def test_every_assumption_about_the_installed_flower_holds() -> None:
    """Fails when the pinned Flower changes what a patch relies on: then read
    medbloom/federation/flower_internals.py against the new Flower before moving
    FLOWER_VERSION."""
    report = fi.assumption_report()
    assert len(report) >= 8
    said = "\n".join(
        f"{'holds' if ok else 'FAILS'}  {what}" + (f" ({why})" if why else "")
        for what, ok, why in report
    )
    print(said)  # which hold, in the test's output (pytest -rP, or -s)
    assert all(ok for _, ok, _ in report), "Flower changed under medbloom's patches:\n" + said
    assert fi.assumption_failures() == []


def test_a_flower_it_was_not_written_for_is_not_patched(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.superlink import main as superlink_main
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(fi, "INSTALLED_VERSION", "9.9.9")
    monkeypatch.setattr(fi, "_warned", False)
    middleware, pull = superlink_main._get_middleware, loop.pull_objects  # type: ignore[attr-defined]
    assert not fi.gate_superlink_middleware()
    assert not fi.on_message_stored(lambda: None)
    assert not fi.bound_pull_time(1.0)
    assert superlink_main._get_middleware is middleware
    assert loop.pull_objects is pull  # type: ignore[attr-defined]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1  # one line, once per process
    assert "Flower 9.9.9" in lines[0] and fi.FLOWER_VERSION in lines[0]


def test_the_worker_is_told_when_a_message_was_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)  # restored afterwards
    calls: list[str] = []
    assert fi.on_message_stored(lambda: calls.append("woken"))
    got = loop.pull_objects(["a"], lambda object_id: b"parts of " + object_id.encode())
    assert got == {"a": b"parts of a"} and calls == ["woken"]


def test_pulls_give_up_after_the_bound_and_report_the_object() -> None:
    """A reply whose parts never arrive (its hospital was killed while uploading) ends
    the pull after the bound with Flower's ObjectPullError, which the ServerApp's grid
    turns into that hospital's error reply; without a bound it waits hours."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    def never_there(object_id: str) -> bytes:
        raise iu.ObjectUnavailableError(object_id)

    default = inspect.signature(iu.pull_objects).parameters["max_time"].default
    assert fi.bound_pull_time(0.5)
    try:
        started = time.monotonic()
        with pytest.raises(iu.ObjectPullError):
            iu.pull_objects(["abc"], never_there)
        assert time.monotonic() - started < 3.0
    finally:
        fi.bound_pull_time(default)  # Flower's own, for the other tests in this process


def test_set_defaults_names_a_missing_parameter() -> None:
    def f(a: int, b: int = 1, *, c: int = 2) -> int:
        return a + b + c

    fi._set_defaults(f, b=3, c=5)
    assert f(0) == 8
    with pytest.raises(RuntimeError, match="nosuch"):
        fi._set_defaults(f, nosuch=1)


def test_the_supernode_loop_sleeps_as_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored afterwards
    slept: list[float] = []
    assert fi.supernode_sleeps(slept.append)
    loop.time.sleep(fi.SUPERNODE_IDLE_SLEEP)
    assert slept == [fi.SUPERNODE_IDLE_SLEEP]
    assert loop.time.monotonic() > 0  # the rest of the time module is there


def test_pull_backoff_is_shortened_in_flowers_own_functions() -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    fns = (iu.pull_objects, iu.pull_and_inflate_object_from_tree)
    names = ("initial_backoff", "backoff_cap", "max_tries_per_object")
    before = [fn.__kwdefaults__.copy() for fn in fns]  # type: ignore[union-attr]
    assert fi.shorten_pull_backoff()
    try:
        for fn in fns:
            params = inspect.signature(fn).parameters
            got = tuple(params[name].default for name in names)
            assert got == (fi.PULL_INITIAL_BACKOFF, fi.PULL_BACKOFF_CAP, fi.PULL_MAX_TRIES)
    finally:
        for fn, kw in zip(fns, before, strict=True):
            fn.__kwdefaults__ = kw
