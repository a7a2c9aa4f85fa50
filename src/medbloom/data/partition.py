"""Split a training set across hospitals: iid, dirichlet or pathological, seeded.

The splits themselves come from Flower Datasets' partitioners, run offline on a
table of labels; this module adds what they leave to the caller: a key to
partition multi-label data by, the minimum-size check with a message that says
why it failed, each client's local train/validation split, and the partition map
that a run saves.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from medbloom.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class ClientPartition:
    """One hospital's share of the training set, as indices into it."""

    client_id: int
    train: np.ndarray
    val: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.val)


def partition_key(labels: np.ndarray) -> np.ndarray:
    """The single class each sample is partitioned by.

    Multi-label rows (``(N, L)`` indicators) go by their first positive label, and
    rows with none by an extra key ``L``, so "no finding" images spread like a class.
    """
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positive = labels.astype(bool)
    first = positive.argmax(axis=1)
    return np.where(positive.any(axis=1), first, labels.shape[1]).astype(np.int64)


def partition_indices(
    labels: np.ndarray,
    method: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
    seed: int = 42,
) -> list[np.ndarray]:
    """Indices of each partition, sorted, for a training set with these labels.

    Raises :class:`ConfigError` when the request cannot be met, saying why.
    """
    if method not in PARTITIONERS:
        raise ConfigError(
            f"--partition {method!r} is unknown: expected one of {', '.join(PARTITIONERS)}"
        )
    n = len(labels)
    if num_partitions < 1:
        raise ConfigError(f"--num-clients {num_partitions} is out of range: expected >= 1")
    if num_partitions * min_partition_size > n:
        raise ConfigError(
            f"--num-clients {num_partitions} is more than the data allows: {n} training samples "
            f"cannot give {num_partitions} clients at least --min-partition-size "
            f"{min_partition_size} each (at most {n // max(min_partition_size, 1)} clients)"
        )
    if method == "dirichlet" and not alpha > 0:
        raise ConfigError(f"--alpha {alpha} is out of range: expected a number > 0")
    key = partition_key(labels)
    parts = _run_partitioner(
        key, method, num_partitions, alpha, classes_per_client, min_partition_size, seed
    )
    sizes = [len(p) for p in parts]
    if min(sizes) < min_partition_size:
        worst = int(np.argmin(sizes))
        hint = {
            "dirichlet": "raise --alpha, lower --num-clients or --min-partition-size",
            "pathological": "raise --classes-per-client or lower --num-clients",
            "iid": "lower --num-clients",
        }[method]
        raise ConfigError(
            f"--partition {method} gave client {worst} only {sizes[worst]} samples, fewer than "
            f"--min-partition-size {min_partition_size}: {hint}"
        )
    return [np.sort(p) for p in parts]


def _run_partitioner(
    key: np.ndarray,
    method: str,
    num_partitions: int,
    alpha: float,
    classes_per_client: int,
    min_partition_size: int,
    seed: int,
) -> list[np.ndarray]:
    # Imported here: flwr_datasets pulls in Hugging Face datasets, which is slow to
    # import and needed only while partitioning.
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    table = datasets.Dataset.from_dict({"label": key, "index": np.arange(len(key))})
    partitioner: Any
    if method == "iid":
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif method == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        n_classes = len(np.unique(key))
        if classes_per_client > n_classes:
            raise ConfigError(
                f"--classes-per-client {classes_per_client} is more than the {n_classes} "
                "classes in the training set"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [
                np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except ValueError as exc:
        if method == "dirichlet":
            raise ConfigError(
                f"--partition dirichlet with --alpha {alpha} could not give all "
                f"{num_partitions} clients at least --min-partition-size {min_partition_size} "
                "samples in 10 draws: raise --alpha, lower --num-clients or "
                "--min-partition-size"
            ) from None
        raise ConfigError(f"--partition {method}: {exc}") from None


def split_local(
    indices: np.ndarray, val_fraction: float, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into local train and validation, seeded per client.

    At least one sample always stays for training.
    """
    rng = np.random.default_rng([seed, client_id])
    shuffled = rng.permutation(indices)
    n_val = min(int(round(len(indices) * val_fraction)), len(indices) - 1)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def make_partitions(
    labels: np.ndarray,
    method: str,
    num_clients: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
    local_val_fraction: float = 0.1,
    seed: int = 42,
) -> list[ClientPartition]:
    """Partition a training set and split each client's share into train and val."""
    parts = partition_indices(
        labels,
        method,
        num_clients,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    out = []
    for cid, idx in enumerate(parts):
        train, val = split_local(idx, local_val_fraction, seed, cid)
        out.append(ClientPartition(cid, train, val))
    return out


def label_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class (multi-label: positives per label)."""
    if labels.ndim == 2:
        return [int(c) for c in labels.astype(np.int64).sum(axis=0)]
    return [int(c) for c in np.bincount(labels.astype(np.int64), minlength=num_classes)]


def partition_map(
    partitions: list[ClientPartition], labels: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """The JSON-ready record of who holds what: indices and label counts per client."""
    return {
        "class_names": list(class_names),
        "clients": [
            {
                "client_id": p.client_id,
                "num_train": len(p.train),
                "num_val": len(p.val),
                "label_counts": label_counts(
                    labels[np.concatenate([p.train, p.val])], len(class_names)
                ),
                "train_indices": p.train.tolist(),
                "val_indices": p.val.tolist(),
            }
            for p in partitions
        ],
    }
