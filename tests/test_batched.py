"""Batched training of a round's clients equals training them one after another."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medbloom.batched import train_clients_batched
from medbloom.config import ExperimentConfig
from medbloom.data.medmnist import spec_for
from medbloom.experiment import prepare_run
from medbloom.federation.simulation import run_simulation
from medbloom.metrics import MULTI_LABEL
from medbloom.models import build_model
from medbloom.training import class_weights, labels_tensor, to_tensor, train_local
from synthetic import write_npz

SIZES = (37, 64, 5, 100)  # ragged last batches, a client shorter than one batch
SEEDS = (11, 12, 13, 14)
BATCH = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_clients(
    dtype: torch.dtype, task: str = "binary-class", weighted: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Clients of different sizes and label mixes; class 1 images are brighter."""
    rng = np.random.default_rng(0)
    clients = []
    for c, n in enumerate(SIZES):
        if task == MULTI_LABEL:
            labels = (rng.random((n, 3)) < 0.2 + 0.2 * c / len(SIZES)).astype(np.int64)
            bright = labels[:, 0]
        else:
            labels = (rng.random(n) < 0.15 + 0.2 * c).astype(np.int64)
            labels[:2] = (0, 1)
            bright = labels
        images = rng.integers(0, 156, size=(n, 1, 28, 28)) + 100 * bright[:, None, None, None]
        w = class_weights(labels, 2, "balanced") if weighted else None
        clients.append(
            (
                to_tensor(images.astype(np.uint8)).to(dtype),
                labels_tensor(labels, task),
                None if w is None else w.to(dtype),
            )
        )
    return clients


