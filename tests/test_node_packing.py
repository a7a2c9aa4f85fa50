"""Which CPU each hospital process of `medbloom launch` trains on, from what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medbloom.launch import measured_loads, node_cpus

HEADER = (
    "round,client_id,node_id,status,num_examples,"
    "train_loss,train_accuracy,local_val_accuracy,seconds,error\n"
)


def _clients_csv(run_dir: Path, rows: list[tuple[int, int, str, str]]) -> None:
    lines = [f"{r},{c},{100 + c},{status},10,0.5,0.5,0.5,{secs},\n" for r, c, status, secs in rows]
    (run_dir / "clients.csv").write_text(HEADER + "".join(lines))


def test_measured_loads_are_medians_of_the_rounds_after_pinning(tmp_path: Path) -> None:
    rows = [(1, 0, "ok", "30.0"), (1, 1, "ok", "30.0")]  # before pinning: ignored
    rows += [(2, 0, "ok", "4.0"), (2, 1, "ok", "1.0"), (3, 0, "ok", "6.0"), (3, 1, "ok", "1.2")]
    rows += [(4, 0, "ok", "5.0"), (4, 1, "failed", "nan"), (5, 0, "ok", "9.0")]
    _clients_csv(tmp_path, rows)
    # client 0: last three of 4, 6, 5, 9 -> median 6; client 1: 1.0, 1.2 -> 1.1
    assert measured_loads(tmp_path, 2, after_round=1) == [6.0, 1.1]
    assert measured_loads(tmp_path, 2, after_round=1, last=1) == [9.0, 1.2]


def test_no_measured_loads_until_every_hospital_has_one(tmp_path: Path) -> None:
    assert measured_loads(tmp_path, 2, after_round=0) is None  # no clients.csv yet
    _clients_csv(tmp_path, [(2, 0, "ok", "4.0"), (2, 1, "failed", ""), (1, 1, "ok", "2.0")])
    assert measured_loads(tmp_path, 2, after_round=1) is None
    # a row cut off while it is written is skipped, not an error
    with (tmp_path / "clients.csv").open("a") as fh:
        fh.write("3,1,101,ok,10,0.5")
    assert measured_loads(tmp_path, 2, after_round=1) is None


def test_nodes_are_packed_by_measured_time_not_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Samples say hospital 0 weighs as much as the seven small ones together; the
    # times measured say the small ones cost more (a fixed part per message).
    samples = [2100, 300, 300, 300, 300, 300, 300, 300]
    clients = [{"client_id": i, "num_train": n} for i, n in enumerate(samples)]
    (tmp_path / "partitions.json").write_text(json.dumps({"clients": clients}))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    by_samples = node_cpus(tmp_path, 8)
    assert by_samples == [0] + [1] * 7
    times = [8.4] + [1.6] * 7  # 11.2 s on the small ones' core against 8.4
    by_time = node_cpus(tmp_path, 8, times)
    load = {cpu: sum(t for t, c in zip(times, by_time, strict=True) if c == cpu) for cpu in (0, 1)}
    assert max(load.values()) <= 10.0  # 8.4 + 1.6 and 6 x 1.6: 10.0 and 9.6
