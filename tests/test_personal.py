"""Personalised federated learning and its baselines (#31): what stays at a hospital,
what the server may see, and how each hospital's own model is scored.

The hospital-level tests drive :class:`Hospital` with real Flower messages and
synthetic MedMNIST files, without an engine; the run tests go through Flower's own
Simulation Engine, and one through ``medbloom launch`` with real processes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from conftest import Cli, stop_after_round
from medbloom.config import ExperimentConfig
from medbloom.data.registry import spec_of
from medbloom.experiment import initial_model, prepare_run
from medbloom.federation.client_app import PERSONAL_SEED_OFFSET, Hospital
from medbloom.federation.server_app import _private_check, personal_spread
from medbloom.federation.wire import Layout
from medbloom.personal import MIN_SITE_IMAGES, PersonalStore, private_keys
from medbloom.training import client_seed, load_arrays, predict, state_arrays
from synthetic import write_npz


def _data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    if not root.exists():
        write_npz(root, "pneumoniamnist", counts={"train": 90, "val": 24, "test": 24}, seed=1)
    return root


def _config(tmp_path: Path, **knobs: Any) -> ExperimentConfig:
    return (
        ExperimentConfig(
            data_dir=str(_data(tmp_path)),
            num_clients=2,
            rounds=2,
            batch_size=16,
            min_partition_size=5,
            partition="iid",
            local_val_fraction=0.3,
            out=str(tmp_path / "run"),
        )
        .replace(**knobs)
        .validate()
    )


def _hospital(tmp_path: Path, cfg: ExperimentConfig, pid: int = 0) -> Hospital:
    node = {"partition-id": pid, "num-partitions": cfg.num_clients, "state-dir": str(tmp_path)}
    return Hospital(cfg, node, simulated=True)


def _message(layout: Layout, state: dict[str, torch.Tensor], server_round: int) -> Message:
    """A TRAIN message as a hospital receives it from the server."""
    meta = Metadata(
        run_id=1, message_id=f"m{server_round}", src_node_id=1, dst_node_id=2,
        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=60.0,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    config = ConfigRecord({"server-round": server_round, "site-eval": True})
    return Message(
        metadata=meta, content=RecordDict({"arrays": layout.pack(state), "config": config})
    )


def _reply_state(layout: Layout, reply: Message) -> OrderedDict[str, torch.Tensor]:
    return layout.unpack(reply.content.array_records["arrays"])


def _global(cfg: ExperimentConfig, seed: int) -> tuple[Layout, OrderedDict[str, torch.Tensor]]:
    """A global model as the server would send it: a fresh one from ``seed``."""
    model = initial_model(cfg.replace(seed=seed), spec_of(cfg.dataset, 28))
    state = OrderedDict((k, v.clone()) for k, v in state_arrays(model).items())
    return Layout.of(state), state


def _train_as_hospital(
    hospital: Hospital, start: dict[str, torch.Tensor], server_round: int
) -> OrderedDict[str, torch.Tensor]:
    """What the hospital's own training makes of ``start`` in ``server_round``."""
    cfg = hospital.cfg
    model = initial_model(cfg, hospital.data.spec)
    load_arrays(model, start)
    seed = client_seed(cfg.seed, server_round, hospital.pid)
    hospital._fit(model, server_round, seed, torch.device("cpu"), None, {})
    return state_arrays(model)


def test_fedper_keeps_the_head_its_own_training_produced_and_never_sends_it(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, strategy="fedper")
    hospital = _hospital(tmp_path, cfg)
    layout, g1 = _global(cfg, seed=1)
    head = private_keys("fedper", initial_model(cfg, hospital.data.spec), list(g1))
    assert head == ["fc.weight", "fc.bias"]

    reply = hospital.train(_message(layout, g1, 1))
    sent = _reply_state(layout, reply)
    expected = _train_as_hospital(hospital, g1, 1)
    stored = hospital.personal_store().before(2)
    assert stored is not None and set(stored) == set(head)
    for k in head:
        assert torch.equal(stored[k], expected[k])  # the hospital's own training
        assert torch.equal(sent[k], g1[k])  # the reply carries the global head back
        assert not torch.equal(stored[k], g1[k])
    body = [k for k in g1 if k not in head]
    assert all(torch.equal(sent[k], expected[k]) for k in body)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["val-size"] == len(hospital.data.val)
    assert 0 <= float(metrics["personal_accuracy"]) <= 1  # type: ignore[arg-type]

    # round 2: another global model; training starts from the global body and the
    # hospital's own head of round 1, not from the head the server sent
    _, g2 = _global(cfg, seed=2)
    reply = hospital.train(_message(layout, g2, 2))
    start = {**g2, **stored}
    expected = _train_as_hospital(hospital, start, 2)
    stored2 = hospital.personal_store().before(3)
    assert stored2 is not None
    assert all(torch.equal(stored2[k], expected[k]) for k in head)
    from_server_head = _train_as_hospital(hospital, g2, 2)
    assert not torch.equal(stored2["fc.weight"], from_server_head["fc.weight"])
    assert all(torch.equal(_reply_state(layout, reply)[k], g2[k]) for k in head)


