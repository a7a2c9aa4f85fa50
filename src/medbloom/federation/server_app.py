"""The ServerApp: sample hospitals, aggregate their weights with a Flower strategy,
evaluate the global model at the server after every round, and record the run.

The round loop is medbloom's own rather than ``Strategy.start``: it calls the same
strategy methods (``configure_train``, ``aggregate_train``) but keeps every reply,
so each client's result is recorded and each round's row is written the moment
the round ends.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from medbloom.config import NO_GLOBAL_MODEL, ExperimentConfig
from medbloom.errors import MedbloomError, RecordWriteError
from medbloom.experiment import (
    TensorSplit,
    initial_model,
    prepare_run,
    server_data,
    spec_summary,
)
from medbloom.federation import flower_internals
from medbloom.federation.strategies import build_strategy, restore_strategy, strategy_state
from medbloom.federation.wire import Layout, flat_values, payload_bytes
from medbloom.metrics import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    METRIC_NAMES,
    bootstrap_intervals,
    evaluate_scores,
    per_class_report,
)
from medbloom.personal import MIN_SITE_IMAGES, private_keys
from medbloom.runs import RunRecorder, attach_log_file, detach_log_file, load_checkpoint
from medbloom.system import ablated, usable_cpus
from medbloom.training import (
    load_arrays,
    predict,
    resolve_device,
    resolve_precision,
    set_threads,
    state_arrays,
)

log = logging.getLogger("medbloom")

RoundCallback = Callable[[dict[str, Any]], None]


class Evaluator:
    """Centralized evaluation of a global model on the validation and test splits."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.spec, self.val, self.test = server_data(cfg)
        # the clean test split's indices into the test split (test images without a
        # twin among the training images); None: not scored
        self.clean: np.ndarray | None = None
        self.model = initial_model(cfg, self.spec)
        self.device = resolve_device(cfg.device)
        self.amp = resolve_precision(cfg.precision, self.device)
        self.layout = Layout.of(state_arrays(self.model))
        self.last_report: dict[str, Any] = {}
        self.last_probs: np.ndarray | None = None
        self.last_val_probs: np.ndarray | None = None
        self._best: dict[str, np.ndarray] | None = None

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scores of the global weights on test (no prefix), the clean test split
        (``clean_``, the same predictions on fewer images) and validation (``val_``);
        the test split's per-class report is kept in ``last_report`` (the clean
        split's under its ``clean`` key), its probabilities in ``last_probs``."""
        load_arrays(self.model, state)
        out, probs = self._split(self.test, "")
        self.last_probs = probs
        self.last_report = per_class_report(
            self.test.labels, probs, self.spec.task, self.spec.class_names
        )
        if self.clean is not None and len(self.clean):
            labels, clean_probs = self.test.labels[self.clean], probs[self.clean]
            scores = evaluate_scores(labels, clean_probs, self.spec.task)
            out.update({f"clean_{k}": v for k, v in scores.items()})
            self.last_report["clean"] = per_class_report(
                labels, clean_probs, self.spec.task, self.spec.class_names
            )
        val_scores, self.last_val_probs = self._split(self.val, "val_")
        out.update(val_scores)
        return out

    def calibration(self, run_dir: Path) -> dict[str, Any]:
        """Temperature scaling of the final model and of the best one
        (``checkpoints/best.pt``): each fitted on the validation split, its ECE on the
        test split before and after, and the class-bias correction's decisions on the
        test and clean test splits (:mod:`medbloom.calibration`)."""
        from medbloom.calibration import calibration_report

        task = self.spec.task
        out: dict[str, Any] = {}
        if self.last_probs is not None and self.last_val_probs is not None:
            out["final"] = calibration_report(
                self.val.labels,
                self.last_val_probs,
                self.test.labels,
                self.last_probs,
                task,
                self.clean,
            )
        best = self.best_probs(run_dir)
        if best is not None:
            out["best"] = calibration_report(
                self.val.labels, best["val"], self.test.labels, best["test"], task, self.clean
            )
        return out

    def best_probs(self, run_dir: Path) -> dict[str, np.ndarray] | None:
        """The best model's (``checkpoints/best.pt``) probabilities on ``val`` and
        ``test``, computed once when the run ends (its intervals and its calibration
        both need them); None when no round was recorded."""
        best = run_dir / "checkpoints" / "best.pt"
        if self._best is None and best.exists():
            load_arrays(self.model, load_checkpoint(best)["model"])
            self._best = {
                "val": self._split(self.val, "")[1],
                "test": self._split(self.test, "")[1],
            }
        return self._best

    def intervals(self, run_dir: Path, seed: int) -> dict[str, Any]:
        """95% bootstrap intervals of test ACC, AUC and macro F1 for the final model
        (the last one evaluated) and the best one (``checkpoints/best.pt``)."""
        out: dict[str, Any] = {
            "level": BOOTSTRAP_LEVEL,
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": seed,
            "method": "percentile bootstrap over the test split",
        }
        best = self.best_probs(run_dir)
        probs = {"final": self.last_probs, "best": best["test"] if best else None}
        for name, p in probs.items():
            if p is None:
                continue
            out[name] = bootstrap_intervals(
                self.test.labels, p, self.spec.task, BOOTSTRAP_RESAMPLES, BOOTSTRAP_LEVEL, seed
            )
            if self.clean is not None and len(self.clean):
                out.setdefault("clean", {})[name] = bootstrap_intervals(
                    self.test.labels[self.clean],
                    p[self.clean],
                    self.spec.task,
                    BOOTSTRAP_RESAMPLES,
                    BOOTSTRAP_LEVEL,
                    seed,
                )
        return out

    @staticmethod
    def blank() -> dict[str, float]:
        """What :meth:`__call__` returns, all NaN: for strategies without one global
        model (local, fedper, fedbn), whose scores are each hospital's own."""
        names = (*METRIC_NAMES, "loss")
        return {f"{p}{k}": float("nan") for p in ("", "clean_", "val_") for k in names}

    def _split(self, split: TensorSplit, prefix: str) -> tuple[dict[str, float], np.ndarray]:
        probs, loss = predict(
            self.model, split.x, split.y, self.spec.task, device=self.device, amp_dtype=self.amp
        )
        scores = evaluate_scores(split.labels, probs, self.spec.task)
        scores["loss"] = loss
        return {prefix + k: v for k, v in scores.items()}, probs


