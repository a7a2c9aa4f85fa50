"""Seconds per round: `medbloom launch` (Deployment Engine, real processes) vs `medbloom run`.

Runs the same experiment both ways, one after the other in this script, and prints the
median seconds per round (rounds 2..R: round 1 includes start-up in both) and the
difference. Usage:

    .venv/bin/python benchmarks/bench_deployment.py [--quick] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


def run(
    mode: str, out: Path, data_dir: Path, clients: int, rounds: int
) -> tuple[float, list[float]]:
    exe = Path(sys.executable).with_name("medbloom")
    cmd = [
        str(exe),
        mode,
        "--data-dir",
        str(data_dir),
        "--num-clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # a round: sending the model to aggregating the replies, plus the server's evaluation
    return wall, [float(r["round_seconds"]) + float(r["eval_seconds"]) for r in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 clients, 3 rounds")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    clients, rounds = (3, 3) if args.quick else (10, 6)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("run", "launch"):
            results[mode] = run(mode, Path(tmp) / mode, args.data_dir, clients, rounds)
    sim_wall, sim = results["run"]
    dep_wall, dep = results["launch"]
    sim_med, dep_med = statistics.median(sim[1:]), statistics.median(dep[1:])
    print(f"PneumoniaMNIST, {clients} clients, {rounds} rounds, defaults otherwise\n")
    print("| engine | wall s | round 1 s | median s/round (rounds 2+) |")
    print("|---|---|---|---|")
    print(f"| simulation (`medbloom run`) | {sim_wall:.1f} | {sim[0]:.1f} | {sim_med:.2f} |")
    print(f"| deployment (`medbloom launch`) | {dep_wall:.1f} | {dep[0]:.1f} | {dep_med:.2f} |")
    print(
        f"\ndeployment - simulation: {dep_med - sim_med:+.2f} s per round "
        f"(ratio {dep_med / sim_med:.2f})"
    )


if __name__ == "__main__":
    main()
