"""What Flower and medbloom cost over a plain PyTorch FedAvg loop doing the same work.

`medbloom run` (the real CLI, in a subprocess; default experiment: PneumoniaMNIST, 10
clients, Dirichlet 0.5, small CNN, FedAvg) against a loop in this file, run in a
subprocess too (so both pay interpreter start and imports), that does exactly the same
work: the partitions and local splits of `medbloom.experiment`, the same initial model,
Adam, class weights, epochs, batch size and per-(round, client) seeds, each client's
local-validation prediction, FedAvg weighted by sample count in client order, and the
server's evaluation of val and test (scores and per-class report) after every round,
round 0 included. It does not write checkpoints or CSVs: that is part of the overhead.

The loop runs three ways (``--plain`` picks): one client after another on 1 torch
thread (what each medbloom client gets), the same on N threads (every core of the
machine), and N worker processes of 1 thread each that train the clients in parallel,
largest first from one queue, with the aggregation and evaluation in the parent on N
threads. The last is what medbloom's simulation does with its Ray workers and the
fairest baseline; which of the other two is faster depends on how well the machine
runs one small batch on two threads (1.73x faster on one 2-core machine, 1.37x on
another). The ratio that counts is against the fastest of them.

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--rounds 20] [--reps 1]
        [--plain 1t,Nt,Np]
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

from medbloom.system import usable_cpus


def plain_loop(rounds: int, threads: int, data_dir: str, processes: int = 0) -> dict[str, object]:
    """The same federated training, hand-written. Returns monotonic timestamps.

    ``processes`` 0: the clients one after another in this process, on ``threads``
    threads. ``processes`` N: N worker processes (spawned, 1 thread each) train the
    clients in parallel, largest first from one queue, as medbloom's simulation does
    with its Ray workers; this process aggregates and evaluates on ``threads`` threads.
    """
    t_import = time.monotonic()
    import torch

    from medbloom.config import ExperimentConfig
    from medbloom.data.registry import resolve_size
    from medbloom.experiment import initial_model, largest_first, server_data
    from medbloom.metrics import evaluate_scores, per_class_report
    from medbloom.training import load_arrays, predict, state_arrays

    torch.set_num_threads(threads)
    cfg = ExperimentConfig(data_dir=data_dir, rounds=rounds).validate()
    cfg = cfg.replace(size=resolve_size(cfg.dataset, cfg.size))
    pool = None
    if processes:
        import multiprocessing

        # spawn: a forked child of a process that has run torch's thread pool can hang
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(processes, initializer=_pool_init, initargs=(cfg,))
    t_setup = time.monotonic()
    spec, val, test = server_data(cfg)
    global_model = initial_model(cfg, spec)
    arrays = state_arrays(global_model)
    if pool is None:
        _pool_init(cfg, threads)
    order = largest_first(cfg)

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
        shared = {k: v.numpy() for k, v in arrays.items()}
        if pool is None:
            results = [_train_client((pid, r, shared)) for pid in range(cfg.num_clients)]
        else:
            jobs = [(pid, r, shared) for pid in order]
            results = sorted(pool.imap_unordered(_train_client, jobs), key=lambda res: res[0])
        updates = [
            ({k: torch.as_tensor(v) for k, v in update.items()}, n) for _, update, n, _ in results
        ]
        train_s = sum(res[3] for res in results) / max(processes, 1)  # per core
        total = sum(n for _, n in updates)
        arrays = OrderedDict(
            (k, _weighted_sum([(u[k], n / total) for u, n in updates])) for k in updates[0][0]
        )
        rows.append({"round": r, **evaluate(), "t": time.monotonic(), "train": train_s})
        rows[-1]["round_seconds"] = rows[-1]["t"] - t_round
    if pool is not None:
        pool.close()
        pool.join()
    return {"t_import": t_import, "t_setup": t_setup, "t_data": t_data, "rows": rows}


_WORKER: dict[str, Any] = {}


def _pool_init(cfg: Any, threads: int = 1) -> None:
    """A training process: its clients' tensors and a local model, built once."""
    import torch

    from medbloom.experiment import client_data
    from medbloom.models import build_model

    torch.set_num_threads(threads)
    spec = client_data(cfg, 0, cfg.num_clients).spec
    _WORKER.update(cfg=cfg, model=build_model(cfg.model, spec))


