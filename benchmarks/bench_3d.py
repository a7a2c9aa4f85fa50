"""3D volumes at 64 px: seconds a batch of each model, and a run of the default.

AdrenalMNIST3D at 64 px (1188 training, 98 validation, 298 test volumes of 64^3) did not
finish a round in 10 minutes with the small CNN, which keeps 64^3 voxels through its
first stage. Part 1 times one training step (forward, backward, Adam) and one evaluation
pass of a batch of 32 random volumes for the small CNN, ResNet-10 with its stride-2 stem,
and ResNet-10 with the stem and a max-pool (the default for 3D sets at 64 px), at 28 and
64 px, interleaved ``--reps`` times on one torch thread as a simulated hospital trains.

Part 2 (``--rounds R``) runs ``medbloom run --dataset adrenalmnist3d --size 64`` with the
defaults (4 hospitals) for R rounds on a synthetic file of AdrenalMNIST3D's shape and
split sizes (a bright blob whose size is the class, in noise; the real file is not on
this machine), and prints the seconds of each round and the synthetic test AUC: what the
default costs, and that it learns 3D shape; not an accuracy claim for the real set.

    .venv/bin/python benchmarks/bench_3d.py [--reps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ENV, MEDBLOOM, median, table
from torch import nn

SPLITS = {"train": 1188, "val": 98, "test": 298}


def _models() -> list[tuple[str, nn.Module]]:
    from medbloom.models.cnn import SmallCNN
    from medbloom.models.resnet import ResNet

    def resnet10(pool: bool) -> nn.Module:
        return ResNet(10, 1, 2, dims=3, norm_kind="group", base_width=32, stem_stride=2,
                      stem_pool=pool)  # fmt: skip

    return [
        ("cnn (the default at 28 px)", SmallCNN(1, 2, dims=3)),
        ("resnet10, stride-2 stem", resnet10(False)),
        ("resnet10, stride-2 stem + max-pool (the default at 64 px)", resnet10(True)),
    ]


def time_batches(reps: int) -> None:
    torch.set_num_threads(1)
    rows = []
    for size in (28, 64):
        x = torch.randn(32, 1, size, size, size)
        y = torch.randint(0, 2, (32,))
        models = _models()
        opts = [torch.optim.Adam(m.parameters(), 1e-3) for _, m in models]
        train: list[list[float]] = [[] for _ in models]
        evals: list[list[float]] = [[] for _ in models]
        for rep in range(reps + 1):  # the first pass warms up, not counted
            for i, ((_, m), opt) in enumerate(zip(models, opts, strict=True)):
                t = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()  # type: ignore[no-untyped-call]
                opt.step()
                t_train = time.perf_counter() - t
                with torch.no_grad():
                    m.eval()
                    t = time.perf_counter()
                    m(x)
                    t_eval = time.perf_counter() - t
                    m.train()
                if rep:
                    train[i].append(t_train)
                    evals[i].append(t_eval)
        base = median(train[0])
        for i, (name, m) in enumerate(models):
            params = sum(p.numel() for p in m.parameters())
            # a round: every training volume once (hospitals two at a time on 2 cores),
            # then the server scores validation and test on both cores
            est = (SPLITS["train"] / 32 * median(train[i]) / 2
                   + (SPLITS["val"] + SPLITS["test"]) / 32 * median(evals[i]) / 2)  # fmt: skip
            rows.append([size, name, f"{params / 1e6:.2f} M", f"{median(train[i]):.2f}",
                         f"{median(evals[i]):.2f}", f"{median(train[i]) / base:.2f}x",
                         f"{est:.0f}"])  # fmt: skip
    print(table(["px", "model", "params", "train s/batch", "eval s/batch", "vs cnn",
                 "est. s/round"], rows))  # fmt: skip


def synthetic_adrenal(root: Path, size: int = 64, seed: int = 0) -> Path:
    """AdrenalMNIST3D's file layout and split sizes: a blob of radius 7 (class 0) or 10
    (class 1) at a jittered position, in Gaussian noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size].astype(np.float32)
    arrays: dict[str, np.ndarray] = {}
    for split, n in SPLITS.items():
        labels = rng.integers(0, 2, n)
        vols = np.empty((n, size, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            c = size / 2 + rng.normal(0, 4, 3)
            r = 10.0 if label else 7.0
            blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r
            vol = rng.normal(60, 20, (size, size, size)) + 120 * blob
            vols[i] = np.clip(vol, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = vols
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path = root / "medmnist" / f"adrenalmnist3d_{size}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return root


def run_default(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="medbloom-bench-3d-") as tmp:
        data = synthetic_adrenal(Path(tmp) / "data")
        out = Path(tmp) / "run"
        started = time.monotonic()
        subprocess.run(
            [*MEDBLOOM, "run", "--dataset", "adrenalmnist3d", "--size", "64", "--data-dir",
             str(data), "--rounds", str(rounds), "--audit", "off", "--out", str(out)],
            env=ENV, check=True, capture_output=True,
        )  # fmt: skip
        wall = time.monotonic() - started
        with (out / "metrics.csv").open() as fh:
            metrics = list(csv.DictReader(fh))
        rows = [[r["round"], f"{float(r['round_seconds']):.1f}", f"{float(r['eval_seconds']):.1f}",
                 f"{float(r['auc']):.3f}"] for r in metrics]  # fmt: skip
        print(table(["round", "train s", "eval s", "synthetic test AUC"], rows))
        per_round = median([float(r["round_seconds"]) + float(r["eval_seconds"])
                            for r in metrics[1:]])  # fmt: skip
        print(f"\n{rounds} rounds in {wall:.0f} s (the command, start to end); a round "
              f"{per_round:.0f} s, so 20 rounds about {20 * per_round / 60:.1f} min")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=0, help="also run the default (part 2)")
    args = parser.parse_args()
    time_batches(args.reps)
    if args.rounds:
        print()
        run_default(args.rounds)


if __name__ == "__main__":
    main()