def _prob_gap(cfg: ExperimentConfig, tmp_path: Path, lam: float) -> float:
    """Largest gap between the probabilities of a Ditto hospital's personal model after
    round 2 and those of the global model it received in round 2, on its validation
    images. Round 1's global model is another one, so the personal model starts far
    from round 2's."""
    cfg = cfg.replace(ditto_lambda=lam)
    hospital = _hospital(tmp_path / f"lambda-{lam:g}", cfg)
    layout, g1 = _global(cfg, seed=1)
    _, g2 = _global(cfg, seed=2)
    hospital.train(_message(layout, g1, 1))
    hospital.train(_message(layout, g2, 2))
    personal = initial_model(cfg, hospital.data.spec)
    stored = hospital.personal_store().before(3)
    assert stored is not None and set(stored) == set(g1)  # a whole model
    load_arrays(personal, stored)
    received = initial_model(cfg, hospital.data.spec)
    load_arrays(received, g2)
    val = hospital.data.val
    mine, _ = predict(personal, val.x, None, hospital.data.spec.task)
    theirs, _ = predict(received, val.x, None, hospital.data.spec.task)
    return float(np.abs(mine - theirs).max())


def test_ditto_with_a_very_large_lambda_predicts_as_the_global_model(tmp_path: Path) -> None:
    # SGD with lr * lambda = 0.1: the pull is stable and, over ~200 steps, wins
    cfg = _config(tmp_path, strategy="ditto", optimizer="sgd", lr=0.0001, local_epochs=60)
    pulled = _prob_gap(cfg, tmp_path, 1000.0)
    free = _prob_gap(cfg, tmp_path, 0.0)
    assert pulled < 0.05, (pulled, free)
    assert free > 5 * pulled, (free, pulled)


def test_fedavg_ft_scores_a_fine_tuned_copy_and_sends_plain_fedavg_training(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, strategy="fedavg-ft", finetune_epochs=3)
    hospital = _hospital(tmp_path, cfg)
    layout, g1 = _global(cfg, seed=1)
    reply = hospital.train(_message(layout, g1, 1))
    sent = _reply_state(layout, reply)
    expected = _train_as_hospital(hospital, g1, 1)  # what FedAvg's hospital sends
    assert all(torch.equal(sent[k], expected[k]) for k in g1)
    assert not list(tmp_path.glob("personal-*"))  # nothing kept between rounds
    # its own model: the received global model fine-tuned for 3 epochs, then scored
    tuned = initial_model(cfg, hospital.data.spec)
    load_arrays(tuned, g1)
    seed = (client_seed(cfg.seed, 1, 0) + PERSONAL_SEED_OFFSET) % 2**63
    hospital._fit(tuned, 1, seed, torch.device("cpu"), None, {}, epochs=3)
    val = hospital.data.val
    _, loss = predict(tuned, val.x, val.y, hospital.data.spec.task)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["personal_loss"] == pytest.approx(loss)
    assert metrics["personal_loss"] != pytest.approx(metrics["site_loss"])