def _train_client(job: tuple[int, int, Any]) -> tuple[int, Any, int, float]:
    """One client's local training and local validation, as medbloom's ClientApp does;
    returns (client, weights, samples, seconds)."""
    import torch

    from medbloom.experiment import client_data
    from medbloom.metrics import medmnist_acc
    from medbloom.training import client_seed, load_arrays, predict, state_arrays, train_local

    pid, r, arrays = job
    t_c = time.monotonic()
    cfg, local = _WORKER["cfg"], _WORKER["model"]
    data = client_data(cfg, pid, cfg.num_clients)
    load_arrays(local, {k: torch.from_numpy(v) for k, v in arrays.items()})
    res = train_local(
        local,
        data.train.x,
        data.train.y,
        task=data.spec.task,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer_name(),
        lr=cfg.learning_rate(),
        weight_decay=cfg.weight_decay,
        weights=data.weights,
        seed=client_seed(cfg.seed, r, pid),
    )
    if len(data.val):
        probs, _ = predict(local, data.val.x, None, data.spec.task)
        medmnist_acc(data.val.labels, probs, data.spec.task)
    # state_arrays shares storage with the model on the CPU: copy before the next client.
    update = {k: v.clone().numpy() for k, v in state_arrays(local).items()}
    return pid, update, res.num_examples, time.monotonic() - t_c


def _weighted_sum(terms: list[tuple[Any, float]]) -> Any:
    """sum(t * w) added left to right, as Python's ``sum`` (and Flower's FedAvg) does."""
    total = terms[0][0] * terms[0][1]
    for t, w in terms[1:]:
        total = total + t * w
    return total


def run_plain(rounds: int, threads: int, processes: int) -> dict[str, object]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, __file__, "--plain-worker", str(rounds), str(threads), str(processes)],
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
    p.add_argument(
        "--plain",
        default="1t,Nt,Np",
        help="plain loops to run: 1t (1 thread), Nt (all N cores as threads), Np (N "
        "processes, 1 thread each); comma-separated (default: all three)",
    )
    p.add_argument("--plain-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain_worker:
        rounds, threads, processes = a.plain_worker
        print(json.dumps(plain_loop(rounds, threads, str(DATA_DIR), processes), default=float))
        return
    check_data()
    rounds = 3 if a.quick else a.rounds
    reps = 1 if a.quick else a.reps
    n = usable_cpus()
    every = {
        "1t": ("plain loop, 1 thread", 1, 0),
        "Nt": (f"plain loop, {n} threads", n, 0),
        "Np": (f"plain loop, {n} processes", n, n),
    }
    chosen = [k.strip() for k in a.plain.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in every]
    if unknown or not chosen:
        p.error(f"--plain: unknown {unknown}; choose from {', '.join(every)}")
    kinds = ["medbloom", *chosen]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    finals: dict[str, tuple[float, float]] = {}
    for _ in range(reps):
        m = watch_run(["--data-dir", str(DATA_DIR), "--rounds", str(rounds)])
        rs = m.round_seconds(first=2)
        clients_by_round: dict[int, list[float]] = {}
        for c in m.clients:
            clients_by_round.setdefault(int(c["round"]), []).append(float(c["seconds"]))
        client_busy = [sum(v) / n for r, v in clients_by_round.items() if r >= 2]
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
        for kind in chosen:
            label, threads, processes = every[kind]
            r = run_plain(rounds, threads, processes)
            rows = r["rows"]
            assert isinstance(rows, list)
            times = r["row_times"]
            assert isinstance(times, dict)
            per = [row["round_seconds"] for row in rows[2:]] or [rows[1]["round_seconds"]]
            gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(rows[1:])]
            runs[kind].append(
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
            finals[kind] = (rows[-1]["accuracy"], rows[-1]["auc"])
            print(f"{label}: {runs[kind][-1]}", file=sys.stderr)

    def med(kind: str, key: str) -> float:
        return median([r[key] for r in runs[kind]])

    print(
        f"## medbloom run vs plain PyTorch FedAvg loops: 10 clients x {rounds} rounds, "
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
        mb = med("medbloom", key)
        plain = [med(k, key) for k in chosen]
        rows_out.append([label, mb, *plain, *(mb / x for x in plain)])
    rows_out.append(
        ["final test ACC / AUC"]
        + [f"{finals[k][0]:.4f} / {finals[k][1]:.4f}" for k in kinds]
        + [""] * len(chosen)
    )
    headers = ["", "medbloom run", *(every[k][0] for k in chosen)]
    headers += [f"ratio vs {k}" for k in chosen]
    print(table(headers, rows_out))
    fastest = min(chosen, key=lambda k: med(k, "wall"))
    print(
        f"\nwall-time ratio against the fastest plain loop ({every[fastest][0]}): "
        f"{med('medbloom', 'wall') / med(fastest, 'wall'):.3f} (target: at most 1.15)"
    )
    print(
        f"\nmedbloom trains {n} clients at a time (one Ray worker per core, 1 thread each), "
        f"as the {n}-process loop does; 'per core' is the clients' own reported seconds / {n}."
    )


if __name__ == "__main__":
    main()
