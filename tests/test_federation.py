"""Federations on Flower's own Simulation Engine with synthetic MedMNIST files.

Every strategy and every kind of data set (binary, RGB multi-class, ordinal,
multi-label, 3D) goes through a real run: Ray actors, Flower messages, the
strategy's own aggregation, the server's evaluation and the run directory.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp

from medbloom.config import STRATEGIES, ExperimentConfig
from medbloom.experiment import prepare_run
from medbloom.federation.client_app import make_client_app
from medbloom.federation.simulation import run_simulation
from medbloom.runs import METRICS_COLUMNS
from synthetic import write_npz

pytestmark = pytest.mark.slow

COUNTS = {"train": 90, "val": 24, "test": 24}
TIMING = {"round_seconds", "eval_seconds", "elapsed_seconds"}


def _run(tmp_path: Path, name: str, client_app: ClientApp | None = None, **knobs: object) -> Path:
    dataset = str(knobs.get("dataset", "pneumoniamnist"))
    size = int(knobs.get("size", 28))  # type: ignore[call-overload]
    root = tmp_path / "data"
    if not (root / "medmnist").exists() or not any((root / "medmnist").glob(f"{dataset}*")):
        # 3D convolutions cost ~30x more per sample: fewer volumes, same code paths.
        counts = {k: v // 2 for k, v in COUNTS.items()} if dataset.endswith("3d") else COUNTS
        write_npz(root, dataset, size, counts=counts, seed=1)
    cfg = ExperimentConfig(
        data_dir=str(root),
        num_clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=16,
        min_partition_size=5,
        out=str(tmp_path / name),
    ).replace(**knobs)
    run_dir = prepare_run(cfg.validate())
    rows: list[dict[str, object]] = []
    run_simulation(cfg, run_dir, rows.append, client_app=client_app)
    assert [r["round"] for r in rows] == list(range(cfg.rounds + 1))
    return run_dir


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _check_run(run_dir: Path, rounds: int, clients: int) -> list[dict[str, str]]:
    rows = _metrics(run_dir)
    assert tuple(rows[0].keys()) == METRICS_COLUMNS
    assert [int(r["round"]) for r in rows] == list(range(rounds + 1))
    for r in rows[1:]:
        assert int(r["clients_ok"]) == clients and int(r["clients_failed"]) == 0
        for col in ("accuracy", "balanced_accuracy", "precision", "recall", "f1"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["train_loss"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == rounds
    # 95% bootstrap intervals around the final and best models' test scores
    ci = summary["intervals"]
    assert (ci["level"], ci["resamples"]) == (0.95, 1000)
    for key in ("final", "best"):
        for metric in ("accuracy", "auc", "f1"):
            lo, hi = ci[key][metric]
            point = summary[key][metric]
            if lo is None:  # no AUC (a tiny test split lacks a class): none to bracket
                assert hi is None and point is None, (key, metric, point)
                continue
            assert lo - 1e-9 <= point <= hi + 1e-9, (key, metric, lo, point, hi)
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return rows


def _check_sites(rows: list[dict[str, str]], client_rows: list[dict[str, str]], every: int) -> None:
    """Every hospital sampled in a round of site evaluation (each ``every``-th) scored
    the global model it received on its own validation split; metrics.csv's worst,
    median and spread are those scores'."""
    assert rows[0]["worst_site_accuracy"] == ""  # round 0: nobody has received a model
    for row in rows[1:]:
        rnd = int(row["round"])
        mine = [r for r in client_rows if int(r["round"]) == rnd and r["status"] == "ok"]
        if rnd % every:  # NaN is written as an empty cell
            assert all(r["site_accuracy"] == "" for r in mine) and mine
            assert row["worst_site_accuracy"] == row["site_accuracy_spread"] == ""
            continue
        accs = [float(r["site_accuracy"]) for r in mine]
        assert accs and all(0 <= a <= 1 for a in accs)
        assert all(math.isfinite(float(r["site_loss"])) for r in mine)
        assert float(row["worst_site_accuracy"]) == pytest.approx(min(accs))
        assert float(row["median_site_accuracy"]) == pytest.approx(float(np.median(accs)))
        assert float(row["site_accuracy_spread"]) == pytest.approx(max(accs) - min(accs))


