"""The run directory: atomic creation, refusal of unusable --out paths, and RunRecorder's
metrics.csv, checkpoints and summary.json."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from medbloom.config import ExperimentConfig
from medbloom.errors import ConfigError
from medbloom.runs import (
    CLIENT_COLUMNS,
    METRICS_COLUMNS,
    RunRecorder,
    check_writable,
    create_run_dir,
    run_info,
)

NAN = float("nan")


def _strict_json(path: Path) -> Any:
    """Parse JSON refusing the non-standard NaN/Infinity tokens Python would accept."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"{path} holds the non-JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -------------------------------------------------------------- create_run_dir


def test_create_run_dir_writes_its_files_in_one_step(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "exp1"
    files = {
        "config.json": {"config": {"num-clients": 3}, "seed": 42},
        "partitions.json": {"class_names": ["a", "b"], "clients": [{"client_id": 0}]},
    }
    assert create_run_dir(out, files) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.json",
        "logs",
        "partitions.json",
    ]
    assert (out / "checkpoints").is_dir()
    assert (out / "logs").is_dir()
    assert list((out / "checkpoints").iterdir()) == []
    assert _strict_json(out / "config.json") == files["config.json"]
    assert _strict_json(out / "partitions.json") == files["partitions.json"]
    assert (out / "config.json").read_text().endswith("\n")
    # no staging folder or temporary file is left beside or inside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["exp1"]
    assert _hidden(out) == []


def test_create_run_dir_writes_nan_as_null(tmp_path: Path) -> None:
    out = tmp_path / "r"
    create_run_dir(out, {"config.json": {"alpha": NAN, "values": [1.0, math.inf, (NAN,)]}})
    assert _strict_json(out / "config.json") == {"alpha": None, "values": [1.0, None, [None]]}


def test_create_run_dir_accepts_an_existing_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    create_run_dir(out, {"config.json": {"a": 1}})
    assert _strict_json(out / "config.json") == {"a": 1}
    assert _hidden(tmp_path) == []


def test_failed_create_run_dir_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "r"
    files = {"config.json": {"a": 1}, "partitions.json": {"bad": object()}}
    with pytest.raises(TypeError):
        create_run_dir(out, files)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_create_run_dir_refuses_a_non_empty_out(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.csv").write_text("round\n0\n")
    with pytest.raises(ConfigError, match="--out") as info:
        create_run_dir(out, {"config.json": {}})
    assert str(out) in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]
    assert (out / "metrics.csv").read_text() == "round\n0\n"
    assert _hidden(tmp_path) == []


def test_create_run_dir_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*: is a file, expected a folder"):
        create_run_dir(out, {"config.json": {}})
    assert out.read_text() == "x"


def test_check_writable_through_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out"):
        check_writable(tmp_path / "file" / "run")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Any:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root?) can write into a 0o500 folder")
        yield ro
    finally:
        ro.chmod(0o700)


def test_create_run_dir_refuses_an_unwritable_parent(read_only_dir: Path) -> None:
    out = read_only_dir / "sub" / "run"
    with pytest.raises(ConfigError, match="--out") as info:
        create_run_dir(out, {"config.json": {}})
    assert str(read_only_dir) in str(info.value)
    assert list(read_only_dir.iterdir()) == []


def test_run_info_records_the_config_and_versions() -> None:
    cfg = ExperimentConfig(num_clients=3, seed=7)
    info = run_info(cfg, ["medbloom", "run", "--num-clients", "3"])
    assert info["config"]["num-clients"] == 3
    assert info["seed"] == 7
    assert info["command"] == ["medbloom", "run", "--num-clients", "3"]
    for pkg in ("python", "torch", "flwr", "medbloom"):
        assert info["versions"][pkg]
    json.dumps(info, allow_nan=False)


# ------------------------------------------------------------------- RunRecorder

SPEC_SUMMARY = {"task": "binary-class", "class_names": ["normal", "pneumonia"], "image_size": 28}


