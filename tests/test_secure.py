"""Secure aggregation (#33): the server sees only masked updates and recovers their sum.

The protocol tests run the server's side (:class:`SecureRound`) inside a ServerApp of
Flower's own Simulation Engine, against real hospitals (:class:`Hospital`, synthetic
MedMNIST files) whose messages pass through Flower's own ``secaggplus_mod`` in this
process, so a hospital can drop out at a chosen stage. The run tests go through the
Simulation Engine end to end, and through ``medbloom launch`` with real processes, one
killed after it shared its keys.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from conftest import Cli
from medbloom.config import ExperimentConfig
from medbloom.data.registry import spec_of
from medbloom.experiment import initial_model
from medbloom.federation.client_app import Hospital
from medbloom.federation.secure import (
    CLIPPING_RANGE,
    QUANTIZATION_RANGE,
    RECORD,
    SecureOutcome,
    SecureRound,
    stages_mod,
)
from medbloom.federation.wire import Layout, flat_values
from medbloom.training import state_arrays
from synthetic import write_npz

N = 4
NODES = [101, 202, 303, 404]  # node IDs as a SuperLink gives them: arbitrary
THRESHOLD = 3


def _config(root: Path, **knobs: Any) -> ExperimentConfig:
    data = root / "data"
    if not data.exists():
        write_npz(data, "pneumoniamnist", counts={"train": 160, "val": 24, "test": 24}, seed=3)
    return (
        ExperimentConfig(
            data_dir=str(data),
            num_clients=N,
            rounds=1,
            batch_size=16,
            min_partition_size=5,
            partition="dirichlet",  # unequal hospitals: the weights matter
            alpha=1.0,
            local_val_fraction=0.2,
            secure_aggregation="on",
            secagg_threshold=THRESHOLD,
            out=str(root / "run"),
        )
        .replace(**knobs)
        .validate()
    )


class Hospitals:
    """The hospitals, in this process, as SuperNodes would deliver their messages: each
    through ``stages_mod`` (Flower's ``secaggplus_mod``) with a context of its own. A
    node in ``gone`` stops answering at the stage named there (it died before)."""

    def __init__(self, hospitals: dict[int, Hospital], gone: dict[int, str]) -> None:
        self.hospitals = hospitals
        self.gone = gone
        self.context = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
            for nid in hospitals
        }
        # every reply the server got, as it came: (sender, error?, its arrays, the bytes
        # it held, the masked update it held if any)
        self.received: list[tuple[int, bool, int, bytes, bytes | None]] = []
        self.dead: set[int] = set()

    def exchange(self, messages: Iterable[Message], stop: Any) -> tuple[list[Message], list[int]]:
        replies, missing = [], []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = str(msg.content.config_records[RECORD]["stage"])
            if nid in self.dead or self.gone.get(nid) == stage:
                self.dead.add(nid)
                missing.append(nid)
                continue
            hospital = self.hospitals[nid]
            reply = stages_mod(msg, self.context[nid], lambda m, _c, h=hospital: h.train(m))
            if (
                self.gone.get(nid) == "sends a short masked update"
                and stage == "collect_masked_vectors"
            ):
                record = reply.content.config_records[RECORD]
                record["masked_params"] = record["masked_params"][:-1]
            arrays = sum(len(r) for r in reply.content.array_records.values())
            record = reply.content.config_records.get(RECORD, {})
            masked = (
                record["masked_params"][1] if len(record.get("masked_params", [])) > 1 else None
            )
            self.received.append((nid, reply.has_error(), arrays, _payload(reply), masked))
            replies.append(reply)
        return replies, missing


def _run_in_server_app(cfg: ExperimentConfig, body: Any) -> None:
    """``body(grid)`` inside a ServerApp of Flower's Simulation Engine (messages can
    only be made there)."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from medbloom.federation.simulation import backend_config

    app = ServerApp()
    failures: list[BaseException] = []

    @app.main()
    def main(grid: Any, context: Context) -> None:
        try:
            body(grid)
        except BaseException as exc:  # re-raised in the test's thread
            failures.append(exc)

    run_simulation(
        server_app=app, client_app=ClientApp(), num_supernodes=1, backend_config=backend_config(cfg)
    )
    if failures:
        raise failures[0]