def cnn(dtype: torch.dtype, outputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    spec = spec_for("pneumoniamnist", 28)
    model = build_model("cnn", spec)
    if outputs != 2:
        model.fc = nn.Linear(model.fc.in_features, outputs)
    return model.to(dtype)


def sequential(model: nn.Module, clients, **kw):  # type: ignore[no-untyped-def]
    out = []
    for (x, y, w), seed in zip(clients, SEEDS, strict=True):
        m = copy.deepcopy(model)
        res = train_local(m, x, y, weights=w, seed=seed, batch_size=BATCH, **kw)
        out.append((m.state_dict(), res))
    return out


def assert_same(batched, seq, atol: float, loss_tol: float) -> None:  # type: ignore[no-untyped-def]
    assert len(batched) == len(seq)
    for (sd_b, res_b), (sd_s, res_s) in zip(batched, seq, strict=True):
        assert sd_b.keys() == sd_s.keys()
        for k in sd_s:
            torch.testing.assert_close(sd_b[k], sd_s[k], atol=atol, rtol=0, msg=k)
        assert res_b.num_examples == res_s.num_examples
        assert res_b.steps == res_s.steps
        assert res_b.train_loss == pytest.approx(res_s.train_loss, abs=loss_tol)
        assert res_b.train_accuracy == pytest.approx(res_s.train_accuracy, abs=1e-6)


# Every pair of options (optimizer, FedProx term, class weights) in four runs.
@pytest.mark.parametrize(
    ("optimizer", "proximal_mu", "weighted"),
    [("adam", 0.0, True), ("sgd", 0.1, True), ("adam", 0.1, False), ("sgd", 0.0, False)],
)
def test_equals_sequential_in_float64(optimizer: str, proximal_mu: float, weighted: bool) -> None:
    """In double precision the two agree to rounding: same batches, same loss
    reduction over padded batches, same optimizer arithmetic, finished clients frozen."""
    clients = make_clients(torch.float64, weighted=weighted)
    model = cnn(torch.float64)
    kw = {
        "task": "binary-class",
        "epochs": 2,
        "optimizer": optimizer,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "proximal_mu": proximal_mu,
    }
    before = copy.deepcopy(model.state_dict())
    batched = train_clients_batched(model, clients, batch_size=BATCH, seeds=SEEDS, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the input model changed"
    assert_same(batched, sequential(model, clients, **kw), atol=1e-9, loss_tol=1e-9)


def test_multi_label_equals_sequential_in_float64() -> None:
    clients = make_clients(torch.float64, task=MULTI_LABEL)
    clients = [(x, y.double(), w) for x, y, w in clients]
    model = cnn(torch.float64, outputs=3)
    kw = {"task": MULTI_LABEL, "epochs": 1, "lr": 1e-3}
    batched = train_clients_batched(model, clients, batch_size=BATCH, seeds=SEEDS, **kw)
    assert_same(batched, sequential(model, clients, **kw), atol=1e-9, loss_tol=1e-9)


def test_sgd_equals_sequential_in_float32() -> None:
    """In single precision (how medbloom trains) SGD's weights agree to float tolerance."""
    clients = make_clients(torch.float32)
    model = cnn(torch.float32)
    kw = {"task": "binary-class", "epochs": 2, "optimizer": "sgd", "lr": 1e-3}
    batched = train_clients_batched(model, clients, batch_size=BATCH, seeds=SEEDS, **kw)
    assert_same(batched, sequential(model, clients, **kw), atol=1e-5, loss_tol=1e-5)


def test_adam_equals_sequential_in_float32() -> None:
    """Adam in single precision: the updates agree to well under 1%.

    Adam divides each gradient element by its own magnitude, so a last-bit difference
    in an element near zero (the batched convolution sums in another order) becomes
    a difference of up to ``lr`` in that weight: elementwise, float32 sequential
    training is as far from the float64 result as batched training is (the float64
    test above shows the two computations are the same)."""
    clients = make_clients(torch.float32)
    model = cnn(torch.float32)
    start = model.state_dict()
    kw = {"task": "binary-class", "epochs": 2, "optimizer": "adam", "lr": 1e-3}
    batched = train_clients_batched(model, clients, batch_size=BATCH, seeds=SEEDS, **kw)
    seq = sequential(model, clients, **kw)
    for (sd_b, res_b), (sd_s, res_s) in zip(batched, seq, strict=True):
        diff = torch.cat([(sd_b[k] - sd_s[k]).flatten() for k in sd_s]).norm()
        update = torch.cat([(sd_s[k] - start[k]).flatten() for k in sd_s]).norm()
        assert float(diff / update) < 0.02
        assert res_b.train_loss == pytest.approx(res_s.train_loss, abs=1e-3)
        assert res_b.steps == res_s.steps


def test_training_moves_every_client_and_order_is_kept() -> None:
    clients = make_clients(torch.float32)
    model = cnn(torch.float32)
    out = train_clients_batched(
        model, clients, task="binary-class", epochs=1, batch_size=BATCH, seeds=SEEDS
    )
    start = model.state_dict()["fc.weight"]
    assert [r.num_examples for _, r in out] == list(SIZES)
    assert [r.steps for _, r in out] == [-(-n // BATCH) for n in SIZES]
    for sd, _ in out:
        assert not torch.equal(sd["fc.weight"], start)


def test_unsupported_options_raise() -> None:
    clients = make_clients(torch.float32)
    kw = {"task": "binary-class", "epochs": 1, "batch_size": BATCH, "seeds": SEEDS}
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        train_clients_batched(bn, clients, **kw)
    drop = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(28 * 28, 2))
    with pytest.raises(NotImplementedError, match="Dropout"):
        train_clients_batched(drop, clients, **kw)
    with pytest.raises(NotImplementedError, match="augmentation"):
        train_clients_batched(cnn(torch.float32), clients, augment=lambda x: x, **kw)
    with pytest.raises(ValueError, match="seeds"):
        train_clients_batched(cnn(torch.float32), clients, **{**kw, "seeds": SEEDS[:2]})


@pytest.mark.slow
def test_batched_run_equals_sequential_run(tmp_path: Path) -> None:
    """``--batched on`` end to end on Flower's Simulation Engine: the same clients,
    example counts and, up to float32 rounding, the same global model and metrics as
    the same run with every client trained on its own."""
    write_npz(tmp_path / "data", "pneumoniamnist", 28, counts={"train": 90, "val": 24, "test": 24})
    runs = {}
    for mode in ("off", "on"):
        cfg = ExperimentConfig(
            data_dir=str(tmp_path / "data"),
            num_clients=3,
            rounds=1,
            batch_size=16,
            optimizer="sgd",
            lr=0.05,
            min_partition_size=5,
            batched=mode,
            out=str(tmp_path / mode),
        )
        run_dir = prepare_run(cfg.validate())
        run_simulation(cfg, run_dir)
        with (run_dir / "clients.csv").open() as fh:
            clients = list(csv.DictReader(fh))
        with (run_dir / "metrics.csv").open() as fh:
            metrics = list(csv.DictReader(fh))
        model = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]
        runs[mode] = (clients, metrics, model)
    (c_off, m_off, w_off), (c_on, m_on, w_on) = runs["off"], runs["on"]
    assert [(r["round"], r["client_id"], r["num_examples"]) for r in c_on] == [
        (r["round"], r["client_id"], r["num_examples"]) for r in c_off
    ]
    assert all(r["status"] == "ok" for r in c_on)
    # each hospital scored the global model it received, the same way in both modes
    for a, b in zip(c_on, c_off, strict=True):
        for col in ("site_accuracy", "site_loss"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4, abs=1e-5), col
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-4, rtol=1e-4, msg=k)
    for a, b in zip(m_on, m_off, strict=True):
        for col in ("loss", "train_loss", "val_loss", "worst_site_accuracy"):
            if a[col]:
                assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4, abs=1e-5), col
