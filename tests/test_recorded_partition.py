"""Clients on the run's machine use the partition the run recorded, when it still fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from medbloom.config import ExperimentConfig
from medbloom.data import partition as part
from medbloom.experiment import load_run_config, partitions_for, prepare_run
from synthetic import write_npz


def _run(tmp_path: Path, **knobs: object) -> Path:
    root = tmp_path / "data"
    if not root.exists():
        write_npz(root, "bloodmnist", counts={"train": 300, "val": 40, "test": 40}, seed=4)
    cfg = ExperimentConfig(
        data_dir=str(root), dataset="bloodmnist", num_clients=4, partition="dirichlet", alpha=0.5,
        min_partition_size=5, out=str(tmp_path / "run"),
    ).replace(**knobs)  # fmt: skip
    return prepare_run(cfg.validate())


def _computed(cfg: ExperimentConfig) -> list[part.ClientPartition]:
    from medbloom.experiment import _partition_settings, _partitions

    return _partitions(**_partition_settings(cfg))


def _same(a: list[part.ClientPartition], b: list[part.ClientPartition]) -> bool:
    return len(a) == len(b) and all(
        x.client_id == y.client_id
        and np.array_equal(x.train, y.train)
        and np.array_equal(x.val, y.val)
        for x, y in zip(a, b, strict=True)
    )


def test_recorded_partition_is_the_computed_one_and_needs_no_flower_datasets(
    tmp_path: Path,
) -> None:
    run_dir = _run(tmp_path)
    pmap = json.loads((run_dir / "partitions.json").read_text())
    assert pmap["settings"]["num_clients"] == 4 and pmap["settings"]["partition"] == "dirichlet"
    cfg = load_run_config(run_dir)
    assert _same(partitions_for(cfg), _computed(cfg))
    # in a fresh process, as a hospital's: the partition comes without importing
    # Flower Datasets (Hugging Face datasets, seaborn: seconds of CPU)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from medbloom.experiment import client_data, load_run_config\n"
        f"cfg = load_run_config(Path({str(run_dir)!r}))\n"
        "d = client_data(cfg, 1, 4)\n"
        "print(len(d.train), 'flwr_datasets' in sys.modules, 'datasets' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == [str(pmap["clients"][1]["num_train"]), "False", "False"]
    # the settings as typed (the default size as 0, the data root relative to the working
    # directory), as a simulation started in-process hands them to its hospitals: the same
    # partition, read from the record
    typed = ExperimentConfig(
        data_dir="data", dataset="bloodmnist", num_clients=4, partition="dirichlet", alpha=0.5,
        min_partition_size=5, out=str(run_dir),
    )  # fmt: skip
    code = code.replace(
        f"cfg = load_run_config(Path({str(run_dir)!r}))\n",
        "import os\n"
        f"os.chdir({str(tmp_path)!r})\n"
        "from medbloom.config import ExperimentConfig\n"
        f"cfg = ExperimentConfig.from_mapping({typed.to_run_config()!r}, 'test')\n",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == [str(pmap["clients"][1]["num_train"]), "False", "False"]


def test_a_partition_that_no_longer_fits_is_computed_again(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    cfg = load_run_config(run_dir)
    path = run_dir / "partitions.json"
    pmap = json.loads(path.read_text())
    # another seed: the recorded partition is not this experiment's
    assert _same(partitions_for(cfg.replace(seed=7)), _computed(cfg.replace(seed=7)))
    assert not _same(partitions_for(cfg.replace(seed=7)), partitions_for(cfg))
    # indices that no longer hold the recorded labels (the data changed): computed
    a, b = pmap["clients"][0], pmap["clients"][1]
    a["train_indices"], b["train_indices"] = b["train_indices"], a["train_indices"]
    path.write_text(json.dumps(pmap))
    assert _same(partitions_for(cfg), _computed(cfg))
    # a run recorded without settings, or a file cut short: computed
    del pmap["settings"]
    path.write_text(json.dumps(pmap))
    assert _same(partitions_for(cfg), _computed(cfg))
    path.write_text('{"clients": [')
    assert _same(partitions_for(cfg), _computed(cfg))
