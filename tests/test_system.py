"""Scheduling helpers: CPUs for hospital processes, the simulation's client order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medbloom.config import ExperimentConfig
from medbloom.experiment import largest_first, partitions_for
from medbloom.system import pack_onto_cpus, pin_process
from synthetic import write_npz


def test_pack_onto_cpus_balances_the_loads() -> None:
    # the default experiment's client sizes: one client holds almost half the data
    loads = [1970, 656, 13, 492, 56, 136, 95, 86, 303, 428]
    cpus = pack_onto_cpus(loads, [0, 1])
    per_cpu = {c: sum(n for n, k in zip(loads, cpus, strict=True) if k == c) for c in (0, 1)}
    assert cpus[0] == 0  # the largest client first, onto the first CPU
    assert cpus[1] == 1
    # 4235 samples in all: the two CPUs get 2121 and 2114 (in client order, one CPU
    # would get 2265 while the largest client's got 1970)
    assert per_cpu == {0: 2121, 1: 2114}


def test_pack_onto_cpus_one_cpu_each_when_there_are_enough() -> None:
    assert sorted(pack_onto_cpus([5.0, 1.0, 3.0], [2, 4, 6, 8])) == [2, 4, 6]
    assert pack_onto_cpus([1.0, 1.0, 1.0], [7]) == [7, 7, 7]
    assert pack_onto_cpus([], [0, 1]) == []
    with pytest.raises(ValueError, match="no CPUs"):
        pack_onto_cpus([1.0], [])


def test_pack_onto_cpus_longest_first_beats_the_given_order() -> None:
    loads = [1.0, 1.0, 2.0]  # in this order, round robin would put 1+2 on one CPU
    cpus = pack_onto_cpus(loads, [0, 1])
    assert cpus[2] != cpus[0] or cpus[2] != cpus[1]
    assert max(sum(n for n, k in zip(loads, cpus, strict=True) if k == c) for c in (0, 1)) == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pin_process_pins_every_thread_of_a_real_process() -> None:
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\n"
    code += "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        tasks = Path(f"/proc/{proc.pid}/task")
        deadline = time.monotonic() + 20
        while len(list(tasks.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = min(os.sched_getaffinity(0))
        assert pin_process(proc.pid, {cpu})
        for task in tasks.iterdir():
            assert os.sched_getaffinity(int(task.name)) == {cpu}
    finally:
        proc.kill()
        proc.wait()
    assert not pin_process(proc.pid, {0})  # gone: nothing to pin


def test_largest_first_orders_clients_by_training_samples(tmp_path: Path) -> None:
    write_npz(tmp_path, "pneumoniamnist", counts={"train": 200, "val": 20, "test": 20}, seed=3)
    cfg = ExperimentConfig(
        data_dir=str(tmp_path), num_clients=5, alpha=0.3, min_partition_size=5
    ).validate()
    order = largest_first(cfg)
    sizes = [len(p.train) for p in partitions_for(cfg)]
    assert sorted(order) == list(range(5))
    assert [sizes[i] for i in order] == sorted(sizes, reverse=True)
