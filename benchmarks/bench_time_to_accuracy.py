"""Time until the default experiment first reaches the MedMNIST benchmark on PneumoniaMNIST.

`medbloom run` (the real CLI, default experiment: 10 clients, Dirichlet 0.5, small CNN,
FedAvg) for each seed; the first round whose test ACC >= 0.854 AND AUC >= 0.944 (the
published ResNet-18 (28) figures), read from the run's metrics.csv: its round number
and elapsed_seconds (from the first evaluation), and seconds since the command started.

    .venv/bin/python benchmarks/bench_time_to_accuracy.py [--quick] [--seeds 42 1 2]
"""

from __future__ import annotations

import argparse

from _common import DATA_DIR, check_data, median, table, watch_run

ACC, AUC = 0.854, 0.944


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, 5 rounds")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    check_data()
    seeds = a.seeds[:1] if a.quick else a.seeds
    rounds = 5 if a.quick else a.rounds
    rows, reached_s, reached_r = [], [], []
    for seed in seeds:
        run = watch_run(["--data-dir", str(DATA_DIR), "--rounds", str(rounds), "--seed", str(seed)])
        hit = next((m for m in run.metrics if m["accuracy"] >= ACC and m["auc"] >= AUC), None)
        best = max(run.metrics, key=lambda m: m["val_auc"])
        if hit is None:
            rows.append([seed, f"not in {rounds}", "-", "-", "-", _score(best), run.wall])
            continue
        r = int(hit["round"])
        reached_r.append(r)
        reached_s.append(hit["elapsed_seconds"])
        rows.append(
            [seed, r, hit["elapsed_seconds"], run.row_times[r], _score(hit), _score(best), run.wall]
        )
    print(
        f"## Time to ACC >= {ACC} and AUC >= {AUC} (test split), default experiment, "
        f"{len(seeds)} seed(s), up to {rounds} rounds\n"
    )
    print(
        table(
            [
                "seed",
                "first round",
                "elapsed_seconds",
                "since command start (s)",
                "ACC / AUC then",
                "best-val-AUC round: ACC / AUC",
                "run wall (s)",
            ],
            rows,
        )
    )
    print(
        f"\nreached in {len(reached_r)} of {len(seeds)} seeds; median "
        f"{median([float(x) for x in reached_r]):.0f} rounds, {median(reached_s):.1f} s"
        if reached_r
        else f"\nnot reached in {rounds} rounds by any seed"
    )


def _score(m: dict[str, float]) -> str:
    return f"r{int(m['round'])}: {m['accuracy']:.4f} / {m['auc']:.4f}"


if __name__ == "__main__":
    main()
