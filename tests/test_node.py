"""The hospital process's changes to Flower's SuperNode loop and object pulls."""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from medbloom.federation.node import (
    BUSY_CHECK,
    BUSY_POLL,
    HOLD_HISTORY,
    HOLD_SHARE,
    IDLE_POLL,
    LOCAL_CHECK,
    TURN_SHARE,
    Pacer,
)
from medbloom.federation.pulls import BACKOFF_CAP, INITIAL_BACKOFF, MAX_TRIES, _set_defaults
from medbloom.system import TURN_HISTORY, CpuTurns


def test_pacer_polls_fast_after_a_message_and_slows_down_when_idle() -> None:
    pacer = Pacer(slowest=1.0)
    waits = [pacer.wait(IDLE_POLL) for _ in range(20)]
    assert waits[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in itertools.pairwise(waits))
    assert waits[-1] == pytest.approx(1.0)
    assert sum(waits[:5]) < 1.0  # a node that replied last hears of the next round fast
    pacer.message_handled()
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _round(pacer: Pacer, clock: Clock, gap: float) -> None:
    """A reply, then the next message ``gap`` seconds later."""
    pacer.reply_sent()
    clock.now += gap
    pacer.message_handled()
    clock.now += 2.0  # training


def test_pacer_sleeps_through_most_of_a_steady_wait_after_its_reply() -> None:
    clock = Clock()
    pacer = Pacer(slowest=1.0, clock=clock)
    pacer.message_handled()
    gaps = [9.0, 8.0, 10.0, 9.5][:HOLD_HISTORY]
    for gap in gaps[:-1]:
        _round(pacer, clock, gap)
    pacer.reply_sent()
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)  # not known yet: polls fast
    clock.now += gaps[-1]
    pacer.message_handled()
    pacer.reply_sent()
    first = pacer.wait(IDLE_POLL)
    assert first == pytest.approx(HOLD_SHARE * min(gaps))  # of the shortest recent wait
    clock.now += first
    # then fast polls again, slowing down as usual
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.125)


def test_pacer_holds_only_a_little_for_the_node_that_replies_last() -> None:
    clock = Clock()
    pacer = Pacer(slowest=1.0, clock=clock)
    for _ in range(HOLD_HISTORY):
        _round(pacer, clock, 1.2)  # the next round came right after the evaluation
    pacer.reply_sent()
    assert pacer.wait(IDLE_POLL) == pytest.approx(HOLD_SHARE * 1.2)


def test_pacer_does_not_hold_when_the_waits_disagree() -> None:
    """A node sampled in some rounds only (--fraction-train) cannot tell when its
    next message comes: it polls as usual."""
    clock = Clock()
    pacer = Pacer(slowest=1.0, clock=clock)
    for gap in (3.0, 20.0, 3.5):  # asked in rounds 1, 2 and 4
        _round(pacer, clock, gap)
    pacer.reply_sent()
    assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)


def _turns_that_waited(tmp_path: Path, *waits: float) -> CpuTurns:
    turns = CpuTurns(tmp_path / "locks")
    turns.waits.extend(waits)
    return turns


def test_pacer_polls_seldom_for_a_node_that_waits_its_turn_anyway(tmp_path: Path) -> None:
    """A hospital that waited for its shared CPU in each recent round would wait
    again: hearing of its message up to half that wait later costs it nothing."""
    assert TURN_HISTORY >= HOLD_HISTORY
    turns = _turns_that_waited(tmp_path, 1.0, 0.8, 1.2)
    pacer = Pacer(slowest=1.0, turns=turns)
    assert pacer.patience() == pytest.approx(TURN_SHARE * 0.8)
    waits = [pacer.wait(IDLE_POLL) for _ in range(20)]
    assert waits[0] == pytest.approx(TURN_SHARE * 0.8)  # not 0.1
    assert waits[-1] == pytest.approx(1.0)  # the usual slowest
    # a long wait: never slower than --poll-interval
    pacer = Pacer(slowest=1.0, turns=_turns_that_waited(tmp_path, 5.0, 6.0, 7.0))
    assert pacer.wait(IDLE_POLL) == pytest.approx(1.0)
    assert pacer.wait(0.5) == LOCAL_CHECK  # local checks stay fast


def test_pacer_polls_fast_for_the_node_that_trains_first_on_its_cpu(tmp_path: Path) -> None:
    for waits in [(2.0, 0.0, 2.0), (2.0, 2.0)]:  # trained first once / not known yet
        pacer = Pacer(slowest=1.0, turns=_turns_that_waited(tmp_path, *waits))
        assert pacer.patience() == 0.0
        assert pacer.wait(IDLE_POLL) == pytest.approx(0.1)
    turns = _turns_that_waited(tmp_path, 2.0, 2.0, 2.0)
    turns.waits.append(0.0)  # it got its CPU at once in the last round
    assert Pacer(slowest=1.0, turns=turns).wait(IDLE_POLL) == pytest.approx(0.1)


def test_pacer_holds_first_then_polls_at_its_patience(tmp_path: Path) -> None:
    clock = Clock()
    pacer = Pacer(slowest=1.0, clock=clock, turns=_turns_that_waited(tmp_path, 1.0, 1.0, 1.0))
    for _ in range(HOLD_HISTORY):
        _round(pacer, clock, 8.0)
    pacer.reply_sent()
    assert pacer.wait(IDLE_POLL) == pytest.approx(HOLD_SHARE * 8.0)
    clock.now += HOLD_SHARE * 8.0
    assert pacer.wait(IDLE_POLL) == pytest.approx(TURN_SHARE * 1.0)


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


