"""``medbloom data audit``: find the twins, print the table, write audit.json and the
contact sheet; and what a run records of its clean test split.

The search itself is :mod:`medbloom.data.audit`; this module presents it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medbloom.data.audit import (
    HASH_BITS,
    MAX_THRESHOLD,
    Audit,
    check_threshold,
    grey,
    near_pairs,
)
from medbloom.data.types import Splits
from medbloom.errors import MedbloomError

# The contact sheet: up to this many example pairs a row, each row a band of distances.
SHEET_PAIRS = 6
SHEET_CELL = 96
# Pairs above the threshold shown for comparison come from a seeded sample of images
# this large, searched to the threshold plus this many bits.
SHEET_SAMPLE = 20_000
SHEET_MARGIN = 8
EXACT_BAND = (-1, -1)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(widths[k]) if k == 0 else c.rjust(widths[k]) for k, c in enumerate(r))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def audit_text(audit: Audit, title: str) -> str:
    """The audit's tables: pairs per split pair, test twins per class, the totals."""
    s = audit.summary()
    n = sum(s["images"].values())
    out = [
        f"{title}: {n} images ("
        + ", ".join(f"{k} {v}" for k, v in s["images"].items())
        + f"); twins: identical pixels (exact) or dhash within {audit.threshold} of "
        f"{HASH_BITS} bits (near)",
        "",
        table(
            ["split pair", "pairs", "exact", "near", "different labels"],
            [
                [k, v["pairs"], v["exact"], v["near"], v["different_labels"]]
                for k, v in s["by_split"].items()
            ],
        ),
        "",
        table(
            ["class", "twin pairs", "test images", "with a twin in training", "share"],
            [
                [
                    name,
                    v["pairs"],
                    v["test_images"],
                    v["test_with_train_twin"],
                    f"{v['test_with_train_twin'] / max(v['test_images'], 1):.1%}",
                ]
                for name, v in s["by_class"].items()
            ],
        ),
        "",
        f"test images with a twin in training (train or val): {s['test_with_train_twin']} "
        f"of {s['images']['test']} ({s['test_share_with_twin']:.1%}), "
        f"{s['test_with_exact_train_twin']} of them exact; clean test split: "
        f"{s['test_clean']} images",
        f"twin pairs with different labels: {s['pairs_with_different_labels']}",
    ]
    return "\n".join(out)


