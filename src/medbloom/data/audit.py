"""Duplicate and near-duplicate images within and across a data set's splits.

Two images are **exact twins** when their decoded pixels are identical (the same array
at the size the loader returns), and **near twins** when the perceptual hashes of their
grey images differ in at most ``threshold`` bits. The perceptual hash is
``imagehash.dhash`` with a 16 x 16 grid (256 bits): the grey image is resized to 17 x 16
pixels and each bit says whether a pixel is brighter than its right-hand neighbour, so
a copy saved again at another JPEG quality, resized, shifted in brightness or
re-windowed keeps almost every bit, while a different image flips about half of them.
Folder sets are hashed after their usual preprocessing (cropped to the anatomy, padded,
resized), which takes out differences of framing and resolution before hashing; a 3D
volume is hashed through its mean projection along the depth axis.

Every pair within ``threshold`` bits is found without comparing all pairs: the 256
bits are cut into ``threshold + 1`` blocks, and by the pigeonhole principle two hashes
that differ in at most ``threshold`` bits agree exactly on at least one block. Hashes
are sorted by each block in turn; only hashes in the same run of equal blocks are
compared (multi-index hashing, Norouzi et al., CVPR 2012).

The default threshold (:data:`DEFAULT_THRESHOLD`, 16 bits) was chosen by looking at pairs
at every distance (``medbloom data audit`` draws them) on Brain Tumor MRI and
PneumoniaMNIST: up to 16 bits and beyond, Brain Tumor MRI's pairs are the same slice
re-encoded, resized or re-windowed, or a neighbouring slice; PneumoniaMNIST's first pairs
of different patients (one of them labelled differently) are 21 and 22 bits apart. 16
keeps a margin below that on 28-pixel images.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medbloom.config import DUP_THRESHOLD, MAX_DUP_THRESHOLD
from medbloom.data.types import Splits
from medbloom.errors import ConfigError

__all__ = [
    "DEFAULT_THRESHOLD",
    "HASH_BITS",
    "MAX_THRESHOLD",
    "SPLITS",
    "Audit",
    "audit_images",
    "audit_splits",
    "dedup_mask",
    "near_pairs",
    "perceptual_hashes",
    "pixel_digests",
]

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
WORDS = HASH_BITS // 64
# The default, and the largest allowed: past a quarter of the bits, unrelated images
# match far more often than copies do, and the search's blocks get so short that it
# compares nearly every pair.
DEFAULT_THRESHOLD = DUP_THRESHOLD
MAX_THRESHOLD = MAX_DUP_THRESHOLD
SPLITS = ("train", "val", "test")
# The hash and its preprocessing; a change invalidates cached hashes.
HASH_METHOD = f"imagehash.dhash(hash_size={HASH_SIZE}) of the grey image; 3D: depth mean"
_HASH_VERSION = 1


def check_threshold(threshold: int, flag: str = "--dup-threshold") -> int:
    """The threshold as an int in [0, MAX_THRESHOLD], or a :class:`ConfigError`."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer):
        raise ConfigError(f"{flag} {threshold!r} is not an integer number of bits")
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise ConfigError(
            f"{flag} {threshold} is out of range: expected a number of bits in "
            f"0..{MAX_THRESHOLD} of the {HASH_BITS}-bit hash"
        )
    return int(threshold)


# ---------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------


def grey(image: np.ndarray) -> np.ndarray:
    """A channels-first uint8 image or volume as one 2D grey uint8 image.

    RGB is converted as Pillow converts to ``L`` (ITU-R 601-2 luma); a 3D volume
    ``(C, D, H, W)`` becomes its mean along the depth axis.
    """
    x = np.asarray(image)
    if x.ndim == 4:  # (C, D, H, W): mean projection along depth
        x = x.astype(np.float32).mean(axis=1)
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image or (C, D, H, W) volume, got {x.shape}")
    if x.shape[0] == 3:
        x = x[0] * 0.299 + x[1] * 0.587 + x[2] * 0.114
    elif x.shape[0] == 1:
        x = x[0]
    else:
        x = x.mean(axis=0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8) if x.dtype != np.uint8 else x


