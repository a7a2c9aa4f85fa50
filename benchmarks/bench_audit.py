"""How long the duplicate audit takes, and that it does not compare all pairs.

1. ``medbloom data audit brain-tumor-mri`` (the real CLI, warm decoded-image cache, then
   with its hash cache warm too) on ``../shared/datasets``.
2. A ChestMNIST-sized set: the 5856 real PneumoniaMNIST images, each with 18 altered copies
   (brightness shifted, JPEG re-saved, re-windowed), 111,264 images in all, so that every
   image has near twins, the hard case for the search. Hashing, the multi-index search at
   the default threshold, and, for scale, the all-pairs comparison timed on a 10,000-image
   sample and extrapolated to the whole set (it grows with the square of the images).

    .venv/bin/python benchmarks/bench_audit.py [--copies 18]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import DATA_DIR, ENV, MEDBLOOM, REPO, table
from PIL import Image

from medbloom.data.audit import (
    DEFAULT_THRESHOLD,
    exact_pairs,
    near_pairs,
    perceptual_hashes,
    pixel_digests,
)


def cli_audit_seconds(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [*MEDBLOOM, "data", "audit", "brain-tumor-mri", "--data-dir", str(DATA_DIR), "--out",
         str(out)],
        cwd=REPO, env=ENV, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - t0


def altered(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:
        return np.clip(img.astype(np.int16) + rng.integers(-20, 21), 0, 255).astype(np.uint8)
    if kind == 1:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    lo, hi = int(rng.integers(0, 20)), int(rng.integers(235, 256))
    return np.clip((img.astype(np.float32) - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)


def brute_force_seconds(hashes: np.ndarray, threshold: int) -> float:
    t0 = time.perf_counter()
    n = len(hashes)
    for a in range(0, n, 1000):
        d = np.zeros((min(1000, n - a), n), dtype=np.int32)
        for k in range(hashes.shape[1]):
            d += np.bitwise_count(hashes[a : a + 1000, k : k + 1] ^ hashes[None, :, k])
        np.count_nonzero(d <= threshold)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=18, help="altered copies of each image")
    a = p.parse_args()
    if not (DATA_DIR / "medmnist" / "pneumoniamnist.npz").is_file():
        sys.exit(f"real data not found: {DATA_DIR}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if (DATA_DIR / "brain-tumor-mri").is_dir():
            cli_audit_seconds(Path(tmp) / "warmup")  # decodes the JPEGs once if needed
            rows.append(
                ["brain-tumor-mri, CLI, hashes cached", 7023, cli_audit_seconds(Path(tmp) / "a")]
            )
    with np.load(DATA_DIR / "medmnist" / "pneumoniamnist.npz") as npz:
        real = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    copies = [real] + [np.stack([altered(im, rng) for im in real]) for _ in range(a.copies)]
    images = np.concatenate(copies)[:, None]
    make = time.perf_counter() - t0
    n = len(images)
    t0 = time.perf_counter()
    hashes = perceptual_hashes(images)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    digests = pixel_digests(images)
    ei, _ = exact_pairs(digests)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    i, _, _ = near_pairs(hashes, DEFAULT_THRESHOLD)
    t_near = time.perf_counter() - t0
    sample = hashes[rng.choice(n, size=10_000, replace=False)]
    t_brute = brute_force_seconds(sample, DEFAULT_THRESHOLD) * (n / 10_000) ** 2
    rows += [
        [f"{n} images: dhash of every image", n, t_hash],
        [f"{n} images: exact pairs ({len(ei)} found)", n, t_exact],
        [f"{n} images: near pairs <= {DEFAULT_THRESHOLD} bits ({len(i)} found)", n, t_near],
        [f"{n} images: all pairs compared (extrapolated from 10,000)", n, t_brute],
    ]
    print(
        f"## The duplicate audit's time ({a.copies} altered copies of each of {len(real)} "
        f"PneumoniaMNIST images; making them took {make:.0f} s)\n"
    )
    print(table(["step", "images", "seconds"], rows))
    print(f"\nthe near-pair search took {t_near / t_brute:.2f} of the all-pairs comparison's time")


if __name__ == "__main__":
    main()
