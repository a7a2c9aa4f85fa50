"""The hospital process's changes to Flower's SuperNode loop and object pulls."""

from __future__ import annotations

import inspect
import itertools

import pytest

from medbloom.federation.node import IDLE_POLL, LOCAL_CHECK, Pacer
from medbloom.federation.pulls import BACKOFF_CAP, INITIAL_BACKOFF, MAX_TRIES, _set_defaults


def test_pacer_polls_fast_after_a_message_and_slows_down_when_idle() -> None:
    pacer = Pacer(slowest=1.0)
    waits = [pacer.wait(IDLE_POLL) for _ in range(20)]
    assert waits[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in itertools.pairwise(waits))
    assert waits[-1] == pytest.approx(1.0)
    assert sum(waits[:5]) < 1.0  # a node that replied last hears of the next round fast
    pacer.message_handled()
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)


def test_pacer_checks_local_state_often() -> None:
    """Flower's 0.5 s waits for the node's own reply read in-memory state: short."""
    pacer = Pacer(slowest=1.0)
    assert pacer.wait(0.5) == LOCAL_CHECK
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)  # idle schedule untouched


def test_pull_backoff_is_shortened_in_flowers_own_functions() -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    from medbloom.federation.pulls import shorten_pull_backoff

    shorten_pull_backoff()
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert params["initial_backoff"].default == INITIAL_BACKOFF
        assert params["backoff_cap"].default == BACKOFF_CAP
        assert params["max_tries_per_object"].default == MAX_TRIES


def test_set_defaults_names_a_missing_parameter() -> None:
    def f(a: int, *, b: int = 1, c: int = 2) -> int:
        return a + b + c

    _set_defaults(f, c=5)
    assert f(0) == 6
    with pytest.raises(RuntimeError, match="nosuch"):
        _set_defaults(f, nosuch=1)
