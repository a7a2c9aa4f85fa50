"""The ServerApp's polls for replies: seldom until a round's end is due, fast from then.

The polls are counted against a grid that serves scripted replies through Flower's
Grid interface (``push_messages``, ``pull_messages``); the SuperLink path itself is
covered by the launch tests, whose rounds run with the reply clock from round 3 on.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import Error, Message, MessageType, Metadata, RecordDict

from medbloom.federation.server_app import (
    DUE_HISTORY,
    DUE_SHARE,
    FAR_POLL,
    ReplyClock,
    exchange,
)


def _meta(node: int, message_id: str, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1, message_id=message_id, src_node_id=node if reply_to else 1,
        dst_node_id=1 if reply_to else node, reply_to_message_id=reply_to, group_id="1",
        created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN,
    )  # fmt: skip


class ScriptedGrid:
    """Replies that become available set times after the messages were pushed."""

    def __init__(self, arrivals: dict[int, float], errors: frozenset[int] = frozenset()) -> None:
        self.arrivals = arrivals
        self.errors = errors
        self.sent = 0.0
        self.polls: list[float] = []  # seconds after the push
        self.seen: dict[int, float] = {}  # node -> when its reply was pulled

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.sent = time.monotonic()
        return [f"q{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        now = time.monotonic() - self.sent
        self.polls.append(now)
        out = []
        for mid in sorted(ids):
            node = int(mid[1:])
            if self.arrivals[node] <= now:
                self.seen[node] = now
                meta = _meta(node, f"r{node}", reply_to=mid)
                if node in self.errors:
                    out.append(Message(metadata=meta, error=Error(code=0, reason="boom")))
                else:
                    out.append(Message(metadata=meta, content=RecordDict()))
        return out


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(metadata=_meta(n, f"q{n}"), content=RecordDict()) for n in nodes]


def _clock_that_saw(messages: int, *lasts: float) -> ReplyClock:
    clock = ReplyClock()
    for last in lasts:
        clock.record(messages, last)
    return clock


def test_reply_clock_needs_recent_rounds_of_the_same_size() -> None:
    clock = ReplyClock()
    for i in range(DUE_HISTORY):
        assert clock.due(10) is None  # not enough rounds seen yet
        clock.record(10, 9.0 + i)
    assert clock.due(10) == pytest.approx(DUE_SHARE * 9.0)  # the earliest recent end
    assert clock.due(9) is None  # a round with another number of messages: unknown
    for _ in range(DUE_HISTORY):
        clock.record(10, 5.0)  # rounds got faster: the old ones are forgotten
    assert clock.due(10) == pytest.approx(DUE_SHARE * 5.0)


def test_polls_are_seldom_until_the_round_is_due_then_fast() -> None:
    arrivals = {1: 0.3, 2: 1.25}
    due_last = 1.4  # recent rounds ended 1.4 s after sending: due at DUE_SHARE * 1.4
    due = DUE_SHARE * due_last
    assert arrivals[1] < FAR_POLL < due < arrivals[2]
    grid = ScriptedGrid(arrivals)
    clock = _clock_that_saw(2, *[due_last] * DUE_HISTORY)
    replies, missing = exchange(grid, _messages([1, 2]), 30.0, reply_clock=clock)
    assert len(replies) == 2 and missing == []
    before_due = [t for t in grid.polls if t < due - 0.01]
    assert len(before_due) <= 2  # at the push and about FAR_POLL later
    assert grid.seen[1] >= FAR_POLL - 0.05  # the early reply waited for the next poll...
    assert grid.seen[2] - arrivals[2] < 0.5  # ...the last one is seen soon after it came
    assert clock.lasts[2][-1] == pytest.approx(grid.seen[2], abs=0.05)  # and remembered

    plain = ScriptedGrid(arrivals)  # no clock: Flower's polls made fast, as in round 1
    exchange(plain, _messages([1, 2]), 30.0)
    assert len([t for t in plain.polls if t < due - 0.01]) >= 5


def test_a_round_with_a_failed_or_missing_reply_is_not_remembered() -> None:
    clock = ReplyClock()
    grid = ScriptedGrid({1: 0.0, 2: 0.1}, errors=frozenset({2}))
    replies, _ = exchange(grid, _messages([1, 2]), 5.0, reply_clock=clock)
    assert len(replies) == 2 and replies[1].has_error()
    grid = ScriptedGrid({1: 0.0, 2: 60.0})
    _, missing = exchange(grid, _messages([1, 2]), 0.3, reply_clock=clock)
    assert missing == [2]
    assert clock.lasts == {}


def test_a_far_due_time_does_not_outlast_the_round_timeout() -> None:
    """Polls a second apart while the round is not due still end at --round-timeout."""
    grid = ScriptedGrid({1: 0.0, 2: 60.0})
    clock = _clock_that_saw(2, *[50.0] * DUE_HISTORY)
    started = time.monotonic()
    _, missing = exchange(grid, _messages([1, 2]), 0.4, reply_clock=clock)
    assert missing == [2]
    assert time.monotonic() - started < 0.4 + 0.3
