"""Secure aggregation: the server learns only the sum of the hospitals' updates.

The protocol is SecAgg+ (Bell et al., CCS 2020) as Flower ships it. Each hospital runs
Flower's own :func:`flwr.client.mod.secaggplus_mod` unchanged: it makes two key pairs,
Shamir-shares its private mask seed and first private key among the other hospitals
(each share encrypted for its receiver), quantises its weighted update, adds a private
mask and one pairwise mask per other hospital (masks that cancel in the sum), and, last,
hands the server the shares it needs to remove the masks of those who answered and of
those who dropped out. The server side follows Flower's ``SecAggPlusWorkflow`` stage by
stage, with the same primitives (``flwr.common.secure_aggregation``): the workflow itself
drives Flower's legacy strategy stack (``LegacyContext``, ``ClientProxy``), while
medbloom's round loop drives the Message-API strategies, so its four stages are run here
as four exchanges of the round loop's own :func:`exchange` (interruptible, bounded by
``--round-timeout``, saying who is missing).

What is masked is the *update*: the weights a hospital trained minus the global weights
it received, weighted by its number of training images. The server adds the unmasked
average to the global model and hands the result to the strategy as every hospital's
reply, so FedAvg, FedProx and the server optimizers (FedAdam, FedYogi, FedAvgM) work
unchanged; strategies that need each update on its own cannot (config.py refuses them).
Integer buffers (BatchNorm's batch counters) are not masked: they keep the server's value.

Every pair of sampled hospitals shares masks (Flower's ``num_shares`` = all of them),
which suits the tens of hospitals medbloom is for.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medbloom.federation.wire import payload_bytes

log = logging.getLogger("medbloom")

RECORD = RECORD_KEY_CONFIGS  # the ConfigRecord every secure-aggregation message carries
# Flower's defaults: updates clipped to [-8, 8] and quantised to 2**22 levels (a step
# of 3.8e-6), masks drawn mod 2**32, so the sum of up to 1024 hospitals cannot wrap.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 1 << 22
MODULUS_RANGE = 1 << 32
# what a hospital's reply to each stage holds (its log says so as the reply leaves), and
# what the server has once a stage's replies are in
STAGE_NAMES = {
    Stage.SETUP: "public keys ready",
    Stage.SHARE_KEYS: "encrypted key shares ready",
    Stage.COLLECT_MASKED_VECTORS: "masked update ready",
    Stage.UNMASK: "unmasking shares ready",
}
RECEIVED = {
    Stage.SETUP: "public keys",
    Stage.SHARE_KEYS: "encrypted key shares",
    Stage.COLLECT_MASKED_VECTORS: "masked updates",
    Stage.UNMASK: "unmasking shares",
}


# ----------------------------------------------------------------------------- hospital


def stages_mod(
    msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """The ClientApp's mod: Flower's ``secaggplus_mod`` for the messages of a secure
    round (they carry :data:`RECORD`); every other message passes straight through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD not in msg.content.config_records:
        return call_next(msg, ctxt)
    stage = str(msg.content.config_records[RECORD].get(Key.STAGE, ""))
    reply = secaggplus_mod(msg, ctxt, call_next)
    log.info(
        "secure aggregation, round %s: %s", msg.metadata.group_id, STAGE_NAMES.get(stage, stage)
    )
    return reply


def masked_update_fields(
    received: dict[str, np.ndarray], trained: dict[str, np.ndarray], num_examples: int, seed: int
) -> tuple[RecordDict, int]:
    """What ``secaggplus_mod`` masks, in the record layout it reads (Flower's legacy
    ``FitRes``): this hospital's update (trained minus received, per packed array, in
    name order; integer arrays as zeros) and its weight. Numpy's global generator, which
    Flower's stochastic rounding draws from, is seeded so that a round rerun after a
    resume sends the same update. Also returns how many values lie outside the range
    the quantiser keeps (they are clipped to it)."""
    from medbloom.federation import flower_internals

    update = [
        (trained[k].astype(np.float64) - received[k].astype(np.float64))
        if trained[k].dtype.kind == "f"
        else np.zeros(trained[k].shape, np.float64)
        for k in sorted(trained)
    ]
    np.random.seed(seed % 2**32)
    clipped = int(sum(np.count_nonzero(np.abs(u) > CLIPPING_RANGE) for u in update))
    return flower_internals.legacy_fit_result(update, num_examples), clipped


# ------------------------------------------------------------------------------- server


def _pairs(reply: Message, ids: str, blobs: str) -> list[tuple[int, bytes]]:
    """A stage reply's node IDs under ``ids`` paired with its byte strings under ``blobs``
    (encrypted shares and where they go, or shares and whose they are)."""
    record = reply.content.config_records[RECORD]
    return list(zip(cast(list[int], record[ids]), cast(list[bytes], record[blobs]), strict=True))


