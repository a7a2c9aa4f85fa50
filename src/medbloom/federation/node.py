"""One hospital's process: a Flower SuperNode with medbloom's ClientApp inside it.

``medbloom node`` runs Flower's own ``flower-supernode`` (same flags) in process
isolation, plus, in a thread of the same process, the long-lived ClientApp worker
of :mod:`medbloom.federation.worker`. So each hospital is one process that keeps
its data, partition and model loaded for the whole run.

Flower 1.41's SuperNode loop has fixed waits: 3 s between polls of the SuperLink when
idle, 0.5 s between checks for its ClientApp's reply. Here

* the SuperLink is polled 0.1 s after a reply, then less and less often (x1.25 each
  time) down to once every ``--poll-interval`` seconds (default 1). The node that
  trains longest, which decides when a round ends, is the one that replied last, so
  it is still polling fast when the next round's message comes; nodes that wait long
  poll seldom, and once their waits are known they sleep through most of them
  (:class:`Pacer`); a node that waits for its turn on a shared CPU every round polls
  at most every half of that wait, as it hears of its message early enough. With
  ``--cpu-turns`` (one machine, ``medbloom launch``) a node that has replied does not
  poll while another hospital holds a CPU's turn lock, as no message can come before
  the last hospital has replied (it looks every 0.25 s, and polls every 3 s all the
  same in case a hospital hangs with its CPU), and it counts its waits from the
  moment none trains, which does not depend on how early it replied. An HTTP
  poll costs the SuperLink a request with a signature check and database queries;
  with ten hospitals on two cores, fixed 0.25 s polls took about a third of the
  machine from training.
* the reply is checked every 0.05 s: that check reads the node's in-memory state,
  no request is sent;
* the ClientApp thread asks for its task when the SuperNode has received a message
  (it is woken), not by polling the Runtime API over HTTP;
* the Runtime API's tracing layer is skipped unless tracing is on
  (:func:`medbloom.federation.superlink.install_on_supernode`).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import medbloom  # noqa: F401  (sets Flower's offline environment first)
from medbloom.system import TURN_HISTORY, CpuTurns, ablated, exit_without_teardown

WAKE_FALLBACK = 2.0  # seconds between the ClientApp thread's asks when nothing woke it
IDLE_POLL = 3.0  # Flower's sleep between polls of the SuperLink when no message came
LOCAL_CHECK = 0.05  # seconds between checks of the node's own state
HOLD_SHARE = 0.85  # of the shortest recent wait from a reply to the next message
HOLD_HISTORY = 3  # waits remembered; a hold needs this many that agree within 3x
HOLD_CAP = 30.0  # seconds: the longest hold
TURN_SHARE = 0.5  # of the shortest recent wait for the CPU: how late a poll may come
BUSY_POLL = 3.0  # seconds between polls while another hospital on this machine trains
BUSY_CHECK = 0.25  # seconds between looks at the CPUs' turn locks meanwhile


class Pacer:
    """The SuperNode loop's sleeps: short while a round is under way, longer when idle.

    After its reply a node polls 0.1 s later, then less and less often. A node that
    trained a small partition and replied early would poll fast for nothing: the
    next message comes when the last hospital has replied and the server has
    evaluated. So the pacer remembers how long the last ``HOLD_HISTORY`` waits from
    its reply to the next message were, and when they agree (a node sampled every
    round, with its own steady share of the work), it sleeps through
    ``HOLD_SHARE`` of the shortest before polling fast again. The node that replies
    last waits only for the evaluation, so its hold is short too.

    With ``turns`` (hospitals sharing a CPU take turns to train), a node that waited
    for its CPU in each of the last rounds would wait again: hearing of its message a
    little later costs it nothing, as another hospital trains on that CPU meanwhile.
    Such a node polls at most every ``TURN_SHARE`` of its shortest recent wait (up to
    ``slowest``); the node that trains first on a CPU waited for nobody and polls
    fast. Measured with ten hospitals on two cores: about 25 of a round's 100 polls
    came during the server's evaluation, from nodes whose holds had ended.

    With ``turns`` a node that has replied also sleeps while another hospital sharing
    the turn locks trains (:meth:`sleep`), and counts its waits from the moment none
    did. Counted from its own reply, the wait of the hospital that trains longest
    changed with the packing of the CPUs each round (6-9 s when another CPU ended the
    round, 3 s when its own did), so its hold overshot and it heard of its message up
    to 3 s late, its CPU idle meanwhile.
    """

    def __init__(
        self,
        slowest: float,
        fastest: float = 0.1,
        growth: float = 1.25,
        clock: Callable[[], float] = time.monotonic,
        turns: CpuTurns | None = None,
        sleeper: Callable[[float], None] = time.sleep,
    ) -> None:
        self.slowest = max(slowest, fastest)
        self.fastest = fastest
        self.growth = growth
        self.idle = fastest
        self.clock = clock
        self.replied_at: float | None = None
        self.free_at: float | None = None  # when, since the reply, no hospital trained
        self.gaps: deque[float] = deque(maxlen=HOLD_HISTORY)
        self.turns = turns
        self.sleeper = sleeper

    def message_handled(self) -> None:
        now = self.clock()
        if self._since is not None:
            self.gaps.append(now - self._since)
        self.replied_at = self.free_at = None
        self.idle = self.fastest

    def reply_sent(self) -> None:
        self.replied_at = self.clock()
        self.free_at = None
        self.idle = self.fastest

    @property
    def _since(self) -> float | None:
        """What waits are counted from: the moment no hospital on this machine
        trained any more where that was seen, else this node's reply."""
        return self.free_at if self.free_at is not None else self.replied_at

    def hold(self) -> float:
        """Seconds from now during which no message is expected (0: none known)."""
        since = self._since
        if since is None or len(self.gaps) < HOLD_HISTORY or ablated("hold"):
            return 0.0
        shortest = min(self.gaps)
        if max(self.gaps) > 3 * shortest:  # irregular (sampled in some rounds only)
            return 0.0
        return min(HOLD_CAP, HOLD_SHARE * shortest - (self.clock() - since))

    def patience(self) -> float:
        """Seconds a poll may come after the next message without delaying this
        node's training (0: it trains at once, or its waits are not known)."""
        waits = list(self.turns.waits) if self.turns is not None else []
        if len(waits) < TURN_HISTORY or ablated("patience"):
            return 0.0
        return min(self.slowest, TURN_SHARE * min(waits))

    def wait(self, seconds: float) -> float:
        """How long to sleep where Flower would sleep ``seconds``."""
        if seconds < IDLE_POLL:  # a local check (reply ready, object stored): cheap
            return min(seconds, LOCAL_CHECK)
        hold = self.hold()
        if hold > self.idle:
            return hold  # then polls from ``fastest`` again: idle is unchanged
        wait, self.idle = self.idle, min(self.slowest, self.idle * self.growth)
        return max(wait, self.patience())

    def sleep(self, seconds: float) -> None:
        """Sleep where Flower's loop would sleep ``seconds``: first, after a reply,
        while other hospitals on this machine train (no message can come before the
        last of them has replied), then as :meth:`wait` says."""
        busy = not ablated("busy")
        if busy and seconds >= IDLE_POLL and self.turns is not None and self.replied_at is not None:
            self._sleep_while_others_train()
        self.sleeper(self.wait(seconds))

    def _sleep_while_others_train(self) -> None:
        """Sleep while another hospital sharing the CPU turns trains, up to
        ``BUSY_POLL`` seconds (then the node polls: a hospital that hangs holding its
        CPU must not keep the others from the next round); note when none trains."""
        assert self.turns is not None
        start = self.clock()
        while self.turns.others_training():
            self.free_at = None
            if self.clock() - start >= BUSY_POLL:
                return
            # seldom: each look wakes this process on a CPU where another trains
            # (with looks every 0.05 s, one benchmark repetition gave +5.5 s a round)
            self.sleeper(BUSY_CHECK)
        if self.free_at is None:
            self.free_at = self.clock()

    def install(self) -> None:
        """Make Flower's SuperNode loop sleep as this pacer says, and tell it when a
        reply has been sent."""
        from flwr.supernode import start_client_internal as loop

        names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
        names["sleep"] = self.sleep
        loop.time = types.SimpleNamespace(**names)  # type: ignore[attr-defined,assignment]

        push_messages = loop._push_messages

        def push_then_note(*args: Any, **kwargs: Any) -> None:
            push_messages(*args, **kwargs)
            self.reply_sent()

        loop._push_messages = push_then_note


