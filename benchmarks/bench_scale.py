"""Many simulated hospitals: seconds per round and peak memory summed over every process.

`medbloom run` (the real CLI, in a subprocess) on PneumoniaMNIST split IID across 100
and 1000 clients (1000 clients hold about 4 images each: --min-partition-size 1
--local-val-fraction 0), a fraction of them trained each round. Memory is the sum over
the run's whole process tree (the CLI, Ray's GCS, raylet, agents and workers) of each
process's PSS (its private memory plus its share of shared pages; RSS would count
shared libraries once per process), sampled every 0.2 s; the summed RSS is shown too.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--rounds 3]
"""

from __future__ import annotations

import argparse

from _common import DATA_DIR, check_data, median, table, watch_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 clients only, 2 rounds")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    check_data()
    rounds = 2 if a.quick else a.rounds
    cases = [(100, 0.1)] if a.quick else [(100, 0.1), (1000, 0.01), (1000, 0.1)]
    rows = []
    for clients, fraction in cases:
        run = watch_run(
            [
                "--data-dir",
                str(DATA_DIR),
                "--num-clients",
                str(clients),
                "--fraction-train",
                str(fraction),
                "--partition",
                "iid",
                "--min-partition-size",
                "1",
                "--local-val-fraction",
                "0",
                "--rounds",
                str(rounds),
            ],
            memory=True,
        )
        per_round = run.gaps()
        rows.append(
            [
                clients,
                fraction,
                int(run.metrics[-1]["clients_ok"]),
                rounds,
                run.wall,
                run.row_times[1],
                per_round[0],
                median(per_round[1:]) if len(per_round) > 1 else float("nan"),
                run.peak_pss_gb,
                run.peak_rss_gb,
                run.peak_processes,
                f"{run.metrics[-1]['accuracy']:.3f} / {run.metrics[-1]['auc']:.3f}",
            ]
        )
    print("## medbloom run at scale: PneumoniaMNIST, IID, small CNN, FedAvg, 2 cores\n")
    print(
        table(
            [
                "clients",
                "fraction",
                "clients/round",
                "rounds",
                "wall (s)",
                "spawn to round 1 (s)",
                "round 1 (s)",
                "median round >= 2 (s)",
                "peak PSS sum (GB)",
                "peak RSS sum (GB)",
                "processes",
                "final ACC / AUC",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
