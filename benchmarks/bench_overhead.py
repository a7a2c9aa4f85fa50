"""What Flower and medbloom cost over a plain PyTorch FedAvg loop doing the same work.

`medbloom run` (the real CLI, in a subprocess; default experiment: PneumoniaMNIST, 10
clients, Dirichlet 0.5, small CNN, FedAvg) against a loop in this file, run in a
subprocess too (so both pay interpreter start and imports), that does exactly the same
work: the partitions and local splits of `medbloom.experiment`, the same initial model,
Adam, class weights, epochs, batch size and per-(round, client) seeds, each client's
local-validation prediction, FedAvg weighted by sample count in client order, and the
server's evaluation of val and test (scores and per-class report) after every round,
round 0 included. It does not write checkpoints or CSVs: that is part of the overhead.

The loop runs with 1 torch thread (what each medbloom client gets) and with 2 (all
cores of this machine; medbloom trains 2 clients at a time, one per core).

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--rounds 20] [--reps 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any

from _common import DATA_DIR, ENV, REPO, check_data, median, table, watch_run


def plain_loop(rounds: int, threads: int, data_dir: str) -> dict[str, object]:
    """The same federated training, hand-written. Returns monotonic timestamps."""
    t_import = time.monotonic()
    import torch

    from medbloom.config import ExperimentConfig
    from medbloom.data.registry import resolve_size
    from medbloom.experiment import client_data, initial_model, server_data
    from medbloom.metrics import evaluate_scores, medmnist_acc, per_class_report
    from medbloom.models import build_model
    from medbloom.training import client_seed, load_arrays, predict, state_arrays, train_local

    torch.set_num_threads(threads)
    cfg = ExperimentConfig(data_dir=data_dir, rounds=rounds).validate()
    cfg = cfg.replace(size=resolve_size(cfg.dataset, cfg.size))
    t_setup = time.monotonic()
    spec, val, test = server_data(cfg)
    clients = [client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)]
    global_model = initial_model(cfg, spec)
    local = build_model(cfg.model, spec)
    arrays = state_arrays(global_model)

    def evaluate() -> dict[str, float]:
        load_arrays(global_model, arrays)
        out: dict[str, float] = {}
        for prefix, split in (("", test), ("val_", val)):
            probs, loss = predict(global_model, split.x, split.y, spec.task)
            scores = evaluate_scores(split.labels, probs, spec.task)
            if not prefix:
                per_class_report(split.labels, probs, spec.task, spec.class_names)
            out.update({prefix + k: v for k, v in {**scores, "loss": loss}.items()})
        return out

    t_data = time.monotonic()
    rows = [{"round": 0, **evaluate(), "t": time.monotonic(), "train": 0.0}]
    for r in range(1, rounds + 1):
        t_round = time.monotonic()
        updates: list[tuple[OrderedDict[str, torch.Tensor], int]] = []
        train_s = 0.0
        for pid, data in enumerate(clients):
            t_c = time.monotonic()
            load_arrays(local, arrays)
            res = train_local(
                local,
                data.train.x,
                data.train.y,
                task=spec.task,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                optimizer=cfg.optimizer,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                weights=data.weights,
                seed=client_seed(cfg.seed, r, pid),
            )
            if len(data.val):
                probs, _ = predict(local, data.val.x, None, spec.task)
                medmnist_acc(data.val.labels, probs, spec.task)
            # state_arrays shares storage with the model on the CPU: copy before the next client.
            update = OrderedDict((k, v.clone()) for k, v in state_arrays(local).items())
            updates.append((update, res.num_examples))
            train_s += time.monotonic() - t_c
        total = sum(n for _, n in updates)
        arrays = OrderedDict(
            (k, _weighted_sum([(u[k], n / total) for u, n in updates])) for k in updates[0][0]
        )
        rows.append({"round": r, **evaluate(), "t": time.monotonic(), "train": train_s})
        rows[-1]["round_seconds"] = rows[-1]["t"] - t_round
    return {"t_import": t_import, "t_setup": t_setup, "t_data": t_data, "rows": rows}


def _weighted_sum(terms: list[tuple[Any, float]]) -> Any:
    """sum(t * w) added left to right, as Python's ``sum`` (and Flower's FedAvg) does."""
    total = terms[0][0] * terms[0][1]
    for t, w in terms[1:]:
        total = total + t * w
    return total


def run_plain(rounds: int, threads: int) -> dict[str, object]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, __file__, "--plain-worker", str(rounds), str(threads)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.monotonic() - t0
    res: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    rows = res["rows"]
    assert isinstance(rows, list)
    res["wall"] = wall
    res["row_times"] = {row["round"]: row["t"] - t0 for row in rows}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 repetition")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--plain-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain_worker:
        rounds, threads = a.plain_worker
        print(json.dumps(plain_loop(rounds, threads, str(DATA_DIR)), default=float))
        return
    check_data()
    rounds = 3 if a.quick else a.rounds
    reps = 1 if a.quick else a.reps
    runs: dict[str, list[dict[str, float]]] = {"medbloom": [], "plain1": [], "plain2": []}
    finals: dict[str, tuple[float, float]] = {}
    for _ in range(reps):
        m = watch_run(["--data-dir", str(DATA_DIR), "--rounds", str(rounds)])
        rs = m.round_seconds(first=2)
        clients_by_round: dict[int, list[float]] = {}
        for c in m.clients:
            clients_by_round.setdefault(int(c["round"]), []).append(float(c["seconds"]))
        client_busy = [sum(v) / 2 for r, v in clients_by_round.items() if r >= 2]
        runs["medbloom"].append(
            {
                "wall": m.wall,
                "to_round0": m.row_times[0],
                "to_round1": m.row_times[1],
                "round1": m.round_seconds()[0],
                "round_med": median(rs) if rs else float("nan"),
                "gap_med": median(m.gaps()[1:]) if rounds > 1 else m.gaps()[0],
                "teardown": m.wall - m.row_times[rounds],
                "client_busy_med": median(client_busy),
            }
        )
        finals["medbloom"] = (m.metrics[-1]["accuracy"], m.metrics[-1]["auc"])
        print(f"medbloom run: {runs['medbloom'][-1]}", file=sys.stderr)
        for threads in (1, 2):
            r = run_plain(rounds, threads)
            rows = r["rows"]
            assert isinstance(rows, list)
            times = r["row_times"]
            assert isinstance(times, dict)
            per = [row["round_seconds"] for row in rows[2:]] or [rows[1]["round_seconds"]]
            gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(rows[1:])]
            runs[f"plain{threads}"].append(
                {
                    "wall": float(r["wall"]),  # type: ignore[arg-type]
                    "to_round0": times[0],
                    "to_round1": times[1],
                    "round1": rows[1]["round_seconds"],
                    "round_med": median(per),
                    "gap_med": median(gaps) if gaps else rows[1]["round_seconds"],
                    "teardown": float(r["wall"]) - times[rounds],  # type: ignore[arg-type]
                    "client_busy_med": median([row["train"] for row in rows[2:]]),
                }
            )
            finals[f"plain{threads}"] = (rows[-1]["accuracy"], rows[-1]["auc"])
            print(
                f"plain loop, {threads} thread(s): {runs[f'plain{threads}'][-1]}", file=sys.stderr
            )

    def med(kind: str, key: str) -> float:
        return median([r[key] for r in runs[kind]])

    print(
        f"## medbloom run vs plain PyTorch FedAvg loop: 10 clients x {rounds} rounds, "
        f"median of {reps} run(s) each\n"
    )
    labels = [
        ("wall", "wall time, spawn to exit (s)"),
        ("to_round0", "spawn to round-0 evaluation written (s)"),
        ("to_round1", "time to first round: spawn to round-1 row (s)"),
        ("round1", "round 1 (s)"),
        ("round_med", "median round, rounds >= 2: train + aggregate + evaluate (s)"),
        ("gap_med", "median round incl. recording, rounds >= 2 (s)"),
        ("client_busy_med", "median client training per round, per core (s)"),
        ("teardown", "last row to exit (s)"),
    ]
    rows_out: list[list[Any]] = []
    for key, label in labels:
        mb, p1, p2 = med("medbloom", key), med("plain1", key), med("plain2", key)
        rows_out.append([label, mb, p1, p2, mb / p1, mb / p2])
    rows_out.append(
        ["final test ACC / AUC"]
        + [f"{finals[k][0]:.4f} / {finals[k][1]:.4f}" for k in ("medbloom", "plain1", "plain2")]
        + ["", ""]
    )
    print(
        table(
            [
                "",
                "medbloom run",
                "plain loop 1 thread",
                "plain loop 2 threads",
                "ratio vs 1 thr",
                "ratio vs 2 thr",
            ],
            rows_out,
        )
    )
    print(
        "\nmedbloom trains 2 clients at a time (one Ray worker per core, 1 thread each); "
        "'per core' for medbloom is the clients' own reported seconds / 2."
    )


if __name__ == "__main__":
    main()
