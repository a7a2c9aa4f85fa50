"""Seconds per round: `medbloom launch` (Deployment Engine, real processes) vs `medbloom run`.

Runs the same experiment both ways, one after the other in this script, and prints the
median seconds per round (rounds 2..R: round 1 includes start-up in both) and the
difference. Usage:

    .venv/bin/python benchmarks/bench_deployment.py [--quick] [--reps N] [--data-dir DIR]
        [--keep DIR]

``--secure`` compares the deployment with and without ``--secure-aggregation`` instead
(alternating, ``--reps`` times): median s/round, the ratio, and the median bytes each
hospital sent a round (``clients.csv``'s ``upload_bytes``).

``--ablate a,b,c`` also launches, in every repetition, once with each of those
one-machine heuristics switched off (``MEDBLOOM_ABLATE``; ``a+b`` switches both off in one
launch), the order rotated from one repetition to the next, and prints each one's median
ratio beside the full launch's, and the median of its differences to the full launch of
the same repetition (paired).

With ``--reps N`` the two engines alternate N times; the table shows, for each engine,
the median over repetitions of wall time, round 1 and median s/round, and the difference
is the median of the N paired differences. ``--keep DIR`` keeps the run directories
(``DIR/run0``, ``DIR/launch0``, ...: metrics and every process's log) instead of deleting
them.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


def run(
    mode: str,
    out: Path,
    data_dir: Path,
    clients: int,
    rounds: int,
    ablate: str = "",
    extra: tuple[str, ...] = (),
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
        *extra,
    ]
    t0 = time.monotonic()
    env = {**os.environ, "MEDBLOOM_ABLATE": ablate}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.monotonic() - t0
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # a round: sending the model to aggregating the replies, plus the server's evaluation
    return wall, [float(r["round_seconds"]) + float(r["eval_seconds"]) for r in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 clients, 3 rounds")
    parser.add_argument("--reps", type=int, default=1, help="alternate the engines N times")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    parser.add_argument("--ablate", default="", help="heuristics to switch off one at a time")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 6; --quick 3)")
    parser.add_argument(
        "--secure", action="store_true", help="deployment with and without secure aggregation"
    )
    args = parser.parse_args()
    if args.ablate:
        return ablation(args)
    if args.secure:
        return secure(args)
    clients, rounds = (3, 3) if args.quick else (10, 6)
    rounds = args.rounds or rounds
    walls: dict[str, list[float]] = {"run": [], "launch": []}
    firsts: dict[str, list[float]] = {"run": [], "launch": []}
    meds: dict[str, list[float]] = {"run": [], "launch": []}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        for rep in range(args.reps):
            for mode in ("run", "launch"):
                wall, rounds_s = run(
                    mode, Path(tmp) / f"{mode}{rep}", args.data_dir, clients, rounds
                )
                walls[mode].append(wall)
                firsts[mode].append(rounds_s[0])
                meds[mode].append(statistics.median(rounds_s[1:]))
            print(
                f"repetition {rep + 1}: simulation {meds['run'][-1]:.2f}, deployment "
                f"{meds['launch'][-1]:.2f} s/round",
                flush=True,
            )
    med = statistics.median
    diffs = [d - s for s, d in zip(meds["run"], meds["launch"], strict=True)]
    sim_med, dep_med = med(meds["run"]), med(meds["launch"])
    print(f"\nPneumoniaMNIST, {clients} clients, {rounds} rounds, defaults otherwise")
    print(f"median of {args.reps} repetition(s)\n")
    print("| engine | wall s | round 1 s | median s/round (rounds 2+) |")
    print("|---|---|---|---|")
    for name, mode in (
        ("simulation (`medbloom run`)", "run"),
        ("deployment (`medbloom launch`)", "launch"),
    ):
        print(
            f"| {name} | {med(walls[mode]):.1f} | {med(firsts[mode]):.1f} | {med(meds[mode]):.2f} |"
        )
    print(
        f"\ndeployment - simulation: {med(diffs):+.2f} s per round "
        f"(ratio {dep_med / sim_med:.2f}; per repetition: "
        + ", ".join(f"{d:+.2f}" for d in diffs)
        + ")"
    )


def _upload(out: Path) -> list[int]:
    with (out / "clients.csv").open() as fh:
        return [int(r["upload_bytes"]) for r in csv.DictReader(fh) if r["status"] == "ok"]


def secure(args: argparse.Namespace) -> None:
    """The deployment's seconds per round and bytes per hospital with and without secure
    aggregation, alternating."""
    clients, rounds = (3, 3) if args.quick else (10, 6)
    rounds = args.rounds or rounds
    arms = {"plain": (), "secure aggregation": ("--secure-aggregation",)}
    meds: dict[str, list[float]] = {a: [] for a in arms}
    sent: dict[str, list[int]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        for rep in range(args.reps):
            order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
            for arm in order:
                out = Path(tmp) / f"launch{rep}-{arm.split()[0]}"
                _, rounds_s = run("launch", out, args.data_dir, clients, rounds, extra=arms[arm])
                meds[arm].append(statistics.median(rounds_s[1:]))
                sent[arm].extend(_upload(out))
            print(
                f"repetition {rep + 1}: "
                + ", ".join(f"{a} {meds[a][-1]:.2f} s/round" for a in arms),
                flush=True,
            )
    med = statistics.median
    print(f"\nPneumoniaMNIST, {clients} hospitals, {rounds} rounds, `medbloom launch`")
    print(f"median of {args.reps} repetition(s)\n")
    print("| deployment | median s/round (rounds 2+) | bytes sent per hospital per round |")
    print("|---|---|---|")
    for arm in arms:
        print(f"| {arm} | {med(meds[arm]):.2f} | {med(sent[arm]):,.0f} |")
    ratios = [s / p for p, s in zip(meds["plain"], meds["secure aggregation"], strict=True)]
    print(
        f"\nsecure / plain: {med(meds['secure aggregation']) / med(meds['plain']):.2f}x the "
        f"seconds per round (per repetition: {', '.join(f'{r:.2f}' for r in ratios)}), "
        f"{med(sent['secure aggregation']) / med(sent['plain']):.2f}x the bytes"
    )


def ablation(args: argparse.Namespace) -> None:
    """Each heuristic's own share of the ratio: the full launch against launches with one
    heuristic off, all beside the simulation in every repetition."""
    clients, rounds = (3, 3) if args.quick else (10, 6)
    rounds = args.rounds or rounds
    names = [n for n in args.ablate.split(",") if n]
    configs = ["", *names]
    ratios: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        for rep in range(args.reps):
            _, sim = run("run", Path(tmp) / f"run{rep}", args.data_dir, clients, rounds)
            sim_med = statistics.median(sim[1:])
            shift = rep % len(configs)
            for config in configs[shift:] + configs[:shift]:
                out = Path(tmp) / f"launch{rep}-{config or 'all'}".replace("+", "_")
                switches = config.replace("+", ",")  # a+b: both off at once
                _, dep = run("launch", out, args.data_dir, clients, rounds, switches)
                ratios[config].append(statistics.median(dep[1:]) / sim_med)
                print(
                    f"repetition {rep + 1}: {config or 'all on'}: ratio {ratios[config][-1]:.3f}"
                    f" (simulation {sim_med:.2f} s/round)",
                    flush=True,
                )
    med = statistics.median
    full = med(ratios[""])
    print(f"\nPneumoniaMNIST, {clients} clients, {rounds} rounds, {args.reps} repetitions")
    print("| switched off | median ratio | spread | ratio - full launch's | paired |")
    print("|---|---|---|---|---|")
    for config in configs:
        r = ratios[config]
        # each repetition against the full launch of the same repetition (same machine
        # state): the median of those differences is the steadier figure
        paired = [a - b for a, b in zip(r, ratios[""], strict=True)]
        print(
            f"| {config or '(none: all on)'} | {med(r):.3f} | {min(r):.3f}-{max(r):.3f} |"
            f" {med(r) - full:+.3f} | {med(paired):+.3f} "
            f"({', '.join(f'{d:+.3f}' for d in paired)}) |"
        )


if __name__ == "__main__":
    main()
