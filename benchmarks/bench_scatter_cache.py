"""What ScatterNet's feature cache saves a whole DP-SGD run, side by side.

`medbloom run --privacy sample` (the real CLI; ScatterNet is its default model on 2D sets)
twice per data set, one after the other: with the per-process feature cache (the
default) and without it (``MEDBLOOM_SCATTER_CACHE_MB=0``, every round transforms every
image again). Prints the median seconds of a round's training and of its evaluation
after the first ``--skip`` rounds (when the cache fills), the whole run's seconds, and
the test AUC of the last round, which must not change: the cache returns the very
features the transform computes.

    .venv/bin/python benchmarks/bench_scatter_cache.py [--rounds 6] [--skip 2]
        [--sets pneumoniamnist,brain-tumor-mri]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import DATA_DIR, ENV, MEDBLOOM, check_data, median, read_csv, table

SETS = {
    # name: the run's arguments (the defaults of the privacy tables in benchmarks/README.md)
    "pneumoniamnist": ["--dataset", "pneumoniamnist", "--num-clients", "10"],
    "brain-tumor-mri": ["--dataset", "brain-tumor-mri", "--num-clients", "4", "--alpha", "0.5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="rounds left out of the medians")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    check_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            timings = {}
            for arm, megabytes in (("cache", None), ("no cache", "0")):
                out = Path(tmp) / f"{name}-{arm.replace(' ', '')}"
                env = dict(ENV)
                if megabytes is not None:
                    env["MEDBLOOM_SCATTER_CACHE_MB"] = megabytes
                cmd = [*MEDBLOOM, "run", *SETS[name], "--data-dir", str(DATA_DIR),
                       "--privacy", "sample", "--rounds", str(args.rounds), "--seed", "0",
                       "--out", str(out)]  # fmt: skip
                t0 = time.monotonic()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                seconds = time.monotonic() - t0
                metrics = read_csv(next(out.rglob("metrics.csv")))
                later = [r for r in metrics if int(r["round"]) > args.skip]
                timings[arm] = (
                    median([float(r["round_seconds"]) for r in later]),
                    median([float(r["eval_seconds"]) for r in later]),
                    seconds,
                    float(metrics[-1]["auc"]),
                )
            for arm, (train, evaluate, seconds, auc) in timings.items():
                rows.append([name, arm, f"{train:.2f}", f"{evaluate:.2f}", f"{seconds:.0f}",
                             f"{auc:.4f}"])  # fmt: skip
            (t_on, e_on, s_on, _), (t_off, e_off, s_off, _) = timings.values()
            rows.append([name, "no cache / cache", f"{t_off / t_on:.2f}x", f"{e_off / e_on:.2f}x",
                         f"{s_off / s_on:.2f}x", ""])  # fmt: skip
    headers = ["data set", "run", f"training s a round (median, rounds > {args.skip})",
               "server evaluation s", "whole run s", "test AUC, last round"]  # fmt: skip
    print(table(headers, rows))


if __name__ == "__main__":
    main()