def _on_messages(*callbacks: Callable[[], None]) -> None:
    """Call ``callbacks`` whenever the SuperNode has stored an incoming message and its
    parts (``pull_objects`` is the loop's last step of receiving one)."""
    from flwr.supernode import start_client_internal as loop

    pull_objects = loop.pull_objects  # type: ignore[attr-defined]

    def pull_then_wake(*args: Any, **kwargs: Any) -> Any:
        try:
            return pull_objects(*args, **kwargs)
        finally:
            for callback in callbacks:
                callback()

    loop.pull_objects = pull_then_wake  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse medbloom's two flags, hand the rest to ``flower-supernode``."""
    parser = argparse.ArgumentParser(
        prog="medbloom node",
        description=__doc__.splitlines()[0],
        epilog="Other flags are flower-supernode's: --superlink, --insecure, "
        "--root-certificates, --auth-supernode-private-key, --node-config, --port.",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="longest wait between polls of the SuperLink when idle, in seconds (polls "
        "start 0.1 s after each reply and slow down to this; once a node knows how long "
        "it waits for the next round, it sleeps through most of the wait)",
    )
    parser.add_argument("--port", type=int, default=9094, help="this node's Runtime API port")
    parser.add_argument(
        "--cpu-turns",
        metavar="DIR",
        default=None,
        help="for hospitals that share one machine (medbloom launch sets it): while this "
        "process is pinned to a single CPU, it trains only when no other node using DIR "
        "and pinned to that CPU does; after its reply it does not poll the SuperLink "
        "(but every 3 s) while another node using DIR trains",
    )

    args, rest = parser.parse_known_args(argv)
    if "--isolation" in rest:
        parser.error("--isolation is set by medbloom node (process)")
    from medbloom.federation.pulls import shorten_pull_backoff
    from medbloom.federation.superlink import install_on_supernode
    from medbloom.federation.worker import serve, setup_logging

    setup_logging()
    if not ablated("pulls"):
        shorten_pull_backoff()
    if not ablated("gates"):
        install_on_supernode()
    # The SuperNode's Runtime API listens on 127.0.0.1 in plain HTTP, also when its
    # link to the SuperLink uses TLS; only this process's own thread talks to it.
    runtime = f"127.0.0.1:{args.port}"
    wake = threading.Event()
    turns = CpuTurns(args.cpu_turns) if args.cpu_turns and not ablated("turns") else None
    woken = not ablated("wake")
    threading.Thread(
        target=serve,
        args=(runtime, None, WAKE_FALLBACK if woken else 0.25, wake if woken else None, turns),
        daemon=True,
        name="clientapp",
    ).start()
    pacer = Pacer(args.poll_interval, turns=turns)
    if not ablated("pacer"):
        pacer.install()
        _on_messages(wake.set, pacer.message_handled)
    else:
        _on_messages(wake.set)

    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", "--isolation", "process", "--port", str(args.port), *rest]
    try:
        flower_supernode()
    except SystemExit as exc:
        # Flower has run its exit handlers (Runtime API stopped) when it raises this.
        # What is left is the interpreter's teardown of torch and Flower: 1.5-2 CPU-s
        # a process, which with ten hospitals on two cores made a launch take 10 s to
        # stop. A node writes nothing but its log, so flush that and leave now.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        exit_without_teardown(code)


if __name__ == "__main__":
    main()