class Trainer:
    """Another hospital's process holding its CPU's turn lock until ``release``."""

    def __init__(self, lock_dir: Path, cpu: int = 0) -> None:
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(lock_dir / f"cpu{cpu}.lock")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("go\n", timeout=30)


def test_cpu_turns_see_another_process_train_without_taking_its_turn(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    turns = CpuTurns(locks)
    assert not turns.others_training()  # no lock files yet
    other = Trainer(locks, cpu=1)
    try:
        assert turns.others_training()
        assert turns.others_training()  # looking did not take the lock from it
    finally:
        other.release()
    assert not turns.others_training()  # it ended: its lock is free


class Sleeps(Clock):
    """A clock that sleeps advance; the trainer beside it ends at ``release_at``."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Trainer | None = None
        self.release_at = float("inf")
        self.slept: list[float] = []

    def __call__(self, seconds: float | None = None) -> float:  # clock, or sleeper
        if seconds is not None:
            self.now += seconds
            self.slept.append(seconds)
            if self.trainer is not None and self.now >= self.release_at:
                self.trainer.release()
        return self.now

    def beside(self, trainer: Trainer, ends_in: float) -> None:
        self.trainer, self.release_at = trainer, self.now + ends_in


def test_pacer_sleeps_while_another_hospital_trains_and_counts_from_its_end(
    tmp_path: Path,
) -> None:
    """No message comes before the last hospital has replied: a node that replied
    sleeps (no poll) while another trains, then counts its waits from that moment, so
    its hold no longer depends on how early it replied."""
    t = Sleeps()
    pacer = Pacer(slowest=1.0, clock=t, turns=CpuTurns(tmp_path / "locks"), sleeper=t)
    for ends_in in (0.5, 2.5, 1.5):  # this node replied early, then late: the gaps agree
        t.beside(Trainer(tmp_path / "locks"), ends_in)
        pacer.reply_sent()
        replied, polls = t.now, len(t.slept)
        pacer.sleep(IDLE_POLL)  # one of Flower's idle sleeps, then it polls
        assert pacer.free_at == pytest.approx(replied + ends_in, abs=BUSY_CHECK + 0.05)
        assert all(x == BUSY_CHECK for x in t.slept[polls:-1])  # no poll in between
        t.now = pacer.free_at + 1.5  # the server evaluated; the next message came
        pacer.message_handled()
    assert list(pacer.gaps) == pytest.approx([1.5] * HOLD_HISTORY)
    # the next round: it sleeps through the training, then HOLD_SHARE of 1.5 s
    t.beside(Trainer(tmp_path / "locks"), 3.0)
    pacer.reply_sent()
    pacer.sleep(IDLE_POLL)
    assert t.slept[-1] == pytest.approx(HOLD_SHARE * 1.5, abs=BUSY_CHECK + 0.05)


def test_pacer_polls_now_and_then_while_a_hospital_hangs_with_its_cpu(tmp_path: Path) -> None:
    """A hospital that hangs while training keeps its CPU's lock until the server
    gives up on it: the others poll every BUSY_POLL seconds meanwhile, so they
    hear of the next round."""
    t = Sleeps()
    pacer = Pacer(slowest=1.0, clock=t, turns=CpuTurns(tmp_path / "locks"), sleeper=t)
    hung = Trainer(tmp_path / "locks")
    try:
        pacer.reply_sent()
        start = t.now
        pacer.sleep(IDLE_POLL)
        assert t.now - start == pytest.approx(BUSY_POLL + 0.1, abs=BUSY_CHECK + 0.05)
        assert pacer.free_at is None and pacer.hold() == 0.0
    finally:
        hung.release()


def test_pacer_without_a_reply_or_turns_does_not_look_at_cpus(tmp_path: Path) -> None:
    t = Sleeps()
    other = Trainer(tmp_path / "locks")
    try:
        # before its first reply (waiting for the run): Flower's schedule, shortened
        Pacer(slowest=1.0, clock=t, turns=CpuTurns(tmp_path / "locks"), sleeper=t).sleep(IDLE_POLL)
        # a hospital on a machine of its own (no --cpu-turns)
        alone = Pacer(slowest=1.0, clock=t, sleeper=t)
        alone.reply_sent()
        alone.sleep(IDLE_POLL)
        assert t.slept == [pytest.approx(0.1), pytest.approx(0.1)]
    finally:
        other.release()


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


def test_pulls_give_up_after_the_bound_and_report_the_object() -> None:
    """A reply whose parts never arrive (its hospital was killed while uploading) ends
    the pull after the bound with Flower's ObjectPullError, which the ServerApp's grid
    turns into that hospital's error reply; without a bound it waits hours."""
    import time

    from flwr.supercore.inflatable import inflatable_utils as iu

    from medbloom.federation.pulls import bound_pull_time, shorten_pull_backoff

    def never_there(object_id: str) -> bytes:
        raise iu.ObjectUnavailableError(object_id)

    shorten_pull_backoff()
    bound_pull_time(0.5)
    try:
        started = time.monotonic()
        with pytest.raises(iu.ObjectPullError):
            iu.pull_objects(["abc"], never_there)
        assert time.monotonic() - started < 3.0
    finally:
        bound_pull_time(7200)  # Flower's own default, for the other tests in this process


def test_set_defaults_names_a_missing_parameter() -> None:
    def f(a: int, *, b: int = 1, c: int = 2) -> int:
        return a + b + c

    _set_defaults(f, c=5)
    assert f(0) == 6
    with pytest.raises(RuntimeError, match="nosuch"):
        _set_defaults(f, nosuch=1)