def _bands(threshold: int) -> list[tuple[int, int]]:
    """Distance bands for the contact sheet: 0, then about four up to the threshold,
    then two above it (not flagged)."""
    bands = [EXACT_BAND]
    edges = np.unique(np.linspace(0, threshold, 5).round().astype(int))
    if len(edges) == 1:
        bands += [(0, 0)]
    bands += [
        (0 if k == 0 else int(a) + 1, int(b)) for k, (a, b) in enumerate(itertools.pairwise(edges))
    ]
    top = min(threshold + SHEET_MARGIN, MAX_THRESHOLD)
    if top > threshold:
        mid = threshold + max((top - threshold) // 2, 1)
        bands += [(threshold + 1, mid)]
        if top > mid:
            bands += [(mid + 1, top)]
    return bands


def _examples(audit: Audit, seed: int) -> list[tuple[tuple[int, int], list[tuple[int, int, int]]]]:
    """Example pairs (i, j, distance) for each band; pairs across splits first, since
    those are the ones that leak."""
    rng = np.random.default_rng(seed)
    hashes = audit.hashes
    n = len(hashes)
    i, j, d = audit.pairs_i, audit.pairs_j, audit.distance
    # above the threshold: a search a few bits further, in a sample of the images
    top = min(audit.threshold + SHEET_MARGIN, MAX_THRESHOLD)
    if top > audit.threshold:
        sample = np.sort(rng.choice(n, size=min(n, SHEET_SAMPLE), replace=False))
        si, sj, sd = near_pairs(hashes[sample], top)
        far = sd > audit.threshold
        i = np.r_[i, sample[si[far]]]
        j = np.r_[j, sample[sj[far]]]
        d = np.r_[d, sd[far]]
    cross = audit.split_of(i) != audit.split_of(j)
    out = []
    found = len(audit.pairs_i)
    for lo, hi in _bands(audit.threshold):
        if (lo, hi) == EXACT_BAND:
            band = np.flatnonzero(audit.exact)
        else:
            band = np.flatnonzero((d >= lo) & (d <= hi))
            if hi <= audit.threshold:  # near twins that are not exact
                band = band[band < found]
                band = band[~audit.exact[band]]
        first = band[cross[band]]
        rest = band[~cross[band]]
        rng.shuffle(first)
        rng.shuffle(rest)
        chosen = np.r_[first, rest][:SHEET_PAIRS]
        out.append(((lo, hi), [(int(i[k]), int(j[k]), int(d[k])) for k in chosen]))
    return out


def contact_sheet(audit: Audit, splits: Splits, path: Path, seed: int = 0) -> Path:
    """A PNG of example twin pairs, one row per band of distances (exact, bands up to
    the threshold, and two bands above it that are not flagged), each pair side by side
    with its distance, splits and labels, so a person can judge the threshold."""
    from PIL import Image, ImageDraw

    rows = _examples(audit, seed)
    cell, gap, left, head = SHEET_CELL, 8, 120, 14
    width = left + SHEET_PAIRS * (2 * cell + gap)
    height = len(rows) * (cell + head + gap) + 24
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (4, 4),
        f"twin pairs by dhash distance (of {HASH_BITS} bits); flagged: <= {audit.threshold} "
        "bits; red rows are not flagged",
        fill="black",
    )

    def thumb(g: int) -> Image.Image:
        split, index = audit.local(g)
        x = np.asarray(getattr(splits, split).images[index])
        if x.ndim == 3 and x.shape[0] == 3:
            im = Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)), "RGB")
        else:
            im = Image.fromarray(grey(x)).convert("RGB")
        return im.resize((cell, cell), Image.Resampling.NEAREST)

    def label(g: int) -> str:
        value = audit.labels[g]
        if np.ndim(value):
            return "".join(str(int(v)) for v in value)[:8]
        name = audit.class_names[int(value)]
        return name[:10]

    for r, ((lo, hi), pairs) in enumerate(rows):
        y = 24 + r * (cell + head + gap)
        flagged = hi <= audit.threshold
        band = "exact" if (lo, hi) == EXACT_BAND else f"near, {lo}-{hi} bits"
        draw.text((4, y + cell // 2), band, fill="black" if flagged else "red")
        if not flagged:
            draw.text((4, y + cell // 2 + 12), "not flagged", fill="red")
        if not pairs:
            draw.text((left, y + cell // 2), "(no pair at this distance)", fill="gray")
        for c, (a, b, dist) in enumerate(pairs):
            x = left + c * (2 * cell + gap)
            sheet.paste(thumb(a), (x, y + head))
            sheet.paste(thumb(b), (x + cell, y + head))
            sa, _ = audit.local(a)
            sb, _ = audit.local(b)
            draw.text(
                (x, y),
                f"d{dist} {sa[:2]}/{sb[:2]} {label(a)}/{label(b)}"[:30],
                fill="black" if label(a) == label(b) else "red",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".contact_sheet.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def clean_test_record(audit: Audit) -> dict[str, Any]:
    """What a run records of its clean test split (``summary.json``'s ``clean_test``):
    how many test images were left out and why."""
    s = audit.summary()
    flagged = audit.test_twins()
    return {
        "threshold": audit.threshold,
        "hash": s["hash"],
        "test_images": int(audit.sizes["test"]),
        "clean_images": int((~flagged).sum()),
        "left_out": int(flagged.sum()),
        "left_out_exact": int(s["test_with_exact_train_twin"]),
        "left_out_near": int(flagged.sum() - s["test_with_exact_train_twin"]),
        "why": (
            "a twin among the training images (train or validation split): identical "
            f"pixels, or a perceptual hash within {audit.threshold} of {HASH_BITS} bits"
        ),
        "by_class": {k: v["test_with_train_twin"] for k, v in s["by_class"].items()},
    }


def test_twin_list(audit: Audit) -> list[dict[str, Any]]:
    """Each left-out test image with its nearest training twin, for the run directory."""
    sa, sb = audit.split_of(audit.pairs_i), audit.split_of(audit.pairs_j)
    cross = np.flatnonzero((sa < 2) & (sb == 2))
    order = cross[np.lexsort((audit.distance[cross], audit.pairs_j[cross]))]
    out, seen = [], set()
    for k in order:
        t = int(audit.pairs_j[k])
        if t in seen:
            continue
        seen.add(t)
        split, idx = audit.local(int(audit.pairs_i[k]))
        _, test_idx = audit.local(t)
        entry: dict[str, Any] = {
            "test_index": test_idx,
            "twin_split": split,
            "twin_index": idx,
            "distance": int(audit.distance[k]),
            "exact": bool(audit.exact[k]),
        }
        if audit.names.get("test"):
            entry["test_file"] = audit.names["test"][test_idx]
        if audit.names.get(split):
            entry["twin_file"] = audit.names[split][idx]
        out.append(entry)
    return out


def run_audit(
    splits: Splits,
    threshold: int,
    out: Path,
    *,
    title: str,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Audit, str]:
    """Audit a loaded data set, write ``out/audit.json`` and ``out/contact_sheet.png``,
    and return the audit and its printed tables."""
    from medbloom.data.audit import audit_splits
    from medbloom.runs import atomic_write_json

    audit = audit_splits(splits, check_threshold(threshold), progress=progress)
    record = audit.to_json()
    record["dataset"] = title
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "audit.json", record)
        contact_sheet(audit, splits, out / "contact_sheet.png", seed=seed)
    except OSError as exc:
        raise MedbloomError(
            f"--out {out}: cannot write the audit ({exc.strerror or exc})"
        ) from None
    return audit, audit_text(audit, title)