# Each data set kind runs with a different strategy, so that every strategy and every
# task type goes through one real federation without a run for each pair.
CASES = [
    # ("pneumoniamnist", "fedavg", {}) runs twice in test_same_seed_same_numbers
    ("chestmnist", "fedprox", {}),  # multi-label, 14 sigmoid outputs
    ("organmnist3d", "fedadam", {}),  # 3D convolutions
    ("bloodmnist", "fedmedian", {"lr_schedule": "cosine"}),  # RGB, 8 classes
    ("retinamnist", "krum", {}),  # ordinal regression
    ("pneumoniamnist", "fedyogi", {"partition": "iid", "site_eval_every": 2}),
    ("pneumoniamnist", "fedavgm", {"partition": "pathological", "classes_per_client": 1}),
    ("pneumoniamnist", "fedtrimmedavg", {"fraction_train": 0.67}),
    ("dermamnist", "ditto", {}),  # a global model and a personal one at each hospital
]


def test_cases_cover_every_strategy() -> None:
    # local, pooled, fedper, fedbn and fedavg-ft: tests/test_personal.py
    others = {"local", "pooled", "fedper", "fedbn", "fedavg-ft"}
    assert {s for _, s, _ in CASES} | {"fedavg"} | others == set(STRATEGIES)


@pytest.mark.parametrize(
    ("dataset", "strategy", "extra"), CASES, ids=[f"{d}-{s}" for d, s, _ in CASES]
)
def test_federation_runs(
    tmp_path: Path, dataset: str, strategy: str, extra: dict[str, object]
) -> None:
    run_dir = _run(tmp_path, "run", dataset=dataset, strategy=strategy, **extra)
    clients = 2 if extra.get("fraction_train") else 3
    rows = _check_run(run_dir, rounds=2, clients=clients)
    with (run_dir / "clients.csv").open() as fh:
        client_rows = list(csv.DictReader(fh))
    assert len(client_rows) == 2 * clients
    assert all(r["status"] == "ok" and int(r["num_examples"]) > 0 for r in client_rows)
    # each hospital trained with its round's learning rate (cosine: halved in round 2 of 2)
    lr = {"constant": [0.001, 0.001], "cosine": [0.001, 0.0005]}[
        str(extra.get("lr_schedule", "constant"))
    ]
    assert [float(r["lr"]) for r in client_rows] == pytest.approx(
        [lr[int(r["round"]) - 1] for r in client_rows]
    )
    _check_sites(rows, client_rows, every=int(str(extra.get("site_eval_every", 1))))
    # the global model changed: aggregation produced new weights
    assert rows[1]["loss"] != rows[0]["loss"] or rows[2]["loss"] != rows[0]["loss"]


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    """Two runs with the same config and seed record identical metrics, also when the
    simulation serves its clients in another order (the first run largest first, the
    second in Flower's own node order, the largest client last)."""
    a_dir = _run(tmp_path, "a")
    a = _check_run(a_dir, rounds=2, clients=3)  # FedAvg, binary task
    assert a[1]["loss"] != a[0]["loss"] or a[2]["loss"] != a[0]["loss"]
    # each client trained on its own partition: the samples it reported are its own
    parts = json.loads((a_dir / "partitions.json").read_text())["clients"]
    sizes = {str(p["client_id"]): p["num_train"] for p in parts}
    with (a_dir / "clients.csv").open() as fh:
        assert {r["client_id"]: int(r["num_examples"]) for r in csv.DictReader(fh)} == sizes
    assert len(set(sizes.values())) == 3  # distinct sizes: a mix-up would show
    cfg = ExperimentConfig.from_mapping(
        json.loads((a_dir / "config.json").read_text())["config"], "config.json"
    )
    smallest_first = sorted(range(3), key=lambda i: sizes[str(i)])
    b_dir = _run(tmp_path, "b", client_app=make_client_app(cfg, slot_order=smallest_first))
    b = _metrics(b_dir)
    # FedAvg's global arrays are float32 like the model: the checkpoint holds the
    # weights once, as the state dict, with no packed copy beside them
    ckpt = torch.load(b_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["global_arrays"] == {}
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in b]