@dataclass
class SecureOutcome:
    """One secure round: the replies for the round loop, who did not answer, and why
    the round could not be unmasked (None when it was)."""

    replies: list[Message] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    aborted: str | None = None
    alive: list[int] = field(default_factory=list)  # answered every stage asked of them
    rejected: dict[int, str] = field(default_factory=dict)  # answered, but unusably: why
    sent: dict[int, int] = field(default_factory=dict)  # bytes each node sent, all stages


Exchange = Callable[[Iterable[Message], threading.Event | None], tuple[list[Message], list[int]]]


class SecureRound:
    """The server's side of one SecAgg+ round over the round loop's exchange."""

    def __init__(
        self,
        exchange: Exchange,
        messages: list[Message],
        server_round: int,
        threshold: int,
        max_weight: float,
        stop: threading.Event | None = None,
        seed: int = 0,
    ) -> None:
        self.exchange = exchange
        self.train = {m.metadata.dst_node_id: m for m in messages}
        self.round = server_round
        self.threshold = threshold
        self.max_weight = max_weight
        self.stop = stop
        self.rng = random.Random(seed)
        self.out = SecureOutcome()
        self.last: dict[int, Message] = {}  # each node's latest good reply
        self.errors: dict[int, Message] = {}  # error replies, by node
        self.silent: set[int] = set()  # nodes that did not answer in time
        self.rejected: dict[int, Message] = {}  # an unusable reply, by node

    # -- one exchange ------------------------------------------------------------------
    def _stage(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send each node its content; keep the good replies, record the rest."""
        messages = [
            Message(
                content=c, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(self.round)
            )
            for nid, c in contents.items()
        ]
        replies, missing = self.exchange(messages, self.stop)
        good: dict[int, Message] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error() or RECORD not in reply.content.config_records:
                self.errors[nid] = reply  # the round loop records why it failed
            else:
                good[nid] = reply
                self.out.sent[nid] = self.out.sent.get(nid, 0) + payload_bytes(reply.content)
        self.silent.update(missing)
        self.last.update(good)
        log.info(
            "secure aggregation, round %d: %s from %d of %d hospitals",
            self.round, RECEIVED[stage], len(good), len(contents),
        )  # fmt: skip
        return good

    def _finish(self, alive: Iterable[int], replies: dict[int, Message]) -> SecureOutcome:
        """The outcome: ``replies`` for the nodes in ``alive``, and the failures of the
        others (a node whose update is in the sum counts as answered, whatever came after)."""
        self.out.alive = sorted(alive)
        kept = set(self.out.alive)
        self.out.replies = [m for n, m in sorted(self.errors.items()) if n not in kept]
        self.out.replies += [m for n, m in sorted(self.rejected.items()) if n not in kept]
        self.out.replies += [replies[n] for n in self.out.alive if n in replies]
        self.out.missing = sorted(self.silent - kept - set(self.errors))
        return self.out

    def _enough(self, active: Iterable[int], when: str) -> bool:
        n = len(list(active))
        if n >= self.threshold:
            return True
        self.out.aborted = (
            f"secure aggregation stopped {when}: {n} hospital(s) left, fewer than the "
            f"threshold of {self.threshold} needed to unmask the sum"
        )
        return False

    def _abort(self, active: Iterable[int]) -> SecureOutcome:
        return self._finish(active, self.last)

    # -- the protocol --------------------------------------------------------------------
    def run(self, global_arrays: ArrayRecord) -> tuple[SecureOutcome, ArrayRecord | None]:
        """Run the four stages; return the outcome and the new global arrays (None if
        the round was aborted)."""
        sampled = list(self.train)
        if not self._enough(sampled, "before it began"):
            return self._abort(sampled), None
        settings: dict[str, Any] = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(sampled),
            Key.SHARE_NUMBER: len(sampled),
            Key.THRESHOLD: self.threshold,
            Key.CLIPPING_RANGE: CLIPPING_RANGE,
            Key.TARGET_RANGE: QUANTIZATION_RANGE,
            Key.MOD_RANGE: MODULUS_RANGE,
            Key.MAX_WEIGHT: float(self.max_weight),
        }
        # stage 0: everyone makes two key pairs and sends the public halves
        keys = self._stage(
            Stage.SETUP, {nid: RecordDict({RECORD: ConfigRecord(settings)}) for nid in sampled}
        )
        public = {
            nid: [
                cast(bytes, r.content.config_records[RECORD][Key.PUBLIC_KEY_1]),
                cast(bytes, r.content.config_records[RECORD][Key.PUBLIC_KEY_2]),
            ]
            for nid, r in keys.items()
        }
        if not self._enough(public, "after the key exchange"):
            return self._abort(public), None
        # stage 1: everyone gets the others' public keys and sends encrypted shares
        order = sorted(public)
        self.rng.shuffle(order)

        def share_keys(nid: int) -> RecordDict:
            record = ConfigRecord({str(other): public[other] for other in order})
            record[Key.STAGE] = Stage.SHARE_KEYS
            return RecordDict({RECORD: record})

        shared = self._stage(Stage.SHARE_KEYS, {nid: share_keys(nid) for nid in order})
        if not self._enough(shared, "while the keys were shared"):
            return self._abort(shared), None
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in shared}
        for src, reply in sorted(shared.items()):
            for dst, ciphertext in _pairs(reply, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST):
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)

        # stage 2: everyone gets its shares and the training task; trains, masks, sends
        def collect(nid: int) -> RecordDict:
            task = self.train[nid].content
            content = RecordDict(dict(task.items()))
            content[RECORD] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: forward[nid][1],
                    Key.SOURCE_LIST: forward[nid][0],
                }
            )
            return content

        masked = self._stage(Stage.COLLECT_MASKED_VECTORS, {nid: collect(nid) for nid in shared})
        shapes = [(1,)] + [tuple(a.numpy().shape) for _, a in sorted(global_arrays.items())]
        total: list[np.ndarray] | None = None
        for nid, reply in sorted(masked.items()):
            vector = [
                bytes_to_ndarray(b)
                for b in cast(
                    list[bytes], reply.content.config_records[RECORD][Key.MASKED_PARAMETERS]
                )
            ]
            if [v.shape for v in vector] != shapes:
                # left out like a hospital lost here: the survivors' shares remove its masks
                self.out.rejected[nid] = "a masked update of the wrong shape"
                self.rejected[nid] = masked.pop(nid)
                continue
            total = vector if total is None else parameters_addition(total, vector)
        if not self._enough(masked, "after the masked updates") or total is None:
            return self._abort(masked), None
        total = parameters_mod(total, MODULUS_RANGE)
        # stage 3: the survivors send the shares that remove every mask
        active = set(masked)
        dead = set(shared) - active

        def unmask(nid: int) -> RecordDict:
            record = ConfigRecord(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: sorted(active),
                    Key.DEAD_NODE_ID_LIST: sorted(dead),
                }
            )
            return RecordDict({RECORD: record})

        shares_in = self._stage(Stage.UNMASK, {nid: unmask(nid) for nid in sorted(active)})
        shares: dict[int, list[bytes]] = {nid: [] for nid in active | dead}
        for reply in shares_in.values():
            for owner, share in _pairs(reply, Key.NODE_ID_LIST, Key.SHARE_LIST):
                if owner in shares:
                    shares[owner].append(share)
        short = [nid for nid, s in shares.items() if len(s) < self.threshold]
        if short:
            self.out.aborted = (
                f"secure aggregation stopped while unmasking: {len(shares_in)} hospital(s) "
                f"sent their shares, fewer than the threshold of {self.threshold}"
            )
            return self._abort(shares_in), None
        dims = get_parameters_shape(total)
        for nid, share_list in sorted(shares.items()):
            secret = combine_shares(share_list)
            if nid in active:  # the private mask of a hospital that answered
                total = parameters_subtraction(total, pseudo_rand_gen(secret, MODULUS_RANGE, dims))
                continue
            # a hospital that dropped after sharing its keys: the pairwise masks the
            # survivors added for it
            private = bytes_to_private_key(secret)
            for other in sorted(active):
                mask = pseudo_rand_gen(
                    generate_shared_key(private, bytes_to_public_key(public[other][0])),
                    MODULUS_RANGE,
                    dims,
                )
                total = (
                    parameters_addition(total, mask)
                    if nid > other
                    else parameters_subtraction(total, mask)
                )
        total = parameters_mod(total, MODULUS_RANGE)
        q_weight, summed = factor_extract(total)
        update = dequantize(summed, CLIPPING_RANGE, QUANTIZATION_RANGE)
        offset = -(len(active) - 1) * CLIPPING_RANGE
        scale = QUANTIZATION_RANGE / float(q_weight)
        new = {}
        for (name, array), delta in zip(sorted(global_arrays.items()), update, strict=True):
            values = array.numpy()
            if values.dtype.kind == "f":
                values = (values.astype(np.float64) + (delta + offset) * scale).astype(values.dtype)
            new[name] = values
        from flwr.app import Array

        arrays = ArrayRecord(
            {name: Array(np.ascontiguousarray(new[name])) for name in global_arrays}
        )
        clipped = sum(
            int(cast(int, m.content.metric_records["metrics"].get("secagg-clipped", 0)))
            for m in masked.values()
            if "metrics" in m.content.metric_records
        )
        if clipped:
            log.warning(
                "round %d: %d update values beyond +/-%g were clipped before masking",
                self.round, clipped, CLIPPING_RANGE,
            )  # fmt: skip
        for nid in sorted(active):
            reply = masked[nid]
            metrics = reply.content.metric_records.get("metrics")
            content = RecordDict({"arrays": arrays})
            if metrics is not None:
                content["metrics"] = metrics
            reply.content = content
        return self._finish(active, masked), arrays
