"""Partition conformance: every partitioner, several label sets, the same contract."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from medbloom.data.partition import (
    PARTITIONERS,
    ClientPartition,
    label_counts,
    make_partitions,
    partition_indices,
    partition_key,
    partition_map,
    split_local,
)
from medbloom.errors import ConfigError

REAL_PNEUMONIA = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medmnist" / "pneumoniamnist.npz"
)

NUM_CLIENTS = 10
MIN_SIZE = 5
ALPHA = 0.5
VAL_FRACTION = 0.2


def _binary() -> np.ndarray:
    # pneumonia's imbalance (1214 normal / 3494 pneumonia), at a fifth of the size
    labels = np.r_[np.zeros(243, np.int64), np.ones(699, np.int64)]
    return np.random.default_rng(0).permutation(labels)


def _eight_class() -> np.ndarray:
    p = np.array([1, 2, 3, 4, 5, 6, 7, 12]) / 40
    return np.random.default_rng(1).choice(8, size=1200, p=p).astype(np.int64)


def _multi_label() -> np.ndarray:
    return (np.random.default_rng(2).random((900, 14)) < 0.1).astype(np.uint8)


# name -> (labels, classes_per_client, number of classes)
LABEL_SETS = {
    "binary-imbalanced": (_binary(), 1, 2),
    "8-class": (_eight_class(), 2, 8),
    "multi-label-14": (_multi_label(), 3, 14),
}
CASES = [(m, name) for m in PARTITIONERS for name in LABEL_SETS]
IDS = [f"{m}-{name}" for m, name in CASES]


def _run(method: str, name: str, seed: int) -> list[np.ndarray]:
    labels, cpc, _ = LABEL_SETS[name]
    return partition_indices(
        labels,
        method,
        NUM_CLIENTS,
        alpha=ALPHA,
        classes_per_client=cpc,
        min_partition_size=MIN_SIZE,
        seed=seed,
    )


@functools.cache
def _cached(method: str, name: str, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(_run(method, name, seed))


def test_partitioners_are_the_config_choices() -> None:
    from medbloom.config import PARTITIONS

    assert PARTITIONERS == PARTITIONS == ("iid", "dirichlet", "pathological")


# --------------------------------------------------------------- conformance


@pytest.mark.parametrize(("method", "name"), CASES, ids=IDS)
def test_disjoint_sorted_and_covering(method: str, name: str) -> None:
    labels = LABEL_SETS[name][0]
    parts = _cached(method, name, 42)
    assert len(parts) == NUM_CLIENTS
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices sorted, no repeats within a partition"
        assert p.min() >= 0 and p.max() < len(labels)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)), "partitions overlap"
    n_keys = len(np.unique(partition_key(labels)))
    if method != "pathological" or n_keys <= NUM_CLIENTS:
        # iid and dirichlet always use every sample; pathological does when every
        # class is some client's first class
        np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))


@pytest.mark.parametrize(("method", "name"), CASES, ids=IDS)
def test_min_partition_size(method: str, name: str) -> None:
    sizes = [len(p) for p in _cached(method, name, 42)]
    assert min(sizes) >= MIN_SIZE, sizes


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_pathological_clients_hold_classes_per_client(name: str) -> None:
    labels, cpc, _ = LABEL_SETS[name]
    key = partition_key(labels)
    held = [np.unique(key[p]) for p in _cached("pathological", name, 42)]
    assert [len(h) for h in held] == [cpc] * NUM_CLIENTS
    # "first-deterministic": client i's first class is the (i mod K)-th key
    keys = np.unique(key)
    for cid, h in enumerate(held):
        assert keys[cid % len(keys)] in h


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_iid_is_balanced(name: str) -> None:
    n = len(LABEL_SETS[name][0])
    sizes = [len(p) for p in _cached("iid", name, 42)]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("method", "name"), CASES, ids=IDS)
def test_deterministic_per_seed(method: str, name: str) -> None:
    first = _cached(method, name, 42)
    again = _run(method, name, 42)
    assert len(again) == len(first)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = _cached(method, name, 7)
    labels, cpc, _ = LABEL_SETS[name]
    n_keys = len(np.unique(partition_key(labels)))
    if method == "pathological" and cpc in (1, n_keys):
        # Nothing is drawn: each client's classes are fixed, and a class is split
        # among its clients in index order, so the seed cannot change the result.
        return
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    ), "another seed gave the same partitions"


@pytest.mark.parametrize(("method", "name"), CASES, ids=IDS)
def test_make_partitions_local_split(method: str, name: str) -> None:
    labels, cpc, _ = LABEL_SETS[name]
    clients = make_partitions(
        labels,
        method,
        NUM_CLIENTS,
        alpha=ALPHA,
        classes_per_client=cpc,
        min_partition_size=MIN_SIZE,
        local_val_fraction=VAL_FRACTION,
        seed=42,
    )
    parts = _cached(method, name, 42)
    assert [c.client_id for c in clients] == list(range(NUM_CLIENTS))
    for client, part in zip(clients, parts, strict=True):
        assert isinstance(client, ClientPartition)
        assert len(np.intersect1d(client.train, client.val)) == 0
        np.testing.assert_array_equal(np.sort(np.r_[client.train, client.val]), part)
        assert client.size == len(part)
        n = len(part)
        assert abs(len(client.val) - VAL_FRACTION * n) <= 0.5 + 1e-9, (len(client.val), n)
        assert len(client.train) >= 1
        assert np.all(np.diff(client.train) > 0) and np.all(np.diff(client.val) > 0)


@pytest.mark.parametrize(("method", "name"), CASES, ids=IDS)
def test_partition_map_is_json_and_counts_add_up(method: str, name: str) -> None:
    labels, _, num_classes = LABEL_SETS[name]
    clients = [
        ClientPartition(cid, *split_local(p, VAL_FRACTION, 42, cid))
        for cid, p in enumerate(_cached(method, name, 42))
    ]
    names = tuple(f"c{i}" for i in range(num_classes))
    record = partition_map(clients, labels, names)
    decoded = json.loads(json.dumps(record))
    assert decoded == record
    assert record["class_names"] == list(names)
    assert len(record["clients"]) == NUM_CLIENTS
    for entry, client in zip(record["clients"], clients, strict=True):
        assert entry["client_id"] == client.client_id
        assert entry["num_train"] == len(client.train)
        assert entry["num_val"] == len(client.val)
        assert entry["train_indices"] == client.train.tolist()
        assert entry["val_indices"] == client.val.tolist()
        counts = entry["label_counts"]
        assert len(counts) == num_classes
        held = labels[np.r_[client.train, client.val]]
        if labels.ndim == 1:
            assert sum(counts) == entry["num_train"] + entry["num_val"]
            assert counts == np.bincount(held, minlength=num_classes).tolist()
        else:
            assert counts == held.astype(int).sum(axis=0).tolist()


# ---------------------------------------------------------------- helpers


def test_partition_key() -> None:
    np.testing.assert_array_equal(partition_key(np.array([2, 0, 1], np.uint8)), [2, 0, 1])
    assert partition_key(np.array([2, 0, 1], np.uint8)).dtype == np.int64
    multi = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(partition_key(multi), [1, 0, 3, 2])


def test_split_local() -> None:
    idx = np.arange(100, 140)
    train, val = split_local(idx, 0.25, seed=1, client_id=3)
    assert len(val) == 10 and len(train) == 30
    np.testing.assert_array_equal(np.sort(np.r_[train, val]), idx)
    again = split_local(idx, 0.25, seed=1, client_id=3)
    np.testing.assert_array_equal(again[1], val)
    other_client = split_local(idx, 0.25, seed=1, client_id=4)
    assert not np.array_equal(other_client[1], val)
    # no validation share: everything trains
    train, val = split_local(idx, 0.0, seed=1, client_id=0)
    assert len(val) == 0 and len(train) == 40
    # at least one sample always stays for training
    train, val = split_local(np.array([5, 6, 7]), 0.99, seed=0, client_id=0)
    assert len(train) == 1 and len(val) == 2
    train, val = split_local(np.array([9]), 0.5, seed=0, client_id=0)
    assert train.tolist() == [9] and val.tolist() == []


def test_label_counts() -> None:
    assert label_counts(np.array([0, 2, 2, 1, 2]), 4) == [1, 1, 3, 0]
    assert label_counts(np.array([[1, 0], [1, 1], [0, 0]], np.uint8), 2) == [2, 1]


# ----------------------------------------------------------- impossible asks


def test_more_clients_than_data_allows() -> None:
    labels = np.arange(100) % 2
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, "iid", 11, min_partition_size=10)
    assert str(info.value) == (
        "--num-clients 11 is more than the data allows: 100 training samples cannot give "
        "11 clients at least --min-partition-size 10 each (at most 10 clients)"
    )
    with pytest.raises(ConfigError, match="more than the data allows"):
        make_partitions(labels, "dirichlet", 101, min_partition_size=1)
    # exactly enough is fine
    parts = partition_indices(labels, "iid", 10, min_partition_size=10)
    assert [len(p) for p in parts] == [10] * 10


@pytest.mark.parametrize("method", PARTITIONERS)
def test_zero_clients(method: str) -> None:
    with pytest.raises(ConfigError, match=r"^--num-clients 0 is out of range"):
        partition_indices(np.arange(10) % 2, method, 0)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError) as info:
        partition_indices(np.arange(10) % 2, "shards", 2)
    assert str(info.value) == (
        "--partition 'shards' is unknown: expected one of iid, dirichlet, pathological"
    )


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_alpha_must_be_positive(alpha: float) -> None:
    with pytest.raises(ConfigError, match=r"^--alpha .* is out of range: expected a number > 0"):
        partition_indices(np.arange(100) % 2, "dirichlet", 2, alpha=alpha)


def test_too_many_classes_per_client() -> None:
    labels = LABEL_SETS["binary-imbalanced"][0]
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, "pathological", 4, classes_per_client=3)
    assert str(info.value) == (
        "--classes-per-client 3 is more than the 2 classes in the training set"
    )


def test_dirichlet_min_size_cannot_be_met() -> None:
    labels = np.arange(1000) % 8
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, "dirichlet", 10, alpha=0.01, min_partition_size=90)
    msg = str(info.value)
    assert msg == (
        "--partition dirichlet with --alpha 0.01 could not give all 10 clients at least "
        "--min-partition-size 90 samples in 10 draws: raise --alpha, lower --num-clients "
        "or --min-partition-size"
    )


def test_pathological_client_too_small() -> None:
    labels = np.r_[np.zeros(10, np.int64), np.ones(990, np.int64)]
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, "pathological", 2, classes_per_client=1, min_partition_size=50)
    assert str(info.value) == (
        "--partition pathological gave client 0 only 10 samples, fewer than "
        "--min-partition-size 50: raise --classes-per-client or lower --num-clients"
    )


def test_pathological_rare_class_for_many_clients() -> None:
    labels = np.r_[np.zeros(2, np.int64), np.ones(98, np.int64)]
    with pytest.raises(ConfigError, match=r"^--partition pathological: Label: 0 is needed"):
        partition_indices(labels, "pathological", 5, classes_per_client=1)


# ----------------------------------------------------------------- real data

# Recorded with flwr-datasets 0.6.1 / numpy 2 on the official pneumoniamnist.npz.
REAL_SIZES = [2189, 729, 15, 547, 62, 151, 106, 96, 337, 476]
REAL_COUNTS = [
    [175, 2014],
    [279, 450],
    [2, 13],
    [164, 383],
    [4, 58],
    [30, 121],
    [97, 9],
    [68, 28],
    [232, 105],
    [163, 313],
]


@pytest.mark.realdata
@pytest.mark.skipif(
    not REAL_PNEUMONIA.is_file(),
    reason=f"real MedMNIST file absent: {REAL_PNEUMONIA} (shared data sets not mounted)",
)
def test_real_pneumonia_dirichlet() -> None:
    with np.load(REAL_PNEUMONIA) as npz:
        labels = npz["train_labels"][:, 0].astype(np.int64)
    assert len(labels) == 4708
    kwargs = {"alpha": 0.5, "min_partition_size": 10, "seed": 42}
    parts = partition_indices(labels, "dirichlet", 10, **kwargs)
    again = partition_indices(labels, "dirichlet", 10, **kwargs)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [len(p) for p in parts] == REAL_SIZES
    assert sum(REAL_SIZES) == 4708
    assert [np.bincount(labels[p], minlength=2).tolist() for p in parts] == REAL_COUNTS
    allidx = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(allidx, np.arange(4708))