def _row(r: int, val_auc: float, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": r,
        "loss": 0.5 - 0.01 * r,
        "accuracy": 0.8 + 0.01 * r,
        "auc": 0.9,
        "balanced_accuracy": 0.75,
        "precision": 0.7,
        "recall": 0.6,
        "f1": 0.65,
        "val_loss": 0.4,
        "val_accuracy": 0.85,
        "val_auc": val_auc,
        "round_seconds": 1.5,
        "elapsed_seconds": 1.5 * r,
    }
    if r > 0:
        row.update(train_loss=0.3, train_accuracy=0.9, clients_ok=3, clients_failed=0)
    row.update(extra)
    return row


def _state(r: int) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 3), float(r)), "fc.bias": torch.zeros(2)}


def _metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (path / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return create_run_dir(tmp_path / "run", {"config.json": {}})


@pytest.fixture
def cfg() -> ExperimentConfig:
    return ExperimentConfig(num_clients=3, rounds=3, strategy="fedprox", model="cnn")


def test_recorder_starts_with_headers_and_a_running_summary(
    run_dir: Path, cfg: ExperimentConfig
) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    try:
        header, rows = _metrics(run_dir)
        assert tuple(header) == METRICS_COLUMNS
        assert header[0] == "round"
        assert rows == []
        clients_header = (run_dir / "clients.csv").read_text().splitlines()
        assert clients_header == [",".join(CLIENT_COLUMNS)]
        summary = _strict_json(run_dir / "summary.json")
        assert summary["status"] == "running"
        assert summary["final"] is None and summary["best"] is None
        assert summary["rounds_completed"] is None
        assert summary["rounds_planned"] == 3
        assert summary["strategy"] == "fedprox"
        assert summary["num_clients"] == 3
        assert summary["task"] == "binary-class"
        assert not (run_dir / "checkpoints" / "best.pt").exists()
    finally:
        rec.close("finished")


def test_recorder_rounds_checkpoints_and_summary(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    val_aucs = [0.5, 0.7, NAN, 0.6]
    best_after = [0, 1, 1, 1]
    for r, (auc, best) in enumerate(zip(val_aucs, best_after, strict=True)):
        is_best = rec.record_round(_row(r, auc), _state(r))
        assert is_best == (best == r)
        # each row is on disk as soon as the round is recorded, before close()
        header, rows = _metrics(run_dir)
        assert len(rows) == r + 1
        latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
        assert latest["round"] == r
        assert torch.equal(latest["model"]["fc.weight"], _state(r)["fc.weight"])
        best_ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        assert best_ckpt["round"] == best
        assert torch.equal(best_ckpt["model"]["fc.weight"], _state(best)["fc.weight"])
        summary = _strict_json(run_dir / "summary.json")
        assert summary["status"] == "running"
        assert summary["rounds_completed"] == r
        assert summary["final"]["round"] == r
        assert summary["best"]["round"] == best
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]
    rec.close("finished")

    summary = _strict_json(run_dir / "summary.json")
    assert summary["status"] == "finished"
    assert summary["final"]["round"] == 3
    assert summary["final"]["val_auc"] == pytest.approx(0.6)
    assert summary["best"]["round"] == 1
    assert summary["best"]["val_auc"] == pytest.approx(0.7)
    assert summary["best_by"] == "val_auc"
    assert "error" not in summary
    assert _hidden(run_dir) == []
    assert _hidden(run_dir / "checkpoints") == []

    header, rows = _metrics(run_dir)
    assert tuple(header) == METRICS_COLUMNS
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["val_auc"] for r in rows] == ["0.5", "0.7", "", "0.6"]
    # columns a row lacks (no training in round 0) are empty cells
    assert rows[0]["train_loss"] == "" and rows[0]["clients_ok"] == ""
    assert rows[1]["clients_ok"] == "3"
    assert float(rows[2]["loss"]) == pytest.approx(0.48)


