"""Which CPU each hospital process of `medbloom launch` trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medbloom.launch import node_cpus


def test_nodes_are_packed_by_training_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [2100, 300, 300, 300, 300, 300, 300, 300, 900]
    clients = [{"client_id": i, "num_train": n} for i, n in enumerate(samples)]
    (tmp_path / "partitions.json").write_text(json.dumps({"clients": clients}))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cpus = node_cpus(tmp_path, 9)
    load = {cpu: sum(n for n, c in zip(samples, cpus, strict=True) if c == cpu) for cpu in (0, 1)}
    assert cpus[0] != cpus[8]  # the two largest apart
    assert sorted(load.values()) == [2400, 2700]  # the most even split there is


def test_nodes_share_cpus_evenly_without_a_partition_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {2, 5}, raising=False)
    cpus = node_cpus(tmp_path, 5)  # no partitions.json: every hospital weighs the same
    assert sorted(cpus) == [2, 2, 2, 5, 5]