SCENARIOS = {
    "all answer": {},
    "one dies after sharing its keys": {303: "collect_masked_vectors"},
    "one dies after sending its masked update": {202: "unmask"},
    "two die after sharing their keys": {
        101: "collect_masked_vectors",
        404: "collect_masked_vectors",
    },
    "one sends a masked update of the wrong shape": {404: "sends a short masked update"},
}


@pytest.fixture(scope="module")
def protocol(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each scenario's outcome, new global arrays and replies received, with each
    hospital's plain update and weight (the same training, without secure aggregation)."""
    root = tmp_path_factory.mktemp("secure")
    cfg = _config(root)
    hospitals = {
        nid: Hospital(cfg, {"partition-id": k, "num-partitions": N}, simulated=True)
        for k, nid in enumerate(NODES)
    }
    model = initial_model(cfg, spec_of(cfg.dataset, 28))
    layout = Layout.of(state_arrays(model))
    start = layout.pack(state_arrays(model))
    out: dict[str, Any] = {"start": flat_values(start)}

    def task(nid: int) -> Message:
        config = ConfigRecord({"server-round": 1, "site-eval": False})
        return Message(
            RecordDict({"arrays": start, "config": config}),
            dst_node_id=nid,
            message_type=MessageType.TRAIN,
            group_id="1",
        )

    def body(grid: Any) -> None:
        trained = {nid: hospitals[nid].train(task(nid)) for nid in NODES}
        out["plain"] = {
            nid: (
                flat_values(r.content.array_records["arrays"]),
                int(r.content.metric_records["metrics"]["num-examples"]),
            )
            for nid, r in trained.items()
        }
        out["plain replies"] = list(trained.values())
        sizes = [len(h.data.train) for h in hospitals.values()]
        for name, gone in SCENARIOS.items():
            net = Hospitals(hospitals, gone)
            outcome, new = SecureRound(
                net.exchange, [task(n) for n in NODES], 1, THRESHOLD, max(sizes), seed=7
            ).run(start)
            out[name] = (outcome, new, net.received)

    _run_in_server_app(cfg, body)
    return out


def _average(protocol: dict[str, Any], nodes: Iterable[int]) -> dict[str, np.ndarray]:
    """FedAvg's weighted average of the plain updates of ``nodes``."""
    plain = protocol["plain"]
    nodes = list(nodes)
    total = sum(plain[n][1] for n in nodes)
    return {
        k: sum(plain[n][0][k].astype(np.float64) * plain[n][1] for n in nodes) / total
        for k in protocol["start"]
    }


def _bound(protocol: dict[str, Any], nodes: Iterable[int]) -> float:
    """How far the recovered average may lie from the plain one: each hospital's
    stochastic rounding moves its weighted update by under one quantisation step, and
    the sum is divided by the sum of the weights (largest hospital: 1)."""
    plain = protocol["plain"]
    nodes = list(nodes)
    largest = max(plain[n][1] for n in plain)
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    return len(nodes) * step / sum(plain[n][1] / largest for n in nodes) + 1e-6


@pytest.mark.parametrize(
    ("scenario", "counted"),
    [
        ("all answer", NODES),
        ("one dies after sharing its keys", [101, 202, 404]),
        ("one dies after sending its masked update", NODES),
    ],
)
def test_the_sum_recovered_equals_the_plain_average_within_the_quantisation_bound(
    protocol: dict[str, Any], scenario: str, counted: list[int]
) -> None:
    outcome, new, _ = protocol[scenario]
    assert isinstance(outcome, SecureOutcome) and outcome.aborted is None
    assert outcome.alive == sorted(counted)
    assert new is not None
    expected = _average(protocol, counted)
    got = flat_values(new)
    moved = max(np.abs(expected[k] - protocol["start"][k]).max() for k in expected)
    assert moved > 100 * _bound(protocol, counted)  # training moved the weights
    error = max(np.abs(got[k].astype(np.float64) - expected[k]).max() for k in expected)
    assert error <= _bound(protocol, counted), (error, _bound(protocol, counted))
    # the round loop gets one reply per hospital counted, each carrying the new weights
    # and its hospital's metrics
    assert sorted(r.metadata.src_node_id for r in outcome.replies if not r.has_error()) == sorted(
        counted
    )
    for reply in outcome.replies:
        arrays = flat_values(reply.content.array_records["arrays"])
        assert all(np.array_equal(arrays[k], got[k]) for k in got)
        assert reply.content.metric_records["metrics"]["num-examples"] > 0


def test_without_the_dropped_hospitals_update_the_sum_differs(protocol: dict[str, Any]) -> None:
    """The survivors' average is not the average of all four: what was dropped is out."""
    _, new, _ = protocol["one dies after sharing its keys"]
    everyone = _average(protocol, NODES)
    got = flat_values(new)
    assert max(np.abs(got[k] - everyone[k]).max() for k in got) > 100 * _bound(protocol, NODES)
    assert protocol["one dies after sharing its keys"][0].missing == [303]


def _payload(msg: Message) -> bytes:
    """Every byte a message carries in its records."""
    out = bytearray()
    for record in msg.content.array_records.values():
        for array in record.values():
            out += array.numpy().tobytes()
    for record in msg.content.config_records.values():
        for value in record.values():
            for v in value if isinstance(value, list) else [value]:
                out += v if isinstance(v, bytes) else str(v).encode()
    return bytes(out)


def _windows(values: np.ndarray, n: int = 12) -> list[bytes]:
    """``n`` runs of 8 consecutive float32 values spread over ``values``, as bytes."""
    raw = values.astype(np.float32)
    starts = np.linspace(0, len(raw) - 8, n).astype(int)
    return [raw[s : s + 8].tobytes() for s in starts]


def test_no_reply_the_server_receives_holds_an_unmasked_update(protocol: dict[str, Any]) -> None:
    from flwr.common import bytes_to_ndarray

    start = protocol["start"]["float32"]
    # the check can fail: the plain replies carry each hospital's weights in the clear
    for reply in protocol["plain replies"]:
        trained = flat_values(reply.content.array_records["arrays"])["float32"]
        assert all(w in _payload(reply) for w in _windows(trained))
    _, _, received = protocol["all answer"]
    assert len(received) == 4 * N  # four stages
    assert sum(masked is not None for *_, masked in received) == N
    for nid, error, arrays, payload, masked in received:
        assert not error and arrays == 0
        for trained, _weight in protocol["plain"].values():
            update = trained["float32"].astype(np.float64) - start
            assert not any(w in payload for w in _windows(trained["float32"]))
            assert not any(w in payload for w in _windows(update))
        if masked is not None:
            # a masked update looks nothing like the update it hides
            vector = bytes_to_ndarray(masked).astype(np.float64)
            update = protocol["plain"][nid][0]["float32"].astype(np.float64) - start
            assert abs(np.corrcoef(vector, update)[0, 1]) < 0.05


def test_dp_sgd_hospitals_mask_their_private_updates(tmp_path: Path) -> None:
    """With --privacy sample each hospital trains with DP-SGD (Opacus) and masks the
    private update: the server gets the sum of DP updates and each one's epsilon."""
    cfg = _config(tmp_path, privacy="sample", delta=1e-3, rounds=2)
    hospitals = {
        nid: Hospital(
            cfg,
            {"partition-id": k, "num-partitions": N, "state-dir": str(tmp_path / f"h{k}")},
            simulated=True,
        )
        for k, nid in enumerate(NODES)
    }
    model = initial_model(cfg, spec_of(cfg.dataset, 28))
    start = Layout.of(state_arrays(model)).pack(state_arrays(model))
    got: dict[str, Any] = {}

    def body(grid: Any) -> None:
        config = ConfigRecord({"server-round": 1, "site-eval": False})
        tasks = [
            Message(RecordDict({"arrays": start, "config": config}), dst_node_id=n,
                    message_type=MessageType.TRAIN, group_id="1")
            for n in NODES
        ]  # fmt: skip
        sizes = [len(h.data.train) for h in hospitals.values()]
        net = Hospitals(hospitals, {})
        got["outcome"], got["new"] = SecureRound(
            net.exchange, tasks, 1, THRESHOLD, max(sizes), seed=1
        ).run(start)
        got["received"] = net.received

    _run_in_server_app(cfg, body)
    outcome, new = got["outcome"], got["new"]
    assert outcome.aborted is None and new is not None and outcome.alive == sorted(NODES)
    assert all(arrays == 0 for _, _, arrays, _, _ in got["received"])
    moved = flat_values(new)["float32"] - flat_values(start)["float32"]
    assert np.isfinite(moved).all() and np.abs(moved).max() > 0
    for reply in outcome.replies:
        metrics = reply.content.metric_records["metrics"]
        assert 0 < float(metrics["epsilon"]) <= cfg.target_epsilon


def test_a_masked_update_of_the_wrong_shape_is_refused_and_its_masks_removed(
    protocol: dict[str, Any],
) -> None:
    """Left out like a hospital lost after sharing its keys (the survivors' shares remove
    the masks they added for it), and handed to the round loop to be recorded as refused."""
    outcome, new, _ = protocol["one sends a masked update of the wrong shape"]
    assert outcome.aborted is None and outcome.alive == [101, 202, 303]
    assert outcome.rejected == {404: "a masked update of the wrong shape"}
    assert 404 in [r.metadata.src_node_id for r in outcome.replies]
    expected = _average(protocol, [101, 202, 303])
    got = flat_values(new)
    error = max(np.abs(got[k].astype(np.float64) - expected[k]).max() for k in expected)
    assert error <= _bound(protocol, [101, 202, 303])


def test_below_the_threshold_the_round_stops_without_a_sum(protocol: dict[str, Any]) -> None:
    outcome, new, _ = protocol["two die after sharing their keys"]
    assert new is None
    assert outcome.aborted and "fewer than the threshold of 3" in outcome.aborted
    assert outcome.alive == [202, 303]
    assert sorted(outcome.missing) == [101, 404]


# ------------------------------------------------------------------------------ runs


class RecordingGrid:
    """The Simulation Engine's grid, keeping every reply the server pulls from Flower's
    LinkState, as it came: (the arrays it held, every byte it carried)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.pulled: list[tuple[int, bytes]] = []

    def pull_messages(self, ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(ids))
        for reply in replies:
            if reply.has_content():
                arrays = sum(len(r) for r in reply.content.array_records.values())
                self.pulled.append((arrays, _payload(reply)))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _recorded_run(cfg: ExperimentConfig) -> tuple[Path, RecordingGrid]:
    """``medbloom run`` for ``cfg`` through Flower's Simulation Engine, the ServerApp's
    grid recorded."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from medbloom.experiment import largest_first, prepare_run
    from medbloom.federation.client_app import make_client_app
    from medbloom.federation.server_app import run_federation
    from medbloom.federation.simulation import backend_config

    run_dir = prepare_run(cfg)
    app = ServerApp()
    grids: list[RecordingGrid] = []

    @app.main()
    def main(grid: Any, context: Context) -> None:
        grids.append(RecordingGrid(grid))
        run_federation(grids[0], cfg, run_dir)

    run_simulation(
        server_app=app,
        client_app=make_client_app(cfg, slot_order=largest_first(cfg)),
        num_supernodes=cfg.num_clients,
        backend_config=backend_config(cfg),
    )
    return run_dir, grids[0]


def test_a_secure_run_gets_no_update_in_the_clear_and_matches_a_plain_one(tmp_path: Path) -> None:
    """End to end through Flower's Simulation Engine, the same seed with and without
    secure aggregation: no reply that reached the server through Flower's LinkState
    holds a hospital's weights in the clear, and the two runs end two rounds at the same
    scores, near enough (the quantisation). A secure run stopped after round 1 and
    resumed ends exactly where the uninterrupted one does: masks are drawn afresh each
    round but cancel exactly, and the rounding is seeded per hospital and round."""
    import csv

    from conftest import stop_after_round
    from medbloom.experiment import prepare_run
    from medbloom.federation.simulation import run_simulation

    runs = {}
    for mode in ("off", "on"):
        cfg = _config(tmp_path, secure_aggregation=mode, rounds=2, out=str(tmp_path / mode))
        runs[mode] = _recorded_run(cfg.replace(secagg_threshold=0) if mode == "off" else cfg)
        summary = json.loads((runs[mode][0] / "summary.json").read_text())
        assert summary["status"] == "finished"
    plain = [p for arrays, p in runs["off"][1].pulled if arrays]
    assert len(plain) == 2 * N  # each hospital's weights, each round, in the clear
    secure = runs["on"][1].pulled
    assert secure and all(arrays == 0 for arrays, _ in secure)
    # round 1 trains the same model the same way in both runs: none of the weights the
    # hospitals sent in the clear is in anything they sent under secure aggregation
    windows = [w for p in plain for w in _windows(np.frombuffer(p[:8000], np.float32))]
    assert not any(w in p for _, p in secure for w in windows)
    off, on = (list(csv.DictReader((runs[m][0] / "metrics.csv").open())) for m in ("off", "on"))
    assert [r["clients_ok"] for r in on[1:]] == [str(N), str(N)]
    for a, b in zip(off[1:], on[1:], strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), abs=1e-3)
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-3)
    # what each hospital sent a round: the masked update's 64-bit integers for the
    # 32-bit weights, plus keys and shares
    sent = {
        m: [int(r["upload_bytes"]) for r in csv.DictReader((runs[m][0] / "clients.csv").open())]
        for m in ("off", "on")
    }
    # the run says what the server saw, where it states its privacy
    privacy = json.loads((runs["on"][0] / "summary.json").read_text())["privacy"]
    assert privacy["secure_aggregation"]["threshold"] == THRESHOLD
    assert "saw only the sum" in (runs["on"][0] / "model_card.md").read_text()
    assert "no secure aggregation" in (runs["off"][0] / "model_card.md").read_text()
    assert len(sent["on"]) == 2 * N and min(sent["off"]) > 0
    assert min(sent["on"]) / max(sent["off"]) > 1.8 and max(sent["on"]) / min(sent["off"]) < 3

    cfg = _config(tmp_path, rounds=2, out=str(tmp_path / "resumed"))
    run_dir = prepare_run(cfg)
    stop_after_round(cfg, run_dir, 1)
    run_simulation(cfg, run_dir, resume=True)
    resumed = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns = ("round", "loss", "accuracy", "auc", "train_loss")
    assert [[r[c] for c in columns] for r in resumed] == [[r[c] for c in columns] for r in on]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "fedmedian"], "needs each hospital's update on its own"),
        (["--strategy", "krum"], "needs each hospital's update on its own"),
        (["--strategy", "fedtrimmedavg"], "needs each hospital's update on its own"),
        (["--strategy", "local"], "aggregates nothing"),
        (["--privacy", "hospital"], "server-side clipping"),
        (["--batched", "on"], "--batched on"),
        (["--secagg-threshold", "11"], "--secagg-threshold 11 is out of range"),
        (["--secagg-threshold", "1"], "--secagg-threshold 1 is out of range"),
    ],
)
def test_combinations_that_cannot_be_secure_are_one_line_errors(
    run_cli: Cli, tmp_path: Path, flags: list[str], message: str
) -> None:
    result = run_cli(
        "run", "--secure-aggregation", *flags, "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    assert result.returncode == 2, result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "r").exists()


def test_the_flag_alone_means_on_and_off_is_the_default() -> None:
    from medbloom.cli import build_parser, config_from_args

    parser = build_parser()
    assert (
        config_from_args(parser.parse_args(["run", "--secure-aggregation"])).secure_aggregation
        == "on"
    )
    assert config_from_args(parser.parse_args(["run"])).secure_aggregation == "off"
    cfg = ExperimentConfig(num_clients=7, secure_aggregation="on").validate()
    assert cfg.secure_threshold() == 4
    assert cfg.replace(fraction_train=0.5).secure_threshold() == 2
    assert cfg.replace(secagg_threshold=6).secure_threshold() == 6


# ---------------------------------------------------------------- real processes


def _kill_when(run_dir: Path, proc: Any, tmp_path: Path, client: int, seen: Any) -> None:
    """SIGKILL hospital ``client``'s process as soon as ``seen(run_dir)`` is true."""
    from test_launch import _processes_mentioning

    deadline = time.monotonic() + 240
    while not seen(run_dir):
        assert time.monotonic() < deadline, "the moment to kill never came"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    victims = [
        p for p, args in _processes_mentioning(str(tmp_path)) if f"partition-id={client}" in args
    ]
    assert victims, f"hospital {client}'s process not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _got_masking_task(client: int, nth: int) -> Any:
    """The hospital has received its ``nth`` training message: under secure aggregation
    the third of a round is the masking stage's, sent once every hospital's encrypted
    key shares reached the server. Killed then, it dies after sharing its keys and
    before sending its masked update (training takes far longer than the kill)."""
    return lambda run_dir: (
        _text(run_dir / "logs" / f"client_{client}.log").count("train message received") >= nth
    )


def _server_has_masked_updates(server_round: int) -> Any:
    """The server has every masked update of ``server_round`` and is about to ask for
    the unmasking shares (a hospital hears of that a poll later)."""
    line = f"secure aggregation, round {server_round}: masked updates from"
    return lambda run_dir: line in _text(run_dir / "logs" / "server.log")


def _launch_secure(tmp_path: Path, clients: int, *flags: str) -> tuple[Path, Any]:
    """``medbloom launch`` of ``clients`` hospitals under secure aggregation."""
    from test_launch import _launch

    out = tmp_path / "run"
    proc = _launch(
        tmp_path, out, "--num-clients", str(clients), "--min-clients", "2",
        "--secure-aggregation", "--round-timeout", "12", *flags,
    )  # fmt: skip
    return out, proc


@pytest.mark.slow
def test_hospitals_killed_after_sharing_keys_or_sending_their_update_do_not_stop_a_round(
    tmp_path: Path,
) -> None:
    """Four hospital processes, TLS and node keys. Hospital 1 is killed after it shared
    its keys in round 1: the round aggregates the other three. In round 2 the first
    hospital to send its masked update is killed before it can help unmask: its update
    counts, the two others' shares remove its mask; round 3 goes on without it."""
    from test_launch import _assert_nothing_left, _rows, _stop

    out, proc = _launch_secure(tmp_path, 4, "--rounds", "3", "--secagg-threshold", "2", "--secure")
    late = 0
    try:
        _kill_when(out, proc, tmp_path, 1, _got_masking_task(1, 3))
        _kill_when(out, proc, tmp_path, late, _server_has_masked_updates(2))
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stdout + stderr
    rows = _rows(out)
    assert [(r["round"], r["clients_ok"], r["clients_failed"]) for r in rows[1:]] == [
        ("1", "3", "1"),
        ("2", "3", "0"),
        ("3", "2", "1"),
    ]
    assert len({r["loss"] for r in rows}) == 4  # every round aggregated
    failed = [
        (r["round"], r["client_id"]) for r in _rows(out, "clients.csv") if r["status"] != "ok"
    ]
    assert failed == [("1", "1"), ("3", str(late))]
    logs = {i: (out / "logs" / f"client_{i}.log").read_text() for i in (0, 2, 3)}
    assert "round 2: masked update ready" in logs[late]
    assert "round 2: unmasking shares ready" not in logs[late]  # died before unmasking
    for i in {0, 2, 3} - {late}:
        assert "round 1: unmasking shares ready" in logs[i]
        assert "round 3: unmasking shares ready" in logs[i]
    server = (out / "logs" / "server.log").read_text()
    assert "round 2: unmasking shares from 2 of 3 hospitals" in server
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert "https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_fewer_hospitals_than_the_threshold_fail_cleanly(tmp_path: Path) -> None:
    from test_launch import _assert_nothing_left, _rows, _stop

    out, proc = _launch_secure(tmp_path, 3, "--rounds", "3", "--secagg-threshold", "3")
    try:
        _kill_when(out, proc, tmp_path, 1, _got_masking_task(1, 3))
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 1, stdout + stderr
    rows = _rows(out)
    # round 1 could not be unmasked: the global model stayed as it was
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == "0" and rows[1]["loss"] == rows[0]["loss"]
    clients = {r["client_id"]: r for r in _rows(out, "clients.csv")}
    assert clients["1"]["status"] in ("failed", "timeout")
    for i in ("0", "2"):
        assert clients[i]["status"] == "rejected"
        assert "fewer than the threshold of 3" in clients[i]["error"]
    # round 2 needs the threshold's 3 hospitals: the run stops, saying why, in one line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "secure-aggregation threshold" in summary["error"], summary["error"]
    assert "Traceback" not in stderr
    _assert_nothing_left(tmp_path)


def test_the_privacy_line_says_the_server_saw_only_the_sum() -> None:
    from medbloom.privacy import describe

    plain = describe({"mode": "none"})
    secure = describe({"mode": "none", "secure_aggregation": {"threshold": 3}})
    assert "saw only the sum" not in plain
    assert secure.startswith(plain) and "at least 3 hospitals" in secure
    assert "metrics travel in the clear" in secure