def test_recorder_writes_nan_as_empty_cells_and_null(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(0, NAN, auc=NAN, loss=NAN), _state(0))
    rec.close("finished")
    _, rows = _metrics(run_dir)
    assert rows[0]["auc"] == rows[0]["loss"] == rows[0]["val_auc"] == ""
    assert rows[0]["accuracy"] == "0.8"
    text = (run_dir / "metrics.csv").read_text()
    assert "nan" not in text.lower()
    summary = _strict_json(run_dir / "summary.json")
    assert summary["final"]["auc"] is None
    assert summary["final"]["val_auc"] is None
    assert summary["final"]["accuracy"] == pytest.approx(0.8)
    # no finite val_auc: no best model
    assert summary["best"] is None
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    assert (run_dir / "checkpoints" / "latest.pt").exists()


def test_recorder_csv_floats_read_back_exactly(run_dir: Path, cfg: ExperimentConfig) -> None:
    values = {"loss": 0.123456789012345, "auc": 1 / 3, "elapsed_seconds": 12345.678901}
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(1, 0.5, **values), _state(1))
    rec.close("finished")
    _, rows = _metrics(run_dir)
    for key, value in values.items():
        assert float(rows[0][key]) == value, key


def test_recorder_keeps_the_earlier_round_on_a_tie(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    assert rec.record_round(_row(0, 0.8), _state(0))
    assert not rec.record_round(_row(1, 0.8), _state(1))
    assert not rec.record_round(_row(2, 0.79), _state(2))
    rec.close("finished")
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["round"] == 0
    assert _strict_json(run_dir / "summary.json")["best"]["round"] == 0


def test_recorder_records_failure(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(0, 0.5), _state(0))
    rec.close("failed", "RuntimeError: round 1: no client returned a usable update")
    summary = _strict_json(run_dir / "summary.json")
    assert summary["status"] == "failed"
    assert summary["error"].startswith("RuntimeError")
    assert summary["final"]["round"] == 0


def test_recorder_client_rows(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_clients(
        [
            {
                "round": 1,
                "client_id": 0,
                "node_id": 11,
                "status": "ok",
                "num_examples": 50,
                "train_loss": 0.25,
                "train_accuracy": 0.9,
                "local_val_accuracy": NAN,
                "seconds": 2.0,
            },
            {"round": 1, "client_id": "", "node_id": 12, "status": "failed", "error": "boom"},
        ]
    )
    rec.close("finished")
    with (run_dir / "clients.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CLIENT_COLUMNS
        rows = list(reader)
    assert rows[0]["status"] == "ok" and rows[0]["local_val_accuracy"] == ""
    assert rows[0]["train_loss"] == "0.25"
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "boom"
    assert rows[1]["num_examples"] == ""


def test_a_file_with_older_columns_keeps_its_columns(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A run begun by an older medbloom (without the site columns) and resumed by this
    one: the new rows line up with the file's own header."""
    old = [c for c in METRICS_COLUMNS if "site" not in c]
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.close("interrupted")
    (run_dir / "metrics.csv").write_text(",".join(old) + "\n")
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(1, 0.6, worst_site_accuracy=0.4), _state(1))
    rec.close("finished")
    header, rows = _metrics(run_dir)
    assert header == old and len(rows) == 1
    assert rows[0]["val_auc"] == "0.6" and rows[0]["accuracy"] == repr(0.81)


def test_recorder_appends_to_an_existing_metrics_file(run_dir: Path, cfg: ExperimentConfig) -> None:
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(0, 0.5), _state(0))
    rec.close("failed")
    rec = RunRecorder(run_dir, cfg, SPEC_SUMMARY)
    rec.record_round(_row(1, 0.6), _state(1))
    rec.close("finished")
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRICS_COLUMNS)
    assert sum(line.startswith("round,") for line in lines) == 1
    _, rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == ["0", "1"]
