"""The ServerApp: sample hospitals, aggregate their weights with a Flower strategy,
evaluate the global model at the server after every round, and record the run.

The round loop is medbloom's own rather than ``Strategy.start``: it calls the same
strategy methods (``configure_train``, ``aggregate_train``) but keeps every reply,
so each client's result is recorded and each round's row is written the moment
the round ends.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from medbloom.config import ExperimentConfig
from medbloom.data.types import DatasetSpec
from medbloom.experiment import TensorSplit, initial_model, prepare_run, server_data, spec_summary
from medbloom.federation.strategies import build_strategy
from medbloom.metrics import evaluate_scores, per_class_report
from medbloom.runs import RunRecorder, attach_log_file, detach_log_file
from medbloom.training import load_arrays, predict, resolve_device, set_threads, state_arrays

log = logging.getLogger("medbloom")

RoundCallback = Callable[[dict[str, Any]], None]


class Evaluator:
    """Centralized evaluation of a global model on the validation and test splits."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.spec, self.val, self.test = server_data(cfg)
        self.model = initial_model(cfg, self.spec)
        self.device = resolve_device(cfg.device)

        self.last_report: dict[str, Any] = {}

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Scores on test (no prefix) and validation (``val_``); the test split's
        per-class report is kept in ``last_report``."""
        load_arrays(self.model, arrays.to_torch_state_dict())
        out, probs = self._split(self.test, "")
        self.last_report = per_class_report(
            self.test.labels, probs, self.spec.task, self.spec.class_names
        )
        out.update(self._split(self.val, "val_")[0])
        return out

    def _split(self, split: TensorSplit, prefix: str) -> tuple[dict[str, float], np.ndarray]:
        probs, loss = predict(self.model, split.x, split.y, self.spec.task, device=self.device)
        scores = evaluate_scores(split.labels, probs, self.spec.task)
        scores["loss"] = loss
        return {prefix + k: v for k, v in scores.items()}, probs


class RunInterrupted(Exception):
    """The user asked the run to stop (Ctrl-C or SIGTERM)."""


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    stop: threading.Event | None = None,
    poll: float = 0.05,
) -> list[Message]:
    """Send messages and collect replies until all are in, ``timeout`` passes, or ``stop``.

    Flower's ``Grid.send_and_receive`` does the same but sleeps 3 s between polls
    against a remote SuperLink and cannot be interrupted.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        if stop is not None and stop.is_set():
            raise RunInterrupted("stopped by the user")
        if time.monotonic() > deadline:
            log.warning("%d replies still missing after %.0f s; going on", len(pending), timeout)
            break
        time.sleep(poll)
    return replies


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Wait until ``wanted`` nodes are connected; fail with a clear message after ``timeout``."""
    start = time.monotonic()
    last_note = start
    while len(nodes := list(grid.get_node_ids())) < wanted:
        now = time.monotonic()
        if now - start > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of {wanted} nodes connected within {timeout:.0f} s; "
                f'under `flwr run` pass --federation-config "num-supernodes={wanted}"'
            )
        if now - last_note > 10:
            log.warning("waiting for nodes: %d of %d connected", len(nodes), wanted)
            last_note = now
        time.sleep(0.2)
    if len(nodes) > wanted:
        log.warning("%d nodes are connected; the experiment expects %d", len(nodes), wanted)
    return nodes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(reason: str) -> str:
    """The last line of a client's error (usually ``SomeError: message``), without colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", reason).splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def _num(value: object) -> float:
    """A scalar metric as a float (Flower types record values as scalars or lists)."""
    return float(cast(float, value))


