"""Brain Tumor MRI after a fixed wall-clock budget: federated non-IID, federated IID, central.

Three runs of `medbloom run` (the real CLI) on `../shared/datasets/brain-tumor-mri` (5712
training and 1311 test images), each with the folder sets' default recipe (see the
README) and the same budget, one after another:

- ``dirichlet``: 4 hospitals, Dirichlet alpha 0.5 (target: ACC >= 0.93 and glioma
  recall >= 0.88 on the clean test split);
- ``iid``: 4 hospitals, IID;
- ``central``: the same network trained by one "hospital" holding all the training
  images, with every core to itself: the ceiling the federated runs compare with.

Each budget (default 15 minutes) counts from the command's start, decoding included: the
decoded-image cache goes to a fresh folder (``XDG_CACHE_HOME``) for every run unless
``--warm`` is given. When a budget runs out before the last round the run is stopped
the way Ctrl-C stops it, and the table shows the last round finished in time. The
tables give test ACC, balanced accuracy, macro F1, AUC and each class's recall on the
official test split and on the clean one (the test images without a twin among the
training images, see ``medbloom data audit``), read from the runs' metrics.csv,
per_class.jsonl and leakage.json; then the time to decode the JPEGs with a cold and
with a warm cache.

    .venv/bin/python benchmarks/bench_brain_tumor.py [--budget 900] [--setups dirichlet,iid,central]
        [--warm] [--keep DIR] [ARGS...]

Extra arguments go to every `medbloom run` (e.g. ``--augment none`` or ``--size 96``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import DATA_DIR, ENV, MEDBLOOM, REPO, read_csv, table

from medbloom.system import usable_cpus

ROUNDS = 60  # fits 15 minutes on a 2-core CPU (Dirichlet, the slowest: 13.5; benchmarks/README.md)
SETUPS = {
    # name: (arguments, target ACC on the clean test split)
    "dirichlet": (["--num-clients", "4", "--partition", "dirichlet", "--alpha", "0.5"], 0.93),
    "iid": (["--num-clients", "4", "--partition", "iid"], None),
    "central": (["--num-clients", "1", "--partition", "iid", "--min-clients", "1"], None),
}
# and glioma recall on the clean test split, for the Dirichlet run
GLIOMA_TARGET = 0.88


@dataclass(frozen=True)
class RunResult:
    rows: list[dict[str, float]]  # metrics.csv rows finished within the budget
    offset: float  # seconds from the command's start to round 0's row
    per_class: dict[int, dict[str, Any]]  # per_class.jsonl by round
    config: dict[str, Any]  # config.json's resolved settings
    out: Path | None = None  # the run directory


def run_one(
    name: str, args: list[str], budget: float, out: Path, cache: Path | None, log_path: Path
) -> RunResult:
    """One `medbloom run`, stopped at the budget; its metrics rows and per-class reports."""
    env = dict(ENV)
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    if name == "central":
        # One process trains: let it use every core, as central training would.
        env["MEDBLOOM_TORCH_THREADS"] = str(usable_cpus())
    t0 = time.monotonic()
    first_row = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*MEDBLOOM, "run", *args, "--out", str(out)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        while proc.poll() is None:
            if first_row is None and len(read_csv(out / "metrics.csv")) > 0:
                first_row = time.monotonic() - t0
            if time.monotonic() - t0 > budget:
                proc.send_signal(signal.SIGINT)
                proc.wait()
                break
            time.sleep(0.5)
    if proc.returncode not in (0, 130) or not read_csv(out / "metrics.csv"):
        print(log_path.read_text()[-3000:], file=sys.stderr)
        sys.exit(f"{name}: medbloom run failed with code {proc.returncode}")
    return read_result(out, budget, first_row if first_row is not None else 0.0)


def read_result(out: Path, budget: float, offset: float) -> RunResult:
    """A run directory's rows within the budget (``offset``: seconds from the command's
    start to round 0), per-class reports and config."""
    rows = read_csv(out / "metrics.csv")
    m = [{k: float(v) for k, v in r.items() if v != ""} for r in rows]
    # elapsed_seconds counts from the first evaluation; the budget counts from the command.
    in_time = [r for r in m if offset + r["elapsed_seconds"] <= budget] or m[:1]
    per_class: dict[int, dict[str, Any]] = {}
    pc_file = out / "per_class.jsonl"
    if pc_file.exists():
        for line in pc_file.read_text().splitlines():
            rec = json.loads(line)
            per_class[int(rec["round"])] = rec
    config = json.loads((out / "config.json").read_text())["config"]
    return RunResult(in_time, offset, per_class, config, out)


def decode_seconds(cache: Path) -> float:
    """Seconds to load the data set in a fresh process with its cache under ``cache``."""
    code = (
        "import time; t = time.perf_counter();"
        "from medbloom.data.registry import load_dataset;"
        f"load_dataset('brain-tumor-mri', 0, {str(DATA_DIR)!r});"
        "print(time.perf_counter() - t)"
    )
    env = {**ENV, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=900.0, help="seconds per run (default 15 min)")
    p.add_argument("--setups", default="dirichlet,iid,central", help="which runs, in order")
    p.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"rounds of each run (default {ROUNDS})"
    )
    p.add_argument("--warm", action="store_true", help="reuse the user's decoded-image cache")
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the run directories in")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="run nothing: print the tables of the run directories DIR/<setup> that an "
        "earlier --keep DIR left (finished, or resumed with medbloom run --resume); "
        "seconds then count from round 0",
    )
    a, extra = p.parse_known_args()
    setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        p.error(f"--setups: unknown {unknown or 'empty'}; expected some of {', '.join(SETUPS)}")
    if not (DATA_DIR / "brain-tumor-mri" / "Training").is_dir():
        sys.exit(f"real data not found: {DATA_DIR}/brain-tumor-mri")
    tmp = Path(tempfile.mkdtemp(prefix="medbloom-bench-bt-"))
    keep = a.keep or tmp
    keep.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", "brain-tumor-mri", "--data-dir", str(DATA_DIR)]
    results: dict[str, RunResult] = {}
    if a.report is not None:
        for name in setups:
            if (a.report / name / "metrics.csv").is_file():
                results[name] = read_result(a.report / name, a.budget, 0.0)
        if not results:
            sys.exit(f"--report {a.report}: no run directory of {', '.join(setups)} in it")
        setups = []
    for name in setups:
        args = [*common, *SETUPS[name][0], "--rounds", str(a.rounds)]
        args += ["--round-timeout", str(a.budget), *extra]
        cache = None if a.warm else tmp / f"cache-{name}"
        print(f"{name}: medbloom run {' '.join(args)}", file=sys.stderr, flush=True)
        results[name] = run_one(name, args, a.budget, keep / name, cache, keep / f"{name}.log")

    first = next(iter(results.values())).config
    print(
        f"## Brain Tumor MRI in {a.budget / 60:.0f} min a run "
        f"({'warm' if a.warm else 'cold'} cache), --model {first['model']}, --size "
        f"{first['size']}, --augment {first['augment']}, --lr {first['lr']} "
        f"({first['lr-schedule']}), {first['rounds']} rounds; "
        f"extra args: {' '.join(extra) or '-'}\n"
    )
    class_names: list[str] = []
    lines, clean_lines = [], []
    nan = float("nan")
    for name, res in results.items():
        rows = res.rows
        last = rows[-1]
        pc = res.per_class.get(int(last["round"]), {})
        class_names = class_names or list(pc.get("class_names", []))
        recall = pc.get("recall", [nan] * len(class_names))
        clean_pc = pc.get("clean") or {}
        clean_recall = clean_pc.get("recall", [nan] * len(class_names))
        target = SETUPS[name][1]
        clean_acc = last.get("clean_accuracy", nan)
        met = "-"
        if target is not None:
            glioma = clean_recall[0] if clean_recall else nan
            met = (
                f"ACC >= {target:.2f}: {'met' if clean_acc >= target else 'NOT met'}; "
                f"glioma >= {GLIOMA_TARGET:.2f}: "
                + ("met" if glioma >= GLIOMA_TARGET else "NOT met")
            )
        head = [
            name,
            f"{int(last['round'])}/{res.config['rounds']}",
            res.offset + last["elapsed_seconds"],
        ]
        lines.append(
            [
                *head,
                last["accuracy"],
                clean_acc,
                last.get("balanced_accuracy", nan),
                last.get("clean_balanced_accuracy", nan),
                last.get("f1", nan),
                last.get("clean_f1", nan),
                last["auc"],
                last.get("clean_auc", nan),
                met,
            ]
        )
        clean_lines.append([*head[:1], *recall, *clean_recall])
    print(
        table(
            [
                "run", "rounds", "s since start", "test ACC", "clean ACC", "balanced",
                "clean balanced", "macro F1", "clean macro F1", "AUC", "clean AUC",
                "target (clean split)",
            ],
            lines,
        )
    )  # fmt: skip
    print("\nrecall of each class, official test split, then clean test split:\n")
    print(
        table(
            [
                "run", *[f"{c}" for c in class_names], *[f"clean {c}" for c in class_names],
            ],
            clean_lines,
        )
    )  # fmt: skip
    for name, res in results.items():
        leak = json.loads((res.out / "leakage.json").read_text()) if res.out else {}
        clean = leak.get("clean_test") or {}
        dedup = leak.get("dedup") or {}
        if clean:
            print(
                f"- {name}: clean test split {clean['clean_images']} of {clean['test_images']} "
                f"images ({clean['left_out_exact']} left out for an identical training image, "
                f"{clean['left_out_near']} for a near twin within {clean['threshold']} bits); "
                f"--dedup {dedup.get('mode')}: {dedup.get('removed', 0)} of "
                f"{dedup.get('training_images')} training images removed"
            )
    for name, res in results.items():
        rounds = [r["round_seconds"] + r.get("eval_seconds", 0.0) for r in res.rows]
        rounds = sorted(rounds[1:])  # round 0 is the first evaluation only
        med = rounds[len(rounds) // 2] if rounds else float("nan")
        print(
            f"- {name}: round 0 (decoding, partitioning, first evaluation) ended "
            f"{res.offset:.0f} s after the command started; median {med:.1f} s a round"
        )
    if a.report is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    cold_cache = tmp / "cache-decode"
    cold = decode_seconds(cold_cache)
    warm = decode_seconds(cold_cache)
    print(
        f"\ndecoding the {len(class_names) or 4}-class JPEG folders (fresh process): "
        f"cold cache {cold:.1f} s, warm cache {warm:.1f} s"
    )
    if a.keep is not None:
        print(f"run directories and logs: {a.keep}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