def test_under_logit_adjustment_a_personal_model_predicts_with_its_hospitals_prior(
    tmp_path: Path,
) -> None:
    # FedAvg+FT's fine-tuned copy is the hospital's own model: trained with the
    # logit-adjusted loss, it is scored with the hospital's log class frequencies added
    # back to its logits; the global model it was tuned from is scored without them
    cfg = _config(
        tmp_path, strategy="fedavg-ft", class_weighting="logit-adjust", partition="dirichlet",
        alpha=0.3,
    )  # fmt: skip
    hospital = _hospital(tmp_path, cfg)
    prior = hospital.data.log_prior
    assert prior is not None and hospital.data.weights is None
    assert float(prior.max() - prior.min()) > 0.1  # a hospital with a skewed class mix
    layout, g1 = _global(cfg, seed=1)
    reply = hospital.train(_message(layout, g1, 1))
    metrics = reply.content.metric_records["metrics"]
    tuned = initial_model(cfg, hospital.data.spec)
    load_arrays(tuned, g1)
    seed = (client_seed(cfg.seed, 1, 0) + PERSONAL_SEED_OFFSET) % 2**63
    hospital._fit(tuned, 1, seed, torch.device("cpu"), None, {}, epochs=cfg.finetune_epochs)
    val = hospital.data.val
    probs, plain_loss = predict(tuned, val.x, val.y, hospital.data.spec.task)
    adjusted = probs * prior.exp().numpy()
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    truth = val.labels.reshape(-1).astype(int)
    loss = -np.log(adjusted[np.arange(len(truth)), truth]).mean()
    assert metrics["personal_loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics["personal_loss"] != pytest.approx(plain_loss, rel=1e-3)
    accuracy = (adjusted.argmax(1) == truth).mean()
    assert metrics["personal_accuracy"] == pytest.approx(accuracy)
    # the global model received: scored as the server scores it, without a prior
    received = initial_model(cfg, hospital.data.spec)
    load_arrays(received, g1)
    assert metrics["site_loss"] == pytest.approx(
        predict(received, val.x, val.y, hospital.data.spec.task)[1], rel=1e-5
    )


def test_fedbn_keeps_batch_norm_at_the_hospital(tmp_path: Path) -> None:
    cfg = _config(tmp_path, strategy="fedbn", model="resnet18")
    hospital = _hospital(tmp_path, cfg)
    layout, g1 = _global(cfg, seed=1)
    norms = private_keys("fedbn", initial_model(cfg, hospital.data.spec), list(g1))
    assert any(k.endswith("running_mean") for k in norms)
    assert all(".bn" in k or "downsample.1" in k or k.startswith("bn1") for k in norms), norms
    reply = hospital.train(_message(layout, g1, 1))
    sent = _reply_state(layout, reply)
    stored = hospital.personal_store().before(2)
    assert stored is not None and set(stored) == set(norms)
    for k in norms:
        assert torch.equal(sent[k], g1[k])  # the server gets its own values back
    # the local statistics moved with the local images; the convolutions were sent
    assert not torch.equal(stored["bn1.running_mean"], g1["bn1.running_mean"])
    assert not torch.equal(sent["conv1.weight"], g1["conv1.weight"])


def test_the_server_rejects_a_reply_that_carries_private_parameters(tmp_path: Path) -> None:
    cfg = _config(tmp_path, strategy="fedper")
    layout, g1 = _global(cfg, seed=1)
    check = _private_check(layout, layout.pack(g1), ["fc.weight", "fc.bias"])

    def reply_with(state: dict[str, torch.Tensor]) -> Message:
        content = RecordDict({"arrays": layout.pack(state), "metrics": MetricRecord({})})
        return Message(metadata=_message(layout, g1, 1).metadata, content=content)

    trained = OrderedDict((k, v + 0.01) for k, v in g1.items())
    assert (
        check(reply_with({**trained, "fc.weight": g1["fc.weight"], "fc.bias": g1["fc.bias"]}))
        is None
    )
    problem = check(reply_with({**trained, "fc.bias": g1["fc.bias"]}))
    assert problem is not None and "fc.weight" in problem


def test_site_summary_weighs_by_split_size_and_marks_small_splits() -> None:
    def row(acc: float, n: int, bal: float | None = None) -> dict[str, Any]:
        return {"status": "ok", "personal_accuracy": acc, "val_size": n,
                "personal_balanced_accuracy": acc if bal is None else bal}  # fmt: skip

    out = personal_spread(
        [row(0.9, 100), row(0.6, 50, 0.5), row(0.0, MIN_SITE_IMAGES - 1), {"status": "failed"}]
    )
    assert out["personal_mean_accuracy"] == pytest.approx((0.9 * 100 + 0.6 * 50) / 150)
    assert out["personal_worst_accuracy"] == 0.6  # the tiny split is not the worst site
    assert out["personal_worst_balanced_accuracy"] == 0.5
    assert out["small_sites"] == 1
    assert math.isnan(personal_spread([])["personal_mean_accuracy"])


def test_a_personal_model_file_of_another_run_is_not_mixed_in(tmp_path: Path) -> None:
    path = tmp_path / "personal-client_0.pt"
    PersonalStore(path, "run-a").save(1, {"w": torch.ones(2)})
    assert PersonalStore(path, "run-a").before(2) is not None
    assert PersonalStore(path, "run-b").before(2) is None
    path.write_bytes(b"garbage")
    with pytest.raises(Exception, match="cannot be used"):
        PersonalStore(path, "run-a")


# --------------------------------------------------------------------------- runs
def _rows(run_dir: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with (run_dir / name).open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_local_only_never_aggregates_and_scores_each_hospitals_own_model(
    tmp_path: Path,
) -> None:
    from medbloom.federation.simulation import run_simulation

    # validation splits of 22 images: above MIN_SITE_IMAGES, so every site counts
    cfg = _config(tmp_path, strategy="local", local_val_fraction=0.5)
    run_dir = prepare_run(cfg)
    run_simulation(cfg, run_dir)
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    initial = state_arrays(initial_model(cfg, spec_of(cfg.dataset, 28)))
    assert all(torch.equal(latest["model"][k], v) for k, v in initial.items())
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # no global model to pick
    rows = _rows(run_dir)
    assert all(r["accuracy"] == "" for r in rows)  # no global model: no test score
    clients = _rows(run_dir, "clients.csv")
    assert len(clients) == 4 and all(r["status"] == "ok" for r in clients)
    assert all(0 <= float(r["personal_accuracy"]) <= 1 for r in clients)
    assert all(r["site_accuracy"] == "" for r in clients)  # no global model to score
    last = [r for r in clients if r["round"] == "2"]
    weights = [int(r["val_size"]) for r in last]
    mean = sum(float(r["personal_accuracy"]) * n for r, n in zip(last, weights, strict=True))
    assert min(weights) >= MIN_SITE_IMAGES and rows[-1]["small_sites"] == "0"
    assert float(rows[-1]["personal_mean_accuracy"]) == pytest.approx(mean / sum(weights))
    own = [
        torch.load(p, weights_only=True)["entries"][2]["fc.weight"]
        for p in sorted((run_dir / "hospitals").glob("personal-client_*.pt"))
    ]
    assert len(own) == 2 and not torch.equal(own[0], own[1])
    assert not torch.equal(own[0], initial["fc.weight"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and "intervals" not in summary


@pytest.mark.slow
def test_pooled_trains_one_model_on_every_hospitals_images(tmp_path: Path) -> None:
    from medbloom.federation.simulation import run_simulation

    cfg = _config(tmp_path, strategy="pooled", rounds=1)
    run_dir = prepare_run(cfg)
    run_simulation(cfg, run_dir)
    clients = _rows(run_dir, "clients.csv")
    parts = json.loads((run_dir / "partitions.json").read_text())["clients"]
    assert [int(r["num_examples"]) for r in clients] == [int(p["num_train"]) for p in parts]
    assert all(r["site_accuracy"] == r["personal_accuracy"] != "" for r in clients)
    row = _rows(run_dir)[-1]
    assert row["clients_ok"] == "2" and row["clients_failed"] == "0"
    assert 0 <= float(row["accuracy"]) <= 1


@pytest.mark.slow
def test_a_resumed_personalised_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """FedPer, 3 rounds, stopped after round 2 and resumed. Before the resume a
    hospital's file also holds a round-3 head, as if the run died after the hospital
    saved it but before the server recorded the round: round 3 must start again from
    round 2's head."""
    from medbloom.federation.simulation import run_simulation

    whole = _config(tmp_path, strategy="fedper", rounds=3, out=str(tmp_path / "whole"))
    run_simulation(whole, prepare_run(whole))

    cfg = whole.replace(out=str(tmp_path / "resumed"))
    run_dir = prepare_run(cfg)
    stop_after_round(cfg, run_dir, 2)
    (file,) = (run_dir / "hospitals").glob("personal-client_0-*.pt")
    data = torch.load(file, weights_only=True)
    data["entries"][3] = {k: torch.zeros_like(v) for k, v in data["entries"][2].items()}
    torch.save(data, file)
    run_simulation(cfg, run_dir, resume=True)

    keys = ("round", "client_id", "personal_accuracy", "personal_loss", "site_accuracy")

    def view(path: Path) -> list[tuple[str, ...]]:
        return [tuple(r[k] for k in keys) for r in _rows(path, "clients.csv")]

    assert view(run_dir) == view(tmp_path / "whole")
    for client in (0, 1):
        name = f"personal-client_{client}-*.pt"
        (mine,) = (run_dir / "hospitals").glob(name)
        (theirs,) = (tmp_path / "whole" / "hospitals").glob(name)
        a = torch.load(mine, weights_only=True)["entries"]
        b = torch.load(theirs, weights_only=True)["entries"]
        assert sorted(a) == sorted(b) == [2, 3]
        assert all(torch.equal(a[3][k], b[3][k]) for k in b[3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "fedbn"], "has none: use --model resnet18"),
        (["--strategy", "ditto", "--ditto-lambda", "-1"], "--ditto-lambda -1.0 is out of range"),
        (["--strategy", "fedavg-ft", "--finetune-epochs", "0"], "--finetune-epochs 0"),
        (["--strategy", "fedper", "--privacy", "sample"], "cannot be combined with --privacy"),
        (["--strategy", "fedper", "--model", "scatternet"], "that is --strategy local"),
        (["--strategy", "local", "--site-eval-every", "0"], "with --site-eval-every 0"),
        (["--strategy", "pooled", "--fraction-train", "0.5"], "with --fraction-train below 1"),
    ],
)
def test_bad_personalisation_settings_are_one_line_errors(
    run_cli: Cli, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "run", "--data-dir", str(_data(tmp_path)), "--out", str(out), *args, cwd=tmp_path
    )
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_pooled_is_refused_in_a_deployment(run_cli: Cli, tmp_path: Path) -> None:
    result = run_cli(
        "launch", "--data-dir", str(_data(tmp_path)), "--strategy", "pooled", cwd=tmp_path
    )
    assert result.returncode == 2 and "not a deployment" in result.stderr, result


@pytest.mark.slow
def test_in_a_deployment_no_reply_carries_a_hospitals_own_head(tmp_path: Path) -> None:
    """``medbloom launch`` (a real SuperLink and a process per hospital), FedPer: every
    reply the server received held exactly the head it had sent (the server compares
    each one and would reject it otherwise), so the global head never moved, while each
    hospital's own head, in its own file, did."""
    from medbloom.experiment import load_run_config
    from test_launch import _assert_nothing_left, _launch

    out = tmp_path / "run"
    proc = _launch(
        tmp_path, out, "--num-clients", "2", "--rounds", "2", "--strategy", "fedper",
        "--local-val-fraction", "0.3",
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "hospitals, each on its own validation split" in stdout
    clients = _rows(out, "clients.csv")
    assert len(clients) == 4 and all(r["status"] == "ok" for r in clients), clients
    assert all(0 <= float(r["personal_accuracy"]) <= 1 for r in clients)
    cfg = load_run_config(out)
    initial = state_arrays(initial_model(cfg, spec_of(cfg.dataset, cfg.size)))
    latest = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]
    for k in ("fc.weight", "fc.bias"):
        assert torch.allclose(latest[k], initial[k], atol=1e-6)
    assert not torch.allclose(latest["features.0.weight"], initial["features.0.weight"], atol=1e-4)
    heads = [
        torch.load(next((out / "hospitals").glob(f"personal-client_{i}-*.pt")), weights_only=True)[
            "entries"
        ][2]
        for i in range(2)
    ]
    assert all(set(h) == {"fc.weight", "fc.bias"} for h in heads)
    assert not torch.allclose(heads[0]["fc.weight"], initial["fc.weight"], atol=1e-4)
    assert not torch.equal(heads[0]["fc.weight"], heads[1]["fc.weight"])
    _assert_nothing_left(tmp_path)
