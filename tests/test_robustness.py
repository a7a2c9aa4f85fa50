"""A federation that meets trouble: bad updates, failing clients, a run stopped and resumed.

Real Flower simulations; the misbehaving hospitals are real ClientApps that wrap
medbloom's own and spoil what it sends.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from conftest import stop_after_round
from medbloom.config import ExperimentConfig
from medbloom.experiment import prepare_run
from medbloom.federation.client_app import train_on_message
from medbloom.federation.simulation import run_simulation
from synthetic import write_npz

pytestmark = pytest.mark.slow

TIMING = {"round_seconds", "eval_seconds", "elapsed_seconds"}


def _config(tmp_path: Path, name: str, **knobs: Any) -> ExperimentConfig:
    root = tmp_path / "data"
    if not root.exists():
        write_npz(root, "pneumoniamnist", counts={"train": 120, "val": 30, "test": 30}, seed=2)
    base = ExperimentConfig(
        data_dir=str(root),
        num_clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=16,
        min_partition_size=5,
        out=str(tmp_path / name),
    )
    return base.replace(**knobs).validate()


def _rows(path: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with (path / name).open() as fh:
        return list(csv.DictReader(fh))


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _spoiling_client(cfg: ExperimentConfig, spoil: dict[int, str]) -> ClientApp:
    """medbloom's ClientApp, except that the partitions in ``spoil`` misbehave."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # like medbloom's ClientApp: the server asks each node which client it is
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if spoil.get(pid) == "raise":
            raise RuntimeError("disk full at hospital")
        reply = train_on_message(msg, context, cfg)
        arrays = reply.content.array_records["arrays"]
        name = next(iter(arrays.keys()))
        if spoil.get(pid) == "nan":
            values = arrays[name].numpy().copy()
            values.flat[0] = np.nan
            arrays[name] = Array(values)
        elif spoil.get(pid) == "shape":
            arrays[name] = Array(np.zeros((3, 3), dtype=np.float32))
        elif spoil.get(pid) == "names":
            reply.content["arrays"] = ArrayRecord({"rogue.weight": Array(np.zeros(2, np.float32))})
        return reply

    return app


