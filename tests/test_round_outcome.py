"""How one round's replies are sorted into usable updates and failures (no engine)."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from medbloom.federation.server_app import sort_replies


def _reply(node: int, error: str | None = None, shape: tuple[int, ...] = (2,)) -> Message:
    """A reply from ``node``, as the ServerApp receives it."""
    meta = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=1,
        reply_to_message_id=f"q{node}", group_id="1", created_at=time.time(), ttl=60.0,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    if error is not None:
        return Message(metadata=meta, error=Error(code=0, reason=error))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(shape, np.float32))}),
            "metrics": MetricRecord(
                {"partition-id": node - 10, "num-examples": 5, "train_loss": 0.5,
                 "train_accuracy": 0.8}
            ),
        }
    )  # fmt: skip
    return Message(metadata=meta, content=content)


def test_every_reply_gets_one_row_and_the_summary_counts_them() -> None:
    replies = [_reply(10), _reply(11, error="ValueError: disk full"), _reply(12, shape=(3,))]
    clients: dict[int, int] = {}
    out = sort_replies(1, replies, [13, 14], {"w": (2,)}, clients)
    assert [r["status"] for r in out.rows] == ["ok", "rejected", "failed", "timeout", "timeout"]
    assert out.ok == 1 and out.failed == 4
    assert out.summary() == "1 failed, 1 ok, 1 rejected, 2 timeout"
    # a rejected update keeps its node in; a failed or silent node is left out
    assert sorted(out.failed_nodes) == [11, 13, 14]
    assert clients == {10: 0, 12: 2}


def test_a_round_without_replies_says_so() -> None:
    assert sort_replies(1, [], [], {}, {}).summary() == "no replies"