def _in_client_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by client, so aggregation sums in the same order every run.

    Replies arrive in the order clients finish; floating-point sums depend on order,
    so without this two identical runs differ in the 7th digit.
    """

    def key(reply: Message) -> tuple[int, float]:
        if reply.has_error():
            return (1, float(reply.metadata.src_node_id))
        return (0, _num(reply.content.metric_records["metrics"]["partition-id"]))

    return sorted(replies, key=key)


def _client_rows(
    server_round: int, replies: Iterable[Message], node_to_client: dict[int, int]
) -> tuple[list[dict[str, Any]], int, int]:
    rows: list[dict[str, Any]] = []
    ok = failed = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed += 1
            rows.append(
                {
                    "round": server_round,
                    "client_id": node_to_client.get(node, ""),
                    "node_id": node,
                    "status": "failed",
                    "error": error_summary(reply.error.reason or ""),
                }
            )
            log.warning("round %d: node %s failed: %s", server_round, node, reply.error.reason)
            continue
        ok += 1
        m = reply.content.metric_records["metrics"]
        cid = int(_num(m["partition-id"]))
        node_to_client[node] = cid
        rows.append(
            {
                "round": server_round,
                "client_id": cid,
                "node_id": node,
                "status": "ok",
                "num_examples": int(_num(m["num-examples"])),
                "train_loss": _num(m["train_loss"]),
                "train_accuracy": _num(m["train_accuracy"]),
                "local_val_accuracy": _num(m.get("local_val_accuracy", float("nan"))),
                "seconds": _num(m.get("seconds", float("nan"))),
            }
        )
    return rows, ok, failed


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run every round of the experiment over ``grid`` and record it in ``run_dir``.

    Returns the last metrics row. Raises if a round gets no usable reply.
    """
    set_threads(int(torch.get_num_threads()) if cfg.device == "cuda" else None)
    random.seed(cfg.seed)  # Flower's node sampling uses the random module
    evaluator = Evaluator(cfg)
    spec: DatasetSpec = evaluator.spec
    handler = attach_log_file(run_dir / "logs" / "server.log")
    recorder = RunRecorder(run_dir, cfg, spec_summary(spec))
    status, error = "failed", None
    try:
        strategy = build_strategy(cfg)
        arrays = ArrayRecord(state_arrays(evaluator.model))
        wait_for_nodes(grid, cfg.num_clients, cfg.round_timeout)
        started = time.monotonic()
        row = {"round": 0, **evaluator(arrays), "round_seconds": 0.0, "elapsed_seconds": 0.0}
        _record(recorder, row, arrays, on_round, cfg, evaluator.last_report)
        node_to_client: dict[int, int] = {}
        for server_round in range(1, cfg.rounds + 1):
            if stop is not None and stop.is_set():
                raise RunInterrupted("stopped by the user")
            t0 = time.monotonic()
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = _in_client_order(exchange(grid, messages, cfg.round_timeout, stop))
            client_rows, ok, failed = _client_rows(server_round, replies, node_to_client)
            recorder.record_clients(client_rows)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if new_arrays is None:
                raise RuntimeError(f"round {server_round}: no client returned a usable update")
            arrays = new_arrays
            now = time.monotonic()
            row = {
                "round": server_round,
                **evaluator(arrays),
                "train_loss": _num(train_metrics["train_loss"]) if train_metrics else float("nan"),
                "train_accuracy": _num(train_metrics["train_accuracy"])
                if train_metrics
                else float("nan"),
                "clients_ok": ok,
                "clients_failed": failed,
                "round_seconds": now - t0,
                "elapsed_seconds": now - started,
            }
            _record(recorder, row, arrays, on_round, cfg, evaluator.last_report)
        status = "finished"
        return row
    except RunInterrupted as exc:
        status, error = "interrupted", str(exc)
        log.warning("run interrupted after round %s", recorder.rows - 1)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("run failed: %s", error)
        raise
    finally:
        recorder.close(status, error)
        detach_log_file(handler)


def _record(
    recorder: RunRecorder,
    row: dict[str, Any],
    arrays: ArrayRecord,
    on_round: RoundCallback | None,
    cfg: ExperimentConfig,
    per_class: dict[str, Any],
) -> None:
    is_best = recorder.record_round(row, arrays.to_torch_state_dict(), per_class)
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
) -> ServerApp:
    """A ServerApp. ``medbloom run`` passes a prepared config and run directory;
    under ``flwr run`` both come from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or ExperimentConfig.from_mapping(context.run_config, "run config").validate()
        path = run_dir or prepare_run(run_cfg, argv=["flwr", "run"])
        flwr_log(INFO, "medbloom run directory: %s", path)
        run_federation(grid, run_cfg, path, on_round or _log_progress(run_cfg.rounds), stop)

    return app


# The component `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