def perceptual_hashes(images: np.ndarray, progress: bool = False) -> np.ndarray:
    """``imagehash.dhash`` (16 x 16, 256 bits) of each image's grey version, packed:
    ``(N, 4)`` uint64."""
    import imagehash
    from PIL import Image

    from medbloom.progress import progress_bar

    out = np.empty((len(images), HASH_BITS // 8), dtype=np.uint8)
    with progress_bar(len(images), "hash", "img", enabled=progress) as bar:
        for i in range(len(images)):
            bits = imagehash.dhash(Image.fromarray(grey(images[i])), hash_size=HASH_SIZE).hash
            out[i] = np.packbits(bits.reshape(-1))
            bar.update()
    return out.view(np.uint64).reshape(len(images), WORDS)


def pixel_digests(images: np.ndarray) -> np.ndarray:
    """A 128-bit BLAKE2b digest of each image's pixels (shape included): ``(N, 2)`` uint64."""
    out = np.empty((len(images), 16), dtype=np.uint8)
    for i, image in enumerate(images):
        h = hashlib.blake2b(digest_size=16)
        h.update(str(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out.view(np.uint64).reshape(len(images), 2)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between rows of two ``(N, 4)`` uint64 hash arrays."""
    return np.bitwise_count(a ^ b).sum(axis=-1).astype(np.int32)


# ---------------------------------------------------------------------------
# Multi-index search
# ---------------------------------------------------------------------------


def _block_keys(hashes: np.ndarray, blocks: int) -> list[np.ndarray]:
    """One uint64 key per hash for each of ``blocks`` bit blocks: equal blocks give equal
    keys (unequal blocks may collide; candidates are checked).

    Any partition of the bits keeps the pigeonhole argument, so the blocks are chosen
    for small buckets: the bits of medical images are far from uniform (a dark corner
    gives the same bits in every image), and a block of such bits puts thousands of
    images in one bucket. The bits are ranked by their entropy over these hashes and
    dealt out round-robin, so every block gets its share of informative bits: on
    111,000 chest X-rays that made 1.7x fewer candidate pairs than contiguous blocks."""
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)  # (N, 256)
    p = bits.mean(axis=0) if len(bits) else np.full(HASH_BITS, 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nan_to_num(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    ranked = np.argsort(-entropy, kind="stable")
    bits = bits[:, np.concatenate([ranked[k::blocks] for k in range(blocks)])]
    bounds = np.linspace(0, HASH_BITS, blocks + 1).round().astype(int)
    keys = []
    for lo, hi in itertools.pairwise(bounds):
        packed = np.packbits(bits[:, lo:hi], axis=1)
        pad = (-packed.shape[1]) % 8
        if pad:
            packed = np.pad(packed, ((0, 0), (0, pad)))
        words = np.ascontiguousarray(packed).view(np.uint64)
        key = np.zeros(len(hashes), dtype=np.uint64)
        for k in range(words.shape[1]):  # more than 64 bits (threshold < 3): mix the words
            key = key * np.uint64(0x9E3779B97F4A7C15) ^ words[:, k]
        keys.append(key)
    return keys


def _pairs_in_runs(order: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions within each run of equal ``sorted_keys``, as indices
    through ``order``; the work is the number of pairs, not the square of the runs."""
    n = len(sorted_keys)
    empty = np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, n])
    run_end = np.repeat(starts + lengths, lengths)  # one past each position's run
    firsts: list[np.ndarray] = [empty]
    seconds: list[np.ndarray] = [empty]
    active = np.flatnonzero(run_end - np.arange(n) > 1)
    offset = 1
    while len(active):
        firsts.append(order[active])
        seconds.append(order[active + offset])
        offset += 1
        active = active[active + offset < run_end[active]]
    return np.concatenate(firsts), np.concatenate(seconds)


def near_pairs(
    hashes: np.ndarray, threshold: int, *, chunk: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` whose hashes differ in at most ``threshold`` bits.

    Returns ``(i, j, distance)``, sorted by ``(i, j)``. Multi-index hashing: the hashes
    are split into ``threshold + 1`` blocks; any pair within ``threshold`` agrees on one
    block, so only hashes sharing a block value are compared.
    """
    threshold = check_threshold(threshold, "threshold")
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    for key in _block_keys(hashes, threshold + 1):
        order = np.argsort(key, kind="stable")
        a, b = _pairs_in_runs(order, key[order])
        for s in range(0, len(a), chunk):
            ia, ib = a[s : s + chunk], b[s : s + chunk]
            close = hamming(hashes[ia], hashes[ib]) <= threshold
            lo, hi = np.minimum(ia, ib)[close], np.maximum(ia, ib)[close]
            found_i.append(lo)
            found_j.append(hi)
    if not found_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.int32)
    code = np.unique(np.concatenate(found_i) * np.int64(n) + np.concatenate(found_j))
    i, j = code // n, code % n
    return i, j, hamming(hashes[i], hashes[j])


def exact_pairs(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with equal pixel digests, sorted by ``(i, j)``."""
    digests = np.ascontiguousarray(digests, dtype=np.uint64)
    n = len(digests)
    key = digests[:, 0] ^ (digests[:, 1] * np.uint64(0x9E3779B97F4A7C15))
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    a, b = _pairs_in_runs(order, key[order])
    same = (digests[a] == digests[b]).all(axis=1)
    lo, hi = np.minimum(a, b)[same], np.maximum(a, b)[same]
    code = np.unique(lo * np.int64(n) + hi)
    return code // n, code % n


# ---------------------------------------------------------------------------
# The audit of one data set
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """Every twin pair of a data set's images across its train, val and test splits.

    Images are indexed globally: train first, then val, then test (``offsets`` gives
    where each split starts). ``pairs_i < pairs_j``; ``distance`` is the hashes' bits
    apart (0 for exact twins, and possibly for near ones), ``exact`` whether the pixels
    are identical.
    """

    threshold: int
    sizes: dict[str, int]
    labels: np.ndarray  # (N,) class index, or (N, L) 0/1 for multi-label
    class_names: tuple[str, ...]
    pairs_i: np.ndarray
    pairs_j: np.ndarray
    distance: np.ndarray
    exact: np.ndarray
    hashes: np.ndarray  # (N, 4) uint64 perceptual hashes, in global index order
    names: dict[str, list[str]] = field(default_factory=dict)  # file names, where known

    @property
    def offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for s in SPLITS:
            out[s] = at
            at += self.sizes[s]
        return out

    def split_of(self, index: np.ndarray) -> np.ndarray:
        """The split number (0 train, 1 val, 2 test) of global indices."""
        bounds = np.cumsum([self.sizes[s] for s in SPLITS])
        return np.searchsorted(bounds, index, side="right")

    def local(self, index: int) -> tuple[str, int]:
        """A global index as (split, index within the split)."""
        split = SPLITS[int(self.split_of(np.asarray([index]))[0])]
        return split, int(index - self.offsets[split])

    def _labels_differ(self) -> np.ndarray:
        a, b = self.labels[self.pairs_i], self.labels[self.pairs_j]
        return (a != b).any(axis=1) if a.ndim == 2 else a != b

    def test_twins(self, exact_only: bool = False) -> np.ndarray:
        """A mask over the test split: the images with a twin (an exact twin, with
        ``exact_only``) among the training images (train or val split)."""
        sa, sb = self.split_of(self.pairs_i), self.split_of(self.pairs_j)
        cross = (sa < 2) & (sb == 2)  # i < j, so a test image is always the second
        if exact_only:
            cross &= self.exact
        flagged = np.zeros(self.sizes["test"], dtype=bool)
        flagged[self.pairs_j[cross] - self.offsets["test"]] = True
        return flagged

    def clean_test_indices(self) -> np.ndarray:
        """Indices into the test split of the images without a twin in training."""
        return np.flatnonzero(~self.test_twins())

    def summary(self) -> dict[str, Any]:
        """The counts the audit table prints and ``audit.json`` carries."""
        sa, sb = self.split_of(self.pairs_i), self.split_of(self.pairs_j)
        differ = self._labels_differ()
        by_split = {}
        for a in range(3):
            for b in range(a, 3):
                m = (sa == a) & (sb == b)
                by_split[f"{SPLITS[a]}-{SPLITS[b]}"] = {
                    "pairs": int(m.sum()),
                    "exact": int((m & self.exact).sum()),
                    "near": int((m & ~self.exact).sum()),
                    "different_labels": int((m & differ).sum()),
                }
        by_class = {}
        first_label = self.labels[self.pairs_i]
        test_flag = self.test_twins()
        test_labels = self.labels[self.offsets["test"] :]
        exact_flag = self.test_twins(exact_only=True)
        for c, name in enumerate(self.class_names):
            if first_label.ndim == 2:  # multi-label: pairs whose first image has label c
                m = first_label[:, c] == 1
                in_test = test_labels[:, c] == 1
            else:
                m = first_label == c
                in_test = test_labels == c
            by_class[name] = {
                "pairs": int((m & ~differ).sum()) if first_label.ndim == 1 else int(m.sum()),
                "test_images": int(in_test.sum()),
                "test_with_train_twin": int((in_test & test_flag).sum()),
            }
        n_test = self.sizes["test"]
        return {
            "threshold": self.threshold,
            "hash": HASH_METHOD,
            "hash_bits": HASH_BITS,
            "images": dict(self.sizes),
            "pairs": int(len(self.pairs_i)),
            "exact_pairs": int(self.exact.sum()),
            "near_pairs": int((~self.exact).sum()),
            "pairs_with_different_labels": int(differ.sum()),
            "by_split": by_split,
            "by_class": by_class,
            "test_with_train_twin": int(test_flag.sum()),
            "test_with_exact_train_twin": int(exact_flag.sum()),
            "test_clean": int(n_test - test_flag.sum()),
            "test_share_with_twin": float(test_flag.mean()) if n_test else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        """``audit.json``: the summary and every pair (split, index within the split,
        file name where known, label, distance, exact)."""
        rows = []
        differ = self._labels_differ()
        for k in range(len(self.pairs_i)):
            row: dict[str, Any] = {}
            for side, g in (("a", int(self.pairs_i[k])), ("b", int(self.pairs_j[k]))):
                split, idx = self.local(g)
                row[f"split_{side}"] = split
                row[f"index_{side}"] = idx
                if self.names.get(split):
                    row[f"file_{side}"] = self.names[split][idx]
                label = self.labels[g]
                row[f"label_{side}"] = (
                    [int(x) for x in label] if np.ndim(label) else self.class_names[int(label)]
                )
            row["distance"] = int(self.distance[k])
            row["exact"] = bool(self.exact[k])
            row["different_labels"] = bool(differ[k])
            rows.append(row)
        return {"summary": self.summary(), "class_names": list(self.class_names), "pairs": rows}


def audit_images(
    images: np.ndarray | None,
    labels: np.ndarray,
    sizes: dict[str, int],
    class_names: Sequence[str],
    threshold: int = DEFAULT_THRESHOLD,
    *,
    hashes: np.ndarray | None = None,
    digests: np.ndarray | None = None,
    names: dict[str, list[str]] | None = None,
    progress: bool = False,
) -> Audit:
    """Audit images already concatenated in split order (train, val, test); ``images``
    may be None where ``hashes`` and ``digests`` are given."""
    threshold = check_threshold(threshold)
    if hashes is None or digests is None:
        if images is None:
            raise ValueError("audit_images needs the images, or their hashes and digests")
        hashes = perceptual_hashes(images, progress=progress) if hashes is None else hashes
        digests = pixel_digests(images) if digests is None else digests
    ni, nj, _ = near_pairs(hashes, threshold)
    ei, ej = exact_pairs(digests)
    n = len(hashes)
    near_code = ni * np.int64(n) + nj
    exact_code = ei * np.int64(n) + ej
    # exact twins have identical hashes, so every exact pair is also a near pair at
    # distance 0; the union keeps the search honest should that ever not hold
    code = np.union1d(near_code, exact_code)
    i, j = code // n, code % n
    dist = hamming(hashes[i], hashes[j]) if len(code) else np.empty(0, dtype=np.int32)
    exact = np.isin(code, exact_code)
    return Audit(
        threshold=threshold,
        sizes={s: int(sizes[s]) for s in SPLITS},
        labels=np.asarray(labels),
        class_names=tuple(class_names),
        pairs_i=i,
        pairs_j=j,
        distance=dist,
        exact=exact,
        hashes=hashes,
        names=dict(names or {}),
    )


def audit_splits(
    splits: Splits,
    threshold: int = DEFAULT_THRESHOLD,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> Audit:
    """Audit a loaded data set; its hashes are cached under ``cache_dir`` (default: the
    user cache's ``audit`` folder), keyed by the pixels' digests."""
    # split by split, never one copy of every image (ChestMNIST at 224 px is 5.6 GB)
    parts = [splits.train.images, splits.val.images, splits.test.images]
    labels = np.concatenate([np.asarray(s.labels) for s in (splits.train, splits.val, splits.test)])
    sizes = {s: len(p) for s, p in zip(SPLITS, parts, strict=True)}
    digests = np.concatenate([pixel_digests(p) for p in parts])
    hashes = cached_hashes(parts, digests, cache_dir, progress=progress)
    names = splits.spec.extra.get("files") or {}
    return audit_images(
        None,
        labels,
        sizes,
        splits.spec.class_names,
        threshold,
        hashes=hashes,
        digests=digests,
        names=names,
        progress=progress,
    )


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("medbloom")) / "audit"


def cached_hashes(
    parts: Sequence[np.ndarray],
    digests: np.ndarray,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The perceptual hashes of the images of ``parts`` (arrays of images, in order),
    read from a cache file named by the digest of every image's pixel digest (so the
    same pixels in the same order hit it), or computed and written there (atomically;
    an unwritable cache is no error)."""
    n = sum(len(p) for p in parts)
    folder = cache_dir if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{_HASH_VERSION}\0{HASH_METHOD}\0".encode())
    key.update(np.ascontiguousarray(digests).tobytes())
    path = folder / f"dhash-{key.hexdigest()[:32]}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (n, WORDS) and cached.dtype == np.uint64:
            return np.asarray(cached)
    except (OSError, ValueError):
        pass
    hashes = np.concatenate([perceptual_hashes(p, progress=progress) for p in parts])
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dhash-", suffix=".npy", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, hashes)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return hashes


# ---------------------------------------------------------------------------
# De-duplicating the training images
# ---------------------------------------------------------------------------


def dedup_mask(audit: Audit, mode: str) -> np.ndarray:
    """Which training images (train split) to keep under ``--dedup mode``.

    ``none`` keeps all. ``exact`` and ``near`` consider exact twins only, or every
    twin within the threshold: a training image is dropped when it has a twin in the
    validation split (which selects the best model and must not have seen its twin
    trained on), or an earlier training image that is kept has it as a twin (the
    first of each group stays). No two kept training images are then twins, so no image
    sits in two hospitals, or in a hospital's training and local validation splits.
    """
    n_train = audit.sizes["train"]
    keep = np.ones(n_train, dtype=bool)
    if mode == "none":
        return keep
    if mode not in ("exact", "near"):
        raise ConfigError(f"--dedup {mode!r} is unknown: expected one of none, exact, near")
    use = audit.exact if mode == "exact" else np.ones(len(audit.pairs_i), dtype=bool)
    i, j = audit.pairs_i[use], audit.pairs_j[use]
    sa, sb = audit.split_of(i), audit.split_of(j)
    # train image with a twin in val
    keep[i[(sa == 0) & (sb == 1)]] = False
    within = (sa == 0) & (sb == 0)
    i, j = i[within], j[within]
    order = np.lexsort((i, j))
    i, j = i[order], j[order]
    if not len(j):
        return keep
    # in ascending j: j goes when any twin i < j is kept (greedy, first kept)
    starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
    ends = np.r_[starts[1:], len(j)]
    for s, e in zip(starts, ends, strict=True):
        if keep[i[s:e]].any():
            keep[j[s]] = False
    return keep
