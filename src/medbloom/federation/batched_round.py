"""Train a round's sampled clients in the server process, together (``--batched on``).

The replies are the Messages the ClientApp would have sent (same arrays, metrics and
``num-examples``), so the server loop, the strategy and the run records do not change.
"""

from __future__ import annotations

import time
from typing import cast

from flwr.app import Message, MetricRecord, RecordDict

from medbloom.batched import train_clients_batched
from medbloom.config import ExperimentConfig
from medbloom.experiment import client_data
from medbloom.federation.client_app import as_personal, site_scores
from medbloom.federation.wire import Layout
from medbloom.metrics import medmnist_acc
from medbloom.models import build_model
from medbloom.training import client_seed, load_arrays, predict, resolve_device, state_arrays


def train_round_batched(
    messages: list[Message], cfg: ExperimentConfig, client_of: dict[int, int]
) -> list[Message]:
    """One reply per message, trained with :func:`train_clients_batched`."""
    if not messages:
        return []
    started = time.perf_counter()
    config = messages[0].content.config_records["config"]
    server_round = int(cast(int, config.get("server-round", 0)))
    mu = float(cast(float, config.get("proximal-mu", 0.0)))
    pids = [client_of[m.metadata.dst_node_id] for m in messages]
    data = [client_data(cfg, pid, cfg.num_clients) for pid in pids]
    spec = data[0].spec
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, spec, freeze=cfg.freeze, privacy=cfg.privacy)
    layout = Layout.of(state_arrays(model))
    load_arrays(model, layout.unpack(messages[0].content.array_records["arrays"]))
    sites = [site_scores(model, d, device, None) if config.get("site-eval") else {} for d in data]
    results = train_clients_batched(
        model,
        [(d.train.x, d.train.y, d.weights) for d in data],
        task=spec.task,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.round_lr(server_round),
        optimizer=cfg.optimizer_name(),
        weight_decay=cfg.weight_decay,
        proximal_mu=mu,
        seeds=[client_seed(cfg.seed, server_round, pid) for pid in pids],
        device=device,
    )
    replies = []
    seconds = (time.perf_counter() - started) / len(messages)
    for msg, pid, d, site, (state, res) in zip(messages, pids, data, sites, results, strict=True):
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "train_loss": res.train_loss,
            "train_accuracy": res.train_accuracy,
            "lr": cfg.round_lr(server_round),
            "num-examples": res.num_examples,
            "partition-id": pid,
            "seconds": seconds,
            "val-size": len(d.val),
            **site,
            **as_personal(site),
        }
        if len(d.val):
            load_arrays(model, state)
            probs, _ = predict(model, d.val.x, None, spec.task, device=device)
            metrics["local_val_accuracy"] = medmnist_acc(d.val.labels, probs, spec.task)
        content = RecordDict({"arrays": layout.pack(state), "metrics": MetricRecord(metrics)})
        replies.append(Message(content=content, reply_to=msg))
    return replies