def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "run", num_clients=5, min_clients=1)
    run_dir = prepare_run(cfg)
    spoil = {0: "nan", 1: "shape", 2: "raise", 3: "names"}
    run_simulation(cfg, run_dir, client_app=_spoiling_client(cfg, spoil))

    clients = _rows(run_dir, "clients.csv")
    by_client = {(int(r["round"]), r["client_id"]): r for r in clients}
    for rnd in (1, 2):
        assert by_client[(rnd, "0")]["status"] == "rejected"
        assert "non-finite" in by_client[(rnd, "0")]["error"]
        assert by_client[(rnd, "1")]["status"] == "rejected"
        assert "shape" in by_client[(rnd, "1")]["error"]
        assert by_client[(rnd, "3")]["status"] == "rejected"
        assert "do not match" in by_client[(rnd, "3")]["error"]
        assert by_client[(rnd, "4")]["status"] == "ok"
    failed = [r for r in clients if r["status"] == "failed"]
    assert failed and all("disk full at hospital" in r["error"] for r in failed)

    rows = _rows(run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    # round 1 asks all five; the one that failed is left out of round 2, the three
    # whose updates were rejected are asked again
    assert (rows[1]["clients_ok"], rows[1]["clients_failed"]) == ("1", "4")
    assert (rows[2]["clients_ok"], rows[2]["clients_failed"]) == ("1", "3")
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    log = (run_dir / "logs" / "server.log").read_text()
    assert "rejected" in log and "non-finite" in log
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_too_few_live_clients_fails_the_run_clearly(tmp_path: Path) -> None:
    # A timeout far above a round's length: round 1 must not run into it, even on a
    # slow machine where Ray's start and the first training take 10 s or more.
    cfg = _config(tmp_path, "run", num_clients=3, min_clients=3, round_timeout=120)
    run_dir = prepare_run(cfg)
    with pytest.raises(RuntimeError, match="--min-clients"):
        run_simulation(cfg, run_dir, client_app=_spoiling_client(cfg, {0: "raise"}))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "--min-clients 3" in summary["error"]
    assert "only 2 clients left" in summary["error"]
    assert summary["rounds_completed"] == 1
    # a simulated client cannot come back: the run fails at once, not after the timeout
    finished = (run_dir / "summary.json").stat().st_mtime
    assert finished - (run_dir / "metrics.csv").stat().st_mtime < 30


# server optimizer state to restore: FedAdam's moments (dicts of arrays), FedAvgM's
# momentum (a list of arrays); both keep the global arrays they step from
@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, strategy: str) -> None:
    """Server optimizer state, random state and round number survive a restart."""
    rounds = 4
    extra = {"server_momentum": 0.9} if strategy == "fedavgm" else {}
    whole = _config(
        tmp_path, "whole", strategy=strategy, rounds=rounds, fraction_train=0.67, **extra
    )
    run_simulation(whole, prepare_run(whole))

    cfg = _config(
        tmp_path, "resumed", strategy=strategy, rounds=rounds, fraction_train=0.67, **extra
    )
    run_dir = prepare_run(cfg)
    stop_after_round(cfg, run_dir, 2)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    # The process died in round 3 after writing its rows but before its checkpoint,
    # and in the middle of a line: the resumed run must not keep any of that.
    with (run_dir / "metrics.csv").open("a") as fh:
        fh.write("3,0.5,0.5,0.5,0.5,0.5,0.5,0.5,,,,,,3,0,1.0,0.5,9.0\n3,0.4")
    with (run_dir / "clients.csv").open("a") as fh:
        fh.write("3,0,123,ok,10,0.5,0.5,0.5,1.0,\n")

    run_simulation(cfg, run_dir, resume=True)

    assert _without_timing(_rows(run_dir)) == _without_timing(_rows(tmp_path / "whole"))
    clients = [(r["round"], r["client_id"]) for r in _rows(run_dir, "clients.csv")]
    assert len(clients) == len(set(clients)) == 2 * rounds
    keys = ("round", "client_id", "status", "num_examples", "train_loss", "train_accuracy")

    def client_view(path: Path) -> list[tuple[str, ...]]:
        return [tuple(r[k] for k in keys) for r in _rows(path, "clients.csv")]

    assert client_view(run_dir) == client_view(tmp_path / "whole")
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    if strategy == "fedadam":
        # FedAdam computes in float64: those values are kept beside the float32 model
        assert {v.dtype for v in latest["global_arrays"].values()} == {torch.float64}
        assert set(latest["strategy_state"]) == {
            f"strategy.{a}" for a in ("current_arrays", "m_t", "v_t")
        }
    else:
        momentum = latest["strategy_state"]["strategy.momentum_vector"]["list"]
        assert momentum and all(m.abs().sum() > 0 for m in momentum)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == rounds
    lines = (run_dir / "per_class.jsonl").read_text().splitlines()
    assert [json.loads(ln)["round"] for ln in lines] == list(range(rounds + 1))


def test_hospital_level_privacy_stops_cleanly_when_a_hospital_is_lost(tmp_path: Path) -> None:
    """Flower's accountant calibrates the noise for every hospital every round: a round
    that lost one cannot be released as accounted, so the run stops, saying why."""
    cfg = _config(tmp_path, "run", num_clients=3, min_clients=1, privacy="hospital", delta=1e-3)
    run_dir = prepare_run(cfg)
    with pytest.raises(RuntimeError, match="needs every hospital's update every round"):
        run_simulation(cfg, run_dir, client_app=_spoiling_client(cfg, {1: "raise"}))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "--resume" in summary["error"]
    assert summary["rounds_completed"] == 0
    failed = [r for r in _rows(run_dir, "clients.csv") if r["status"] == "failed"]
    assert [r["client_id"] for r in failed] == ["1"]