class RunInterrupted(Exception):
    """The user asked the run to stop (Ctrl-C or SIGTERM)."""


class StopFlag(threading.Event):
    """A stop request: set in this process, or by creating a file (another process).

    ``medbloom launch`` runs the ServerApp in a process Flower starts; it asks that
    process to stop by creating ``RUN_DIR/STOP``.
    """

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path

    def is_set(self) -> bool:
        return super().is_set() or (self.path is not None and self.path.exists())


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    stop: threading.Event | None = None,
    poll: float = 0.05,
    slowest_poll: float = 0.2,
) -> tuple[list[Message], list[int]]:
    """Send messages and collect replies until all are in, ``timeout`` passes, or ``stop``.

    Returns the replies and the node IDs that did not answer in time. Flower's
    ``Grid.send_and_receive`` does the same but sleeps 3 s between polls against a
    remote SuperLink, cannot be interrupted and does not say who is missing. Here the
    first poll comes after ``poll`` seconds, and the wait grows (x1.25) to
    ``slowest_poll`` while no reply comes: each poll of a SuperLink is a request it
    must serve, while hospitals train on the same machine.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    sent = time.monotonic()
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=False)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = sent + timeout
    wait = poll
    last_look = False
    while pending:
        pulled_at = time.monotonic()
        got = list(grid.pull_messages(pending))
        blocked = time.monotonic() - pulled_at > 1.0
        for m in got:
            node = node_of.get(m.metadata.reply_to_message_id)
            if node is not None:
                flower_internals.attribute_error_reply(m, node)
        replies.extend(got)
        wait = poll if got else min(slowest_poll, wait * 1.25)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        if stop is not None and stop.is_set():
            raise RunInterrupted("stopped by the user")
        if time.monotonic() > deadline:
            if blocked and not last_look:
                # The pull itself waited (for the parts of a reply whose sender died
                # mid-upload, up to the timeout): replies that came in meanwhile are
                # there, not missing. One more look, without sleeping.
                last_look = True
                continue
            log.warning("%d replies still missing after %.0f s; going on", len(pending), timeout)
            break
        time.sleep(min(wait, max(0.0, deadline - time.monotonic()) + 0.01))
    return replies, sorted(node_of[m] for m in pending)


def _reply_polls(grid: Grid) -> tuple[float, float]:
    """First and slowest wait between polls for replies (see :func:`exchange`).

    The Simulation Engine's grid reads its replies from this process's memory, so a
    poll costs next to nothing and the round's last reply is seen within 20 ms; a
    SuperLink serves each poll as a request, on the cores the hospitals train on.
    """
    return (0.01, 0.02) if flower_internals.is_simulation_grid(grid) else (0.05, 0.2)


class LiveGrid:
    """The grid as the strategy should see it: without nodes that stopped answering.

    Flower's strategies sample from every node the SuperLink still lists, and the
    SuperLink keeps a dead node for about a minute; sampling it again would cost
    another full wait. A node that failed is left out until it answers again,
    which it can only do by rejoining (a restarted SuperNode gets a new node ID).
    """

    def __init__(self, grid: Grid, suspects: set[int]) -> None:
        self._grid = grid
        self.suspects = suspects
        self.client_of: dict[int, int] = {}
        self.train_size: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        """Live nodes in client order (Flower samples from this list with the
        seeded ``random`` module, so the order makes the choice reproducible)."""
        live = [n for n in self._grid.get_node_ids() if n not in self.suspects]
        return sorted(live, key=lambda n: (self.client_of.get(n, 1 << 62), n))

    def identify(
        self, timeout: float, stop: threading.Event | None = None, sizes: bool = False
    ) -> None:
        """Ask nodes not yet known which client (partition) they are; with ``sizes``,
        also how many training images they hold."""
        known = self.train_size if sizes else self.client_of
        unknown = [n for n in self._grid.get_node_ids() if n not in known]
        if not unknown:
            return
        ask = RecordDict({"train-size": ConfigRecord()}) if sizes else RecordDict()
        messages = [Message(ask, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        replies, _ = exchange(self._grid, messages, timeout, stop)
        for reply in replies:
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                metrics = reply.content.metric_records["metrics"]
                pid = int(_num(metrics["partition-id"]))
                self.client_of[reply.metadata.src_node_id] = pid
                if "train-size" in metrics:
                    self.train_size[reply.metadata.src_node_id] = int(_num(metrics["train-size"]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def wait_for_nodes(
    grid: Grid | LiveGrid,
    wanted: int,
    timeout: float,
    stop: threading.Event | None = None,
    hint: str = "",
) -> list[int]:
    """Wait until ``wanted`` nodes are connected; fail with a clear message after ``timeout``."""
    start = time.monotonic()
    last_note = start
    while len(nodes := list(grid.get_node_ids())) < wanted:
        now = time.monotonic()
        if stop is not None and stop.is_set():
            raise RunInterrupted("stopped by the user")
        if now - start > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of {wanted} nodes connected within {timeout:.0f} s{hint}"
            )
        if now - last_note > 10:
            log.warning("waiting for nodes: %d of %d connected", len(nodes), wanted)
            last_note = now
        time.sleep(0.2)
    return nodes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(reason: str) -> str:
    """The last line of a client's error (usually ``SomeError: message``), without colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", reason).splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def _num(value: object) -> float:
    """A scalar metric as a float (Flower types record values as scalars or lists)."""
    return float(cast(float, value))


