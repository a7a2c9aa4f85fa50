"""The hospital process's poll schedule for Flower's SuperNode loop."""

from __future__ import annotations

import itertools

import pytest

from medbloom.federation.flower_internals import SUPERNODE_IDLE_SLEEP, SUPERNODE_REPLY_CHECK
from medbloom.federation.node import PollSchedule


def test_polls_come_fast_after_a_message_and_slow_down_to_the_interval() -> None:
    slept: list[float] = []
    schedule = PollSchedule(slowest=1.0, sleeper=slept.append)
    for _ in range(20):
        schedule.sleep(SUPERNODE_IDLE_SLEEP)
    assert slept[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in itertools.pairwise(slept))  # slower and slower
    assert slept[-1] == pytest.approx(1.0)  # never slower than --poll-interval
    schedule.message_received()
    schedule.sleep(SUPERNODE_IDLE_SLEEP)
    assert slept[-1] == pytest.approx(0.1)  # a message came: fast again


def test_checks_of_the_nodes_own_state_are_short() -> None:
    """Flower's 0.5 s waits for the node's own reply read in-memory state: no request."""
    slept: list[float] = []
    schedule = PollSchedule(slowest=1.0, sleeper=slept.append)
    schedule.sleep(SUPERNODE_REPLY_CHECK)
    schedule.sleep(0.01)
    assert slept == [0.05, 0.01]
    schedule.sleep(SUPERNODE_IDLE_SLEEP)
    assert slept[-1] == pytest.approx(0.1)  # the idle schedule is untouched


def test_a_short_interval_is_never_slower_than_the_first_poll() -> None:
    slept: list[float] = []
    schedule = PollSchedule(slowest=0.05, sleeper=slept.append)
    schedule.sleep(SUPERNODE_IDLE_SLEEP)
    schedule.sleep(SUPERNODE_IDLE_SLEEP)
    assert slept == [0.1, 0.1]


@pytest.mark.parametrize("flags", [["--poll-interval", "0"], ["--isolation", "subprocess"]])
def test_bad_node_flags_are_refused_before_anything_starts(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from medbloom.federation.node import main

    with pytest.raises(SystemExit) as exc:
        main(flags)
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err
