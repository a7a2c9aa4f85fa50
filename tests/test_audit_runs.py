"""The audit inside runs: the clean test split's scores, leakage.json, --audit off and
--dedup, on Flower's Simulation Engine with synthetic MedMNIST files that hold planted
twins."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medbloom.config import ExperimentConfig
from medbloom.data.registry import spec_of
from medbloom.data.types import ImageSet
from medbloom.experiment import TensorSplit, initial_model, prepare_run
from medbloom.federation.simulation import run_simulation
from medbloom.metrics import evaluate_scores
from medbloom.training import load_arrays, predict
from synthetic import make_arrays, write_npz

pytestmark = pytest.mark.slow

COUNTS = {"train": 80, "val": 20, "test": 30}
# test index -> training index it copies (exact, or brightened by a few levels)
EXACT = {2: 5, 9: 40}
NEAR = {4: 11, 17: 63}
# training images that copy other training images (for --dedup)
TRAIN_COPIES = {70: 3, 71: 3, 72: 20}


def _planted(root: Path) -> None:
    arrays = make_arrays("pneumoniamnist", 28, counts=COUNTS, seed=3)
    train, test = arrays["train_images"], arrays["test_images"]
    for t, s in EXACT.items():
        test[t] = train[s]
        arrays["test_labels"][t] = arrays["train_labels"][s]
    for t, s in NEAR.items():
        test[t] = np.clip(train[s].astype(np.int16) + 6, 0, 255).astype(np.uint8)
        arrays["test_labels"][t] = arrays["train_labels"][s]
    for c, s in TRAIN_COPIES.items():
        train[c] = train[s]
        arrays["train_labels"][c] = arrays["train_labels"][s]
    write_npz(root, "pneumoniamnist", arrays=arrays)


def _run(tmp_path: Path, name: str, **knobs: object) -> Path:
    root = tmp_path / "data"
    if not root.exists():
        _planted(root)
    cfg = ExperimentConfig(
        data_dir=str(root),
        num_clients=2,
        rounds=1,
        batch_size=16,
        min_partition_size=5,
        out=str(tmp_path / name),
    ).replace(**knobs)
    run_dir = prepare_run(cfg.validate())
    run_simulation(cfg, run_dir, lambda row: None)
    return run_dir


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for this module's runs, so that the run with the defaults serves
    every test that reads it (each run is a few seconds of Ray)."""
    return tmp_path_factory.mktemp("audit-runs")


def _default_run(root: Path) -> Path:
    return root / "on" if (root / "on" / "summary.json").exists() else _run(root, "on")


def test_clean_split_is_the_test_split_minus_the_planted_twins(runs: Path) -> None:
    tmp_path = runs
    run_dir = _default_run(runs)
    leak = json.loads((run_dir / "leakage.json").read_text())
    left_out = {e["test_index"]: e for e in leak["left_out"]}
    assert set(left_out) == set(EXACT) | set(NEAR)
    for t, s in {**EXACT, **NEAR}.items():
        assert (left_out[t]["twin_split"], left_out[t]["twin_index"]) == ("train", s)
        assert left_out[t]["exact"] == (t in EXACT)
    summary = json.loads((run_dir / "summary.json").read_text())
    clean = summary["clean_test"]
    assert (clean["test_images"], clean["clean_images"], clean["left_out"]) == (30, 26, 4)
    assert (clean["left_out_exact"], clean["left_out_near"]) == (2, 2)
    # the clean scores are the final model's on exactly the other 26 test images
    cfg = ExperimentConfig.from_mapping(json.loads((run_dir / "config.json").read_text())["config"])
    with np.load(tmp_path / "data" / "medmnist" / "pneumoniamnist.npz") as npz:
        images, labels = npz["test_images"][:, None], npz["test_labels"].reshape(-1)
    test = ImageSet(images, labels.astype(np.int64), "binary-class", ("normal", "pneumonia"))
    keep = np.setdiff1d(np.arange(30), list(left_out))
    model = initial_model(cfg, spec_of(cfg.dataset, cfg.size))
    load_arrays(
        model, torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]
    )
    split = TensorSplit.of(test.subset(keep))
    probs, _ = predict(model, split.x, split.y, "binary-class", device=torch.device("cpu"))
    expected = evaluate_scores(split.labels, probs, "binary-class")
    last = _rows(run_dir)[-1]
    for metric in ("accuracy", "auc", "balanced_accuracy", "f1"):
        assert float(last[f"clean_{metric}"]) == pytest.approx(expected[metric], abs=1e-9)
    ci = summary["intervals"]["clean"]["final"]
    assert ci["accuracy"][0] <= float(last["clean_accuracy"]) <= ci["accuracy"][1]
    per_class = json.loads((run_dir / "per_class.jsonl").read_text().splitlines()[-1])
    assert sum(per_class["clean"]["support"]) == 26


def test_audit_off_leaves_training_and_official_scores_unchanged(runs: Path) -> None:
    on, off = _default_run(runs), _run(runs, "off", audit="off")
    a, b = _rows(on), _rows(off)
    timing = {"round_seconds", "eval_seconds", "elapsed_seconds"}
    clean = {k for k in a[0] if k.startswith("clean_")}
    assert clean
    assert [{k: v for k, v in r.items() if k not in timing | clean} for r in a] == [
        {k: v for k, v in r.items() if k not in timing | clean} for r in b
    ]
    assert all(r[k] == "" for r in b for k in clean)
    assert all(r[k] != "" for r in a for k in clean)
    assert not (off / "leakage.json").exists()
    assert json.loads((off / "summary.json").read_text())["clean_test"] is None
    # MedMNIST trains on every image by default: the partitions are the same
    parts = [json.loads((d / "partitions.json").read_text())["clients"] for d in (on, off)]
    assert parts[0] == parts[1]
    assert sum(p["num_train"] + p["num_val"] for p in parts[0]) == COUNTS["train"]


def test_dedup_near_drops_the_training_copies_before_partitioning(runs: Path) -> None:
    run_dir = _run(runs, "dedup", dedup="near")
    leak = json.loads((run_dir / "leakage.json").read_text())
    assert leak["dedup"] == {
        "mode": "near",
        "training_images": 80,
        "kept": 80 - len(TRAIN_COPIES),
        "removed": len(TRAIN_COPIES),
    }
    clients = json.loads((run_dir / "partitions.json").read_text())["clients"]
    assert sum(p["num_train"] + p["num_val"] for p in clients) == 80 - len(TRAIN_COPIES)
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["dedup"] == "near"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dup-threshold", "99"], "--dup-threshold 99 is out of range"),
        (["--dedup", "all"], "--dedup 'all' is unknown"),
        (["--audit", "maybe"], "--audit 'maybe' is unknown"),
    ],
)
def test_bad_audit_flags_fail_in_one_line_before_anything_is_written(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "medbloom", "run", *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