def check_update(reply: Message, reference: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's update must not be aggregated, or None if it is sound.

    An update must carry exactly the global model's arrays, with the same shapes,
    all finite, and a positive ``num-examples``.
    """
    try:
        arrays = reply.content.array_records["arrays"]
        metrics = reply.content.metric_records["metrics"]
    except KeyError as exc:
        return f"reply lacks {exc}"
    names = set(arrays.keys())
    if names != set(reference):
        missing, extra = sorted(set(reference) - names), sorted(names - set(reference))
        return f"arrays do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, array in arrays.items():
        values = array.numpy()
        if tuple(values.shape) != reference[name]:
            return f"array {name} has shape {tuple(values.shape)}, expected {reference[name]}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {name} holds non-finite values (NaN or Inf)"
    n = metrics.get("num-examples")
    if not isinstance(n, int | float) or not n > 0:
        return f"num-examples is {n!r}, expected a positive number"
    return None


def _in_client_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by client, so aggregation sums in the same order every run.

    Replies arrive in the order clients finish; floating-point sums depend on order,
    so without this two identical runs differ in the 7th digit.
    """

    def key(reply: Message) -> tuple[int, float]:
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            return (1, float(reply.metadata.src_node_id))
        return (0, _num(reply.content.metric_records["metrics"].get("partition-id", 0)))

    return sorted(replies, key=key)


@dataclass
class RoundOutcome:
    """What one round's replies amount to."""

    usable: list[Message]
    rows: list[dict[str, Any]]
    failed_nodes: list[int]  # failed or silent: left out of later rounds

    @property
    def ok(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def failed(self) -> int:
        return len(self.rows) - self.ok

    def summary(self) -> str:
        """How many replies ended how, e.g. ``2 timeout, 1 failed``."""
        counts = Counter(row["status"] for row in self.rows)
        return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no replies"


def sort_replies(
    server_round: int,
    replies: list[Message],
    missing: list[int],
    reference: dict[str, tuple[int, ...]],
    node_to_client: dict[int, int],
    check: Callable[[Message], str | None] | None = None,
    refused: dict[int, str] | None = None,
    sent: dict[int, int] | None = None,
) -> RoundOutcome:
    """Split a round's replies into usable updates and failures, one record row each.

    ``check`` may reject a well-formed reply (it returns the reason); the replies of
    nodes in ``refused`` are rejected for the reason given there. ``sent``: the bytes
    each node sent this round, where the replies no longer hold them (secure
    aggregation); otherwise they are counted here."""
    out = RoundOutcome([], [], [])

    def failure(node: int, status: str, reason: str) -> None:
        # A rejected update is dropped but its node stays in: the node is alive,
        # and one bad update (an overflow, say) need not repeat.
        if status != "rejected":
            out.failed_nodes.append(node)
        out.rows.append(
            {
                "round": server_round,
                "client_id": node_to_client.get(node, ""),
                "node_id": node,
                "status": status,
                "error": reason,
            }
        )
        log.warning("round %d: node %s %s: %s", server_round, node, status, reason)

    for reply in _in_client_order(replies):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failure(node, "failed", error_summary(reply.error.reason or ""))
            continue
        if refused and node in refused:
            failure(node, "rejected", refused[node])
            continue
        problem = check_update(reply, reference) or (check(reply) if check else None)
        m = reply.content.metric_records.get("metrics")
        if m is not None and "partition-id" in m:
            node_to_client[node] = int(_num(m["partition-id"]))
        if problem:
            failure(node, "rejected", problem)
            continue
        assert m is not None
        out.usable.append(reply)
        out.rows.append(
            {
                "round": server_round,
                "client_id": node_to_client[node],
                "node_id": node,
                "status": "ok",
                "num_examples": int(_num(m["num-examples"])),
                "train_loss": _num(m["train_loss"]),
                "site_accuracy": _num(m.get("site_accuracy", float("nan"))),
                "site_auc": _num(m.get("site_auc", float("nan"))),
                "site_loss": _num(m.get("site_loss", float("nan"))),
                "site_balanced_accuracy": _num(m.get("site_balanced_accuracy", float("nan"))),
                **{
                    f"personal_{k}": _num(m.get(f"personal_{k}", float("nan")))
                    for k in ("accuracy", "auc", "balanced_accuracy", "loss")
                },
                "val_size": int(_num(m["val-size"])) if "val-size" in m else "",
                "train_accuracy": _num(m["train_accuracy"]),
                "lr": _num(m.get("lr", float("nan"))),
                "local_val_accuracy": _num(m.get("local_val_accuracy", float("nan"))),
                "epsilon": _num(m.get("epsilon", float("nan"))),
                "seconds": _num(m.get("seconds", float("nan"))),
                "upload_bytes": sent[node] if sent else payload_bytes(reply.content),
            }
        )
    for node in missing:
        failure(node, "timeout", "no reply within --round-timeout")
    return out


def _secure_round(
    grid: Grid,
    messages: list[Message],
    cfg: ExperimentConfig,
    server_round: int,
    arrays: ArrayRecord,
    live: LiveGrid,
    stop: threading.Event | None,
) -> tuple[list[Message], list[int], dict[int, str], dict[int, int]]:
    """One round's exchange under secure aggregation (:mod:`medbloom.federation.secure`):
    the replies (each surviving hospital's carries the new global weights in place of
    its update, which the server never sees), the nodes that did not answer, why each
    node whose reply cannot count was refused (an unusable masked update; every node
    still alive where the sum could not be unmasked), and the bytes each node sent over
    the round's four stages."""
    from medbloom.federation.secure import SecureRound

    nodes = [m.metadata.dst_node_id for m in messages]
    max_weight = max((live.train_size.get(n, 0) for n in nodes), default=0)
    if max_weight <= 0:
        raise RuntimeError(
            f"round {server_round}: the hospitals did not say how many images they hold"
        )
    threshold = cfg.secure_threshold()
    if len(messages) < threshold:
        raise RuntimeError(
            f"round {server_round}: {len(messages)} hospitals sampled, fewer than the "
            f"secure-aggregation threshold of {threshold}: raise --fraction-train or lower "
            "--secagg-threshold"
        )
    polls = _reply_polls(grid)
    outcome, _ = SecureRound(
        lambda msgs, flag: exchange(grid, msgs, cfg.round_timeout, flag, *polls),
        messages,
        server_round,
        threshold,
        max_weight,
        stop,
        seed=cfg.seed * 1_000_003 + server_round,
    ).run(arrays)
    refused = dict(outcome.rejected)
    if outcome.aborted:
        refused.update(dict.fromkeys(outcome.alive, outcome.aborted))
    return outcome.replies, outcome.missing, refused, outcome.sent


def personal_spread(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Over the hospitals that scored the model they use (``personal_*``: their own
    model, or the global one where a strategy has no personal parameters) on their own
    validation split this round: the mean weighted by the split's size, the median and
    the worst ACC, the mean and worst balanced ACC, and how many sites were left out
    for a split under :data:`MIN_SITE_IMAGES` images. NaN when none scored."""
    scored = [
        r
        for r in rows
        if r.get("status") == "ok" and np.isfinite(r.get("personal_accuracy", float("nan")))
    ]
    sized = [r for r in scored if isinstance(r.get("val_size"), int)]
    small = [r for r in sized if r["val_size"] < MIN_SITE_IMAGES]
    kept = [r for r in sized if r["val_size"] >= MIN_SITE_IMAGES]
    nan = float("nan")
    out = {
        "personal_mean_accuracy": nan,
        "personal_median_accuracy": nan,
        "personal_worst_accuracy": nan,
        "personal_mean_balanced_accuracy": nan,
        "personal_worst_balanced_accuracy": nan,
        "small_sites": len(small) if scored else nan,
    }
    if kept:
        acc = np.array([r["personal_accuracy"] for r in kept], dtype=float)
        bal = np.array([r["personal_balanced_accuracy"] for r in kept], dtype=float)
        n = np.array([r["val_size"] for r in kept], dtype=float)
        out.update(
            personal_mean_accuracy=float((acc * n).sum() / n.sum()),
            personal_median_accuracy=float(np.median(acc)),
            personal_worst_accuracy=float(acc.min()),
            personal_mean_balanced_accuracy=float((bal * n).sum() / n.sum()),
            personal_worst_balanced_accuracy=float(bal.min()),
        )
    return out


def _private_check(
    layout: Layout, sent: ArrayRecord, private: list[str]
) -> Callable[[Message], str | None]:
    """A check that rejects a reply whose private entries (those a personalised
    strategy keeps at the hospital) are not the global values the server sent: a
    hospital must never send its own."""
    expected = layout.unpack(sent)

    def check(reply: Message) -> str | None:
        got = layout.unpack(reply.content.array_records["arrays"])
        for key in private:
            if not torch.equal(got[key], expected[key]):
                return f"the reply carries the hospital's own {key}, which must stay there"
        return None

    return check


class PooledTrainer:
    """``--strategy pooled``: the baseline of all training data in one place. Each round
    one model trains for ``--local-epochs`` on every hospital's training images together
    (the same images, epochs and recipe the hospitals have), and each hospital's
    validation split scores it, as if every hospital used the pooled model."""

    def __init__(self, cfg: ExperimentConfig, evaluator: Evaluator) -> None:
        from medbloom.experiment import client_data
        from medbloom.training import class_log_prior, class_weights

        self.cfg = cfg
        self.sites = [client_data(cfg, pid, cfg.num_clients) for pid in range(cfg.num_clients)]
        self.train_split = TensorSplit(
            torch.cat([d.train.x for d in self.sites]),
            torch.cat([d.train.y for d in self.sites]),
            np.concatenate([d.train.labels for d in self.sites]),
        )
        labels, k = self.train_split.labels, evaluator.spec.num_classes
        self.weights = class_weights(labels, k, cfg.class_weighting)
        self.log_prior = class_log_prior(labels, k, cfg.class_weighting)
        self.model = initial_model(cfg, evaluator.spec)
        self.layout = evaluator.layout

    def train(
        self, server_round: int, arrays: ArrayRecord, site_eval: bool
    ) -> tuple[ArrayRecord, dict[str, Any], RoundOutcome]:
        from medbloom.federation.client_app import _scores, as_personal, fit
        from medbloom.training import client_seed

        cfg, spec = self.cfg, self.sites[0].spec
        started = time.monotonic()
        load_arrays(self.model, self.layout.unpack(arrays))
        device = resolve_device(cfg.device)
        amp = resolve_precision(cfg.precision, device)
        # as the hospitals of the other strategies do: the model of the last round, on
        # each hospital's validation split, before this round's training
        scores = [
            _scores(self.model, site.val, spec.task, device, amp)
            if len(site.val) and site_eval
            else {}
            for site in self.sites
        ]
        seed = client_seed(cfg.seed, server_round, 0)
        result = fit(
            cfg, self.model, self.train_split, self.weights, spec, server_round, seed, device,
            amp, log_prior=self.log_prior,
        )  # fmt: skip
        rows = []
        seconds = time.monotonic() - started
        for pid, (site, scored) in enumerate(zip(self.sites, scores, strict=True)):
            rows.append(
                {
                    "round": server_round,
                    "client_id": pid,
                    "node_id": "",
                    "status": "ok",
                    "num_examples": len(site.train),
                    "val_size": len(site.val),
                    "train_loss": result.train_loss,
                    "train_accuracy": result.train_accuracy,
                    "lr": cfg.round_lr(server_round),
                    "seconds": seconds,
                    **scored,
                    **as_personal(scored),
                }
            )
        metrics = {"train_loss": result.train_loss, "train_accuracy": result.train_accuracy}
        new = self.layout.pack(state_arrays(self.model))
        return new, metrics, RoundOutcome([], rows, [])


def site_spread(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Worst, median and spread (max - min) of the per-hospital ACC in a round's rows
    (the global model each hospital received, on its own validation split); NaN when
    no hospital scored it this round."""
    accs = [
        float(r["site_accuracy"])
        for r in rows
        if r.get("status") == "ok" and np.isfinite(r.get("site_accuracy", float("nan")))
    ]
    if not accs:
        nan = float("nan")
        return {
            "worst_site_accuracy": nan,
            "median_site_accuracy": nan,
            "site_accuracy_spread": nan,
        }
    return {
        "worst_site_accuracy": min(accs),
        "median_site_accuracy": float(np.median(accs)),
        "site_accuracy_spread": max(accs) - min(accs),
    }


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every round of the experiment over ``grid`` and record it in ``run_dir``.

    With ``resume`` the run continues after the last round in
    ``checkpoints/latest.pt``: global model, strategy state (server optimizer
    moments) and round number come back (client sampling and training are seeded
    per round), and rows of a round in
    flight are dropped, so the finished record equals an uninterrupted run's.

    A node that fails or does not answer within ``round_timeout`` is recorded and
    left out; the round aggregates the others. Rounds go on while at least
    ``min_clients`` nodes remain. Returns the last metrics row.
    """
    # Rounds are synchronous: while the server evaluates, every client waits for the
    # next round, so evaluation may use every core (clients train on one thread each).
    set_threads(usable_cpus())
    if cfg.score_model:
        return score_federation(grid, cfg, run_dir, on_round, stop)
    ckpt = _load_resume_state(run_dir) if resume else None
    evaluator, handler, recorder = _open_records(cfg, run_dir, ckpt["round"] if ckpt else None)
    status, error, disk_failed = "failed", None, False
    live = LiveGrid(grid, set())
    min_clients = min(cfg.min_clients, cfg.num_clients)
    secure_on = cfg.secure_aggregation == "on"
    if secure_on:  # a round needs at least the hospitals whose shares unmask its sum
        min_clients = max(min_clients, cfg.secure_threshold())
    simulated = flower_internals.is_simulation_grid(grid)
    try:
        if ckpt:
            strategy = _restored_strategy(cfg, ckpt, run_dir)
            if "privacy_accountant" in ckpt:  # --privacy hospital: spent so far
                from medbloom.privacy import hospital_accountant

                strategy.accountant = hospital_accountant(cfg)
                strategy.accountant.load_state_dict(ckpt["privacy_accountant"])
            arrays = _global_arrays(ckpt, evaluator.layout)
            first, offset = ckpt["round"] + 1, float(ckpt["metrics"]["elapsed_seconds"])
            log.info("resuming after round %d of %d", ckpt["round"], cfg.rounds)
        else:
            strategy = build_strategy(cfg)
            arrays = evaluator.layout.pack(state_arrays(evaluator.model))
            first, offset = 1, 0.0
        reference = evaluator.layout.reference()
        private = private_keys(
            cfg.strategy, evaluator.model, [e[0] for e in evaluator.layout.entries]
        )
        global_model = cfg.strategy not in NO_GLOBAL_MODEL
        pooled = PooledTrainer(cfg, evaluator) if cfg.strategy == "pooled" else None
        if pooled is not None and not simulated:
            raise MedbloomError(
                "--strategy pooled trains one model on every hospital's images in one "
                "place: a baseline for the simulation (medbloom run), not a deployment"
            )
        wait_for_nodes(
            live,
            cfg.num_clients if not ckpt else min_clients,
            cfg.round_timeout,
            stop,
            f'; under `flwr run` pass --federation-config "num-supernodes={cfg.num_clients}"',
        )
        started = time.monotonic() - offset
        row: dict[str, Any] = dict(ckpt["metrics"]) if ckpt else {}
        if not ckpt:
            t_eval = time.monotonic()
            flat, state = _unpacked(arrays, evaluator.layout)
            row = {
                "round": 0,
                **(evaluator(state) if global_model else evaluator.blank()),
                "epsilon": recorder.epsilon(),
                "round_seconds": 0.0,
            }
            row["eval_seconds"] = time.monotonic() - t_eval
            row["elapsed_seconds"] = 0.0
            _record(recorder, row, state, flat, on_round, cfg, evaluator.last_report, strategy)
        for server_round in range(first, cfg.rounds + 1):
            if stop is not None and stop.is_set():
                raise RunInterrupted("stopped by the user")
            left_out = (
                f"--min-clients {min_clients}"
                + (" (the secure-aggregation threshold)" if min_clients > cfg.min_clients else "")
                + f"; {len(live.suspects)} failed and were left out"
            )
            if simulated and (left := len(live.get_node_ids())) < min_clients:
                # A simulation's clients are all there from the start and a failed one
                # is not asked again: waiting for more could only run into the timeout.
                raise RuntimeError(
                    f"only {left} clients left of the {min_clients} a round needs ({left_out})"
                )
            wait_for_nodes(live, min_clients, cfg.round_timeout, stop, f" ({left_out})")
            t0 = time.monotonic()
            live.identify(cfg.round_timeout, stop, sizes=secure_on)
            # Flower samples nodes with the global `random` module, which other code in
            # this process also draws from: seeding it per round makes the choice
            # depend on (seed, round, live clients) only, also across a resume.
            random.seed(cfg.seed * 1_000_003 + server_round)
            site_eval = cfg.site_eval_every > 0 and server_round % cfg.site_eval_every == 0
            if pooled is not None:
                new_arrays, train_metrics, outcome = pooled.train(server_round, arrays, site_eval)
                recorder.record_clients(outcome.rows)
            else:
                messages = strategy.configure_train(
                    server_round, arrays, ConfigRecord({"site-eval": site_eval}), live
                )
                if cfg.batched == "on":
                    from medbloom.federation.batched_round import train_round_batched

                    replies = train_round_batched(list(messages), cfg, live.client_of)
                    missing: list[int] = []
                    refused, sent = None, None
                elif secure_on:
                    replies, missing, refused, sent = _secure_round(
                        grid, list(messages), cfg, server_round, arrays, live, stop
                    )
                else:
                    replies, missing = exchange(
                        grid, messages, cfg.round_timeout, stop, *_reply_polls(grid)
                    )
                    refused, sent = None, None
                check = _private_check(evaluator.layout, arrays, private) if private else None
                outcome = sort_replies(
                    server_round, replies, missing, reference, live.client_of, check,
                    refused, sent,
                )  # fmt: skip
                live.suspects.update(outcome.failed_nodes)
                recorder.record_clients(outcome.rows)
                if cfg.privacy == "hospital" and outcome.failed:
                    # Flower's accountant calibrates each round's noise for every
                    # hospital: a round without one cannot be released as accounted
                    raise RuntimeError(
                        f"round {server_round}: --privacy hospital needs every hospital's "
                        f"update every round ({outcome.summary()}); the run stops after "
                        "its last complete round: resume it (--resume) once every "
                        "hospital is back"
                    )
                if not outcome.usable and refused:
                    # secure aggregation: the sum could not be unmasked; the global model
                    # stays as it was, and the next round goes on as --min-clients says
                    log.warning(
                        "round %d: %s", server_round, "; ".join(sorted(set(refused.values())))
                    )
                elif not outcome.usable:
                    raise RuntimeError(
                        f"round {server_round}: no client returned a usable update "
                        f"({outcome.summary()}; --round-timeout {cfg.round_timeout:g} s)"
                    )
                new_arrays, train_metrics = (
                    strategy.aggregate_train(server_round, outcome.usable)
                    if outcome.usable
                    else (arrays, {})
                )
                if new_arrays is None:
                    raise RuntimeError(f"round {server_round}: the strategy aggregated nothing")
                if cfg.strategy == "local":
                    new_arrays = arrays  # each hospital alone: nothing is aggregated
            if cfg.privacy == "hospital":
                recorder.note_server_epsilon(strategy.privacy_spent().epsilon)
            arrays = new_arrays
            now = time.monotonic()
            flat, state = _unpacked(arrays, evaluator.layout)
            scores = evaluator(state) if global_model else evaluator.blank()
            done = time.monotonic()
            row = {
                "round": server_round,
                **scores,
                "train_loss": _num(train_metrics["train_loss"]) if train_metrics else float("nan"),
                "train_accuracy": _num(train_metrics["train_accuracy"])
                if train_metrics
                else float("nan"),
                **site_spread(outcome.rows),
                **personal_spread(outcome.rows),
                "epsilon": recorder.epsilon(),
                "clients_ok": outcome.ok,
                "clients_failed": outcome.failed,
                "round_seconds": now - t0,
                "eval_seconds": done - now,
                "elapsed_seconds": done - started,
            }
            _record(recorder, row, state, flat, on_round, cfg, evaluator.last_report, strategy)
        _closing_scores(evaluator, recorder, cfg, run_dir)
        status = "finished"
        return row
    except RunInterrupted as exc:
        status, error = "interrupted", str(exc)
        log.warning("run interrupted after %d recorded rounds", max(recorder.rows - 1, 0))
        _closing_scores(evaluator, recorder, cfg, run_dir)
        raise
    except BaseException as exc:
        # a full disk says which file and why, without the exception's class name
        disk_failed = isinstance(exc, RecordWriteError)
        error = str(exc) if disk_failed else f"{type(exc).__name__}: {exc}"
        log.error("run failed: %s", error)
        raise
    finally:
        # The plots before the final status: once summary.json says how the run
        # ended, everything is written (`medbloom launch` then stops the processes).
        # On a full disk, no plots: their room goes to the summary that says so.
        try:
            if not disk_failed:
                _write_plots(run_dir, status)
                _write_model_card(recorder, run_dir, status, error)
        finally:
            recorder.close(status, error)
            detach_log_file(handler)


def _closing_scores(
    evaluator: Evaluator, recorder: RunRecorder, cfg: ExperimentConfig, run_dir: Path
) -> None:
    """When a run ends (finished or stopped): the final and best models' intervals and
    calibration, for strategies that have a global model to score."""
    if cfg.strategy not in NO_GLOBAL_MODEL:
        recorder.intervals = _intervals(evaluator, run_dir, cfg.seed)
        recorder.calibration = _calibration(evaluator, run_dir)


def _open_records(
    cfg: ExperimentConfig, run_dir: Path, resume_round: int | None = None
) -> tuple[Evaluator, logging.Handler, RunRecorder]:
    """The server's evaluator (with the clean test split the run recorded), its log
    file and the run's recorder (going on after ``resume_round``, if given)."""
    evaluator = Evaluator(cfg)
    clean = clean_test_split(run_dir, len(evaluator.test))
    evaluator.clean = clean[1] if clean else None
    if clean is not None and not len(clean[1]):
        log.warning("every test image has a twin in training: no clean test split")
    handler = attach_log_file(run_dir / "logs" / "server.log")
    recorder = RunRecorder(
        run_dir,
        cfg,
        {**spec_summary(evaluator.spec), "clean_test": clean[0] if clean else None},
        resume_round=resume_round,
    )
    return evaluator, handler, recorder


def score_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Federated evaluation (``--score-model``): every hospital scores the scored run's
    best model on all its own images and replies with its scores only; nothing is
    trained or aggregated. ``clients.csv`` is the per-hospital table (round 1), and
    ``metrics.csv`` has the model on the server's test split (round 0) and, in round 1,
    the same with the hospitals' worst, median and spread. Returns the last row."""
    from medbloom.experiment import SCORED_SETTINGS, scoring_config
    from medbloom.trained import load_trained

    cfg = scoring_config(cfg)
    evaluator, handler, recorder = _open_records(cfg, run_dir)
    status, error = "failed", None
    live = LiveGrid(grid, set())
    try:
        trained = load_trained(Path(cfg.score_model), "best")
        state = state_arrays(trained.model)
        arrays = evaluator.layout.pack(state)
        wait_for_nodes(live, cfg.num_clients, cfg.round_timeout, stop, "")
        started = time.monotonic()
        live.identify(cfg.round_timeout, stop)
        row: dict[str, Any] = {"round": 0, **evaluator(state), "round_seconds": 0.0}
        row["eval_seconds"] = row["elapsed_seconds"] = time.monotonic() - started
        recorder.record_round(row, state, evaluator.last_report)
        settings = {k: getattr(cfg, k) for k in SCORED_SETTINGS}
        record = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **settings})}
        )
        messages = [
            Message(content=record, dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in live.get_node_ids()
        ]
        t0 = time.monotonic()
        replies, missing = exchange(grid, messages, cfg.round_timeout, stop, *_reply_polls(grid))
        rows = _score_rows(replies, missing, live.client_of)
        recorder.record_clients(rows)
        ok = sum(r["status"] == "ok" for r in rows)
        if not ok:
            raise RuntimeError(f"no hospital returned its scores ({len(rows)} asked)")
        row = {
            **row,
            "round": 1,
            **site_spread(rows),
            "clients_ok": ok,
            "clients_failed": len(rows) - ok,
            "round_seconds": time.monotonic() - t0,
            "elapsed_seconds": time.monotonic() - started,
        }
        recorder.record_round(row, state, evaluator.last_report)
        if on_round is not None:
            on_round({**row, "is_best": False, "best": recorder.best})
        for r in rows:
            log.info(
                "hospital %s: %s%s",
                r["client_id"],
                r["status"],
                f", {r['num_examples']} images, acc {r['site_accuracy']:.4f}"
                if r["status"] == "ok"
                else f": {r['error']}",
            )
        recorder.intervals = _intervals(evaluator, run_dir, cfg.seed)
        status = "finished"
        return row
    except RunInterrupted as exc:
        status, error = "interrupted", str(exc)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("federated evaluation failed: %s", error)
        raise
    finally:
        try:
            _write_model_card(recorder, run_dir, status, error)
        finally:
            recorder.close(status, error)
            detach_log_file(handler)


def _score_rows(
    replies: list[Message], missing: list[int], client_of: dict[int, int]
) -> list[dict[str, Any]]:
    """One clients.csv row per hospital asked: its scores, or why there are none."""
    rows: list[dict[str, Any]] = []
    for reply in _in_client_order(replies):
        node = reply.metadata.src_node_id
        base = {"round": 1, "client_id": client_of.get(node, ""), "node_id": node}
        m = None if reply.has_error() else reply.content.metric_records.get("metrics")
        if m is None:
            reason = error_summary(reply.error.reason or "") if reply.has_error() else "no scores"
            rows.append({**base, "status": "failed", "error": reason})
            continue
        rows.append(
            {
                **base,
                "status": "ok",
                "num_examples": int(_num(m["num-examples"])),
                "site_accuracy": _num(m.get("site_accuracy", float("nan"))),
                "site_auc": _num(m.get("site_auc", float("nan"))),
                "site_loss": _num(m.get("site_loss", float("nan"))),
                "site_balanced_accuracy": _num(m.get("site_balanced_accuracy", float("nan"))),
                **{
                    f"personal_{k}": _num(m.get(f"personal_{k}", float("nan")))
                    for k in ("accuracy", "auc", "balanced_accuracy", "loss")
                },
                "val_size": int(_num(m["val-size"])) if "val-size" in m else "",
                "seconds": _num(m.get("seconds", float("nan"))),
            }
        )
    for node in missing:
        rows.append(
            {
                "round": 1,
                "client_id": client_of.get(node, ""),
                "node_id": node,
                "status": "timeout",
                "error": "no reply within --round-timeout",
            }
        )
    return rows


def clean_test_split(run_dir: Path, n_test: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """The clean test split as the run recorded it when it was prepared (its
    ``leakage.json``): summary.json's ``clean_test`` (how many test images it leaves out
    and why) and the indices of the test images it keeps. None with ``--audit off`` (or
    a run from before the audit). Read, not recomputed: the server of a deployment runs
    in another process than the one that audited the data set."""
    try:
        record = json.loads((run_dir / "leakage.json").read_text(encoding="utf-8"))
        clean = record["clean_test"]
        left_out = [int(e["test_index"]) for e in record["left_out"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(clean, dict):
        return None
    return clean, np.setdiff1d(np.arange(n_test), left_out)


def _intervals(evaluator: Evaluator, run_dir: Path, seed: int) -> dict[str, Any] | None:
    """The bootstrap intervals for summary.json; a problem is logged, never fatal to a
    run whose rounds are all recorded."""
    if evaluator.last_probs is None:
        return None
    try:
        return evaluator.intervals(run_dir, seed)
    except Exception as exc:
        log.warning("could not compute the confidence intervals: %s", exc)
        return None


def _calibration(evaluator: Evaluator, run_dir: Path) -> dict[str, Any] | None:
    """Calibration of the final and best models for summary.json, with
    ``calibration.json`` (the reliability bins too) and ``reliability.png``; a problem
    is logged, never fatal to a run whose rounds are all recorded."""
    from medbloom.calibration import plot_reliability
    from medbloom.runs import atomic_write_json

    try:
        report = evaluator.calibration(run_dir)
    except Exception as exc:
        log.warning("could not measure calibration: %s", exc)
        return None
    if not report:
        return None
    atomic_write_json(run_dir / "calibration.json", report)
    which = "best" if "best" in report else "final"
    try:
        plot_reliability(report[which], run_dir / "reliability.png", f"{which} model, test split")
    except Exception as exc:
        log.warning("could not draw the reliability diagram: %s", exc)
    return {
        name: {k: v for k, v in r.items() if not k.startswith("reliability")}
        for name, r in report.items()
    }


def _write_model_card(recorder: RunRecorder, run_dir: Path, status: str, error: str | None) -> None:
    """``model_card.md`` from the run directory, with the summary as the run ends; a
    problem is logged, never fatal to the run."""
    from medbloom.model_card import write_model_card

    try:
        recorder.write_summary(status, error)
        write_model_card(run_dir)
    except Exception as exc:
        log.warning("could not write the model card: %s", exc)


def _write_plots(run_dir: Path, status: str) -> None:
    """The run's PNG plots, titled with how the run ended; a plotting problem is logged,
    never fatal to the run."""
    from medbloom.plots import write_report

    try:
        write_report(run_dir, status)
    except Exception as exc:
        log.warning("could not write the plots: %s", exc)


def _restored_strategy(cfg: ExperimentConfig, ckpt: dict[str, Any], run_dir: Path) -> Any:
    """The strategy rebuilt from ``cfg`` with the running state the checkpoint holds."""
    try:
        return restore_strategy(cfg, ckpt["strategy_state"])
    except ValueError as exc:
        raise MedbloomError(f"--resume {run_dir}: {exc}") from None


def _load_resume_state(run_dir: Path) -> dict[str, Any]:
    from medbloom.runs import load_resume_checkpoint

    return load_resume_checkpoint(run_dir)


def _unpacked(
    arrays: ArrayRecord, layout: Layout
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """The global arrays deserialised once: the packed values, and the state dict
    (views of them) that evaluation and the checkpoints use."""
    flat = flat_values(arrays)
    return flat, layout.unflatten(flat)


def _global_arrays(ckpt: dict[str, Any], layout: Layout) -> ArrayRecord:
    """The packed global arrays a checkpoint resumes from: its model, plus the
    values the model's dtype cannot hold exactly (a server optimizer's float64)."""
    arrays = layout.pack({n: ckpt["model"][n].to(dtype) for n, _, dtype in layout.entries})
    for key, values in ckpt.get("global_arrays", {}).items():
        arrays[key] = Array(np.asarray(values))
    return arrays


def _record(
    recorder: RunRecorder,
    row: dict[str, Any],
    state: dict[str, torch.Tensor],
    flat: dict[str, np.ndarray],
    on_round: RoundCallback | None,
    cfg: ExperimentConfig,
    per_class: dict[str, Any],
    strategy: Any,
) -> None:
    # The checkpoint's "model" is the state dict in the model's own dtype. Packed
    # arrays of a wider dtype (FedAdam computes in float64; the array is named by
    # the model's dtype) are kept as they are too, so a resumed run goes on from
    # the same numbers; with FedAvg there are none and nothing is stored twice.
    resume_state: dict[str, Any] = {
        "global_arrays": {k: v for k, v in flat.items() if v.dtype.name != k},
    }
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        # Flower's RdpAccountant state is JSON-able: numbers, strings, lists
        resume_state["privacy_accountant"] = accountant.state_dict()
    resume_state["strategy_state"] = strategy_state(strategy)
    is_best = recorder.record_round(row, state, per_class, resume_state)
    log.info(
        "round %d/%d: test acc %.4f auc %.4f, val auc %.4f%s",
        row["round"],
        cfg.rounds,
        row["accuracy"],
        row["auc"],
        row["val_auc"],
        " (best so far)" if is_best else "",
    )
    if on_round is not None:
        on_round({**row, "is_best": is_best, "best": recorder.best})


def _log_progress(rounds: int) -> RoundCallback:
    """Under ``flwr run`` the progress goes through Flower's logger, which ``--stream`` shows."""

    def report(row: dict[str, Any]) -> None:
        flwr_log(
            INFO,
            "medbloom round %d/%d: test acc %.4f auc %.4f, val auc %.4f, %.1f s",
            row["round"],
            rounds,
            row["accuracy"],
            row["auc"],
            row["val_auc"],
            row["elapsed_seconds"],
        )

    return report


def make_server_app(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp. ``medbloom run`` passes a prepared config and run directory.

    Under ``flwr run`` both come from the run config: an ``out`` that
    ``medbloom launch`` prepared (it holds config.json) is used as it is, and one
    that holds a checkpoint is resumed; otherwise a new run directory is made.
    Creating ``out/STOP`` stops the run (``medbloom launch`` does so on Ctrl-C).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or ExperimentConfig.from_mapping(context.run_config, "run config").validate()
        if not ablated("pulls"):
            flower_internals.shorten_pull_backoff()
        flower_internals.bound_pull_time(run_cfg.round_timeout)
        path, resuming = run_dir, resume
        if path is None and run_cfg.out and (Path(run_cfg.out) / "config.json").exists():
            path = Path(run_cfg.out)
            resuming = (path / "checkpoints" / "latest.pt").exists()
        if path is None:
            path = prepare_run(run_cfg, argv=["flwr", "run"])
        flwr_log(INFO, "medbloom run directory: %s%s", path, " (resuming)" if resuming else "")
        run_federation(
            grid,
            run_cfg,
            path,
            on_round or _log_progress(run_cfg.rounds),
            stop or StopFlag(path / "STOP"),
            resume=resuming,
        )

    return app


# The component `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
