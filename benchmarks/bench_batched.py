"""One round of the default experiment's 10 clients: one after another vs batched (vmap).

Sequential: `medbloom.training.train_local` for each client from the global weights.
Batched: `medbloom.batched.train_clients_batched` on all 10 at once. Same partitions,
class weights, Adam, batch size 32, 1 epoch and per-client seeds as `medbloom run`'s
round 1. Median of --reps repetitions, at 1 and 2 torch threads, in this process.

    .venv/bin/python benchmarks/bench_batched.py [--quick] [--reps 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import DATA_DIR, check_data, median, table

from medbloom.batched import train_clients_batched
from medbloom.config import ExperimentConfig
from medbloom.experiment import client_data, initial_model
from medbloom.training import client_seed, train_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, 1 thread")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    check_data()
    reps = 1 if a.quick else a.reps
    cfg = ExperimentConfig(data_dir=str(DATA_DIR), size=28).validate()
    data = [client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)]
    spec = data[0].spec
    model = initial_model(cfg, spec)
    seeds = [client_seed(cfg.seed, 1, i) for i in range(cfg.num_clients)]
    kw = {
        "task": spec.task,
        "epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.learning_rate(),
        "optimizer": cfg.optimizer_name(),
        "weight_decay": cfg.weight_decay,
    }
    clients = [(d.train.x, d.train.y, d.weights) for d in data]

    def sequential() -> list[dict[str, torch.Tensor]]:
        out = []
        for (x, y, w), seed in zip(clients, seeds, strict=True):
            m = copy.deepcopy(model)
            train_local(m, x, y, weights=w, seed=seed, **kw)  # type: ignore[arg-type]
            out.append(m.state_dict())
        return out

    def batched() -> list[dict[str, torch.Tensor]]:
        res = train_clients_batched(model, clients, seeds=seeds, **kw)  # type: ignore[arg-type]
        return [sd for sd, _ in res]

    rows = []
    for threads in (1,) if a.quick else (1, 2):
        torch.set_num_threads(threads)
        batched()  # warm-up: vmap's first call traces the batching rules
        t_seq, t_bat = [], []
        diff = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            s = sequential()
            t1 = time.perf_counter()
            b = batched()
            t2 = time.perf_counter()
            t_seq.append(t1 - t0)
            t_bat.append(t2 - t1)
            diff = max(float((b[i][k] - s[i][k]).abs().max()) for i in range(len(s)) for k in s[i])
        ms, mb = median(t_seq), median(t_bat)
        rows.append([threads, ms, mb, ms / mb, f"{diff:.1e}"])
    n = sum(len(d.train) for d in data)
    steps = sum(-(-len(d.train) // cfg.batch_size) for d in data)
    most = max(-(-len(d.train) // cfg.batch_size) for d in data)
    print(
        f"## One round, {cfg.num_clients} clients ({n} training images, {steps} client steps; "
        f"batched: {most} vmapped steps), median of {reps}\n"
    )
    print(
        table(
            [
                "torch threads",
                "sequential (s)",
                "batched vmap (s)",
                "speed-up",
                "max |w_batched - w_seq|",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
