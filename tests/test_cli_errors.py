"""The real ``medbloom`` command, in a subprocess: every mistake a user can make ends with
exit code 2, one ``medbloom: error:`` line naming the input, no traceback, and no run
directory; the listing commands and --help show what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import synthetic
from conftest import OFFLINE, Cli, medbloom_in_process
from medbloom.config import ExperimentConfig
from medbloom.data import medmnist

_SCRIPT = Path(sys.executable).with_name("medbloom")
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "medbloom"]
TIMEOUT = 120
URL = medmnist.url_and_md5("pneumoniamnist", 28)[0]
N_TRAIN = 200


def write_npz(root: Path, **override: np.ndarray) -> Path:
    """A synthetic pneumoniamnist.npz (official layout) under ``root/medmnist``."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", N_TRAIN), ("val", 20), ("test", 20)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    path = root / "medmnist" / "pneumoniamnist.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def medbloom(*args: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(OFFLINE)
    env["MEDBLOOM_DATA_DIR"] = str(cwd / "no-default-data-root")
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_npz(root)
    return root


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """An empty working directory: a default ``runs/`` folder would show up here."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("medbloom: error:"), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


# ------------------------------------------------------------------ bad inputs


def _good(tmp: Path, data_root: Path) -> Path:
    return data_root


def _empty(tmp: Path, data_root: Path) -> Path:
    (tmp / "empty-data").mkdir()
    return tmp / "empty-data"


def _truncated(tmp: Path, data_root: Path) -> Path:
    path = write_npz(tmp / "truncated")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return tmp / "truncated"


def _chest(tmp: Path, data_root: Path) -> Path:
    synthetic.write_npz(tmp / "chest", "chestmnist")
    return tmp / "chest"


def _misshaped(tmp: Path, data_root: Path) -> Path:
    images = np.zeros((N_TRAIN, 28, 27), dtype=np.uint8)
    write_npz(tmp / "misshaped", train_images=images)
    return tmp / "misshaped"


DataMaker = Callable[[Path, Path], Path]

# (flags, how to make the data root, strings the error line must contain; "{data}" is the
# data root and "{file}" the npz path)
BAD_INPUTS: dict[str, tuple[list[str], DataMaker, list[str]]] = {
    "dataset": (["--dataset", "nosuch"], _good, ["--dataset", "nosuch"]),
    "model": (["--model", "nosuch"], _good, ["--model", "nosuch", "cnn"]),
    "strategy": (["--strategy", "nosuch"], _good, ["--strategy", "nosuch", "fedavg"]),
    "partition": (["--partition", "nosuch"], _good, ["--partition", "nosuch", "dirichlet"]),
    "alpha-zero": (["--alpha", "0"], _good, ["--alpha", "0"]),
    "alpha-negative": (["--alpha", "-1"], _good, ["--alpha", "-1"]),
    "num-clients-zero": (["--num-clients", "0"], _good, ["--num-clients", "0"]),
    "num-clients-too-many": (
        ["--num-clients", "100000"],
        _good,
        ["--num-clients", "100000", "more than the data allows", str(N_TRAIN)],
    ),
    "rounds-zero": (["--rounds", "0"], _good, ["--rounds", "0"]),
    "fraction-train-zero": (["--fraction-train", "0"], _good, ["--fraction-train", "0"]),
    "fraction-train-above-one": (["--fraction-train", "1.5"], _good, ["--fraction-train", "1.5"]),
    "size": (["--size", "100"], _good, ["--size", "100", "28, 64, 128, 224"]),
    "missing-file-offline": (
        [],
        _empty,
        ["pneumoniamnist.npz", "{data}" + os.sep + "medmnist", URL, "could not be downloaded"],
    ),
    "truncated-file": ([], _truncated, ["{file}", "truncated or corrupt"]),
    "misshaped-images": ([], _misshaped, ["{file}", "train_images", "(200, 28, 27)"]),
    "seed-negative": (["--seed", "-1"], _good, ["--seed", "-1"]),
    "batched-with-batchnorm": (
        ["--batched", "on", "--model", "resnet18"],
        _good,
        ["--batched on", "BatchNorm", "--batched off"],
    ),
    "batched-with-bf16": (
        ["--batched", "on", "--precision", "bf16"],
        _good,
        ["--batched on", "--precision"],
    ),
    "precision": (["--precision", "fp8"], _good, ["--precision", "fp8", "bf16"]),
    "batched-with-augment": (
        ["--batched", "on", "--augment", "light"],
        _good,
        ["--batched on", "--augment"],
    ),
    "batched-with-logit-adjust": (
        ["--batched", "on", "--class-weighting", "logit-adjust"],
        _good,
        ["--batched on", "--class-weighting", "--batched off"],
    ),
    "logit-adjust-multi-label": (
        ["--dataset", "chestmnist", "--class-weighting", "logit-adjust"],
        _chest,
        ["--class-weighting logit-adjust", "chestmnist", "multi-label"],
    ),
}
KNOWN_BUGS: dict[str, str] = {}


def _bad_input_cases() -> list[object]:
    return [
        pytest.param(
            case,
            id=case,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case])]
            if case in KNOWN_BUGS
            else [],
        )
        for case in BAD_INPUTS
    ]


# Cases that also run as a real `medbloom` process (the rest call its main() in-process).
IN_A_PROCESS = {"dataset", "missing-file-offline", "truncated-file", "batched-with-batchnorm"}


@pytest.mark.parametrize("case", _bad_input_cases())
def test_bad_input_is_one_line_and_no_run_dir(
    case: str,
    tmp_path: Path,
    cwd: Path,
    data_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags, make_data, names = BAD_INPUTS[case]
    data = make_data(tmp_path, data_root)
    data_files_before = sorted(data.rglob("*"))
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "new-run"
    argv = ("run", "--data-dir", str(data), "--out", str(out), *flags)
    if case in IN_A_PROCESS:
        proc = medbloom(*argv, cwd=cwd)
    else:
        proc = medbloom_in_process(*argv, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)
    npz = data / "medmnist" / "pneumoniamnist.npz"
    assert_one_line_error(
        proc, *(n.replace("{data}", str(data)).replace("{file}", str(npz)) for n in names)
    )
    assert not out.exists()
    assert list(runs.iterdir()) == []
    assert list(cwd.iterdir()) == []
    if case == "missing-file-offline":
        # the data folder may be created, but no partial download is left in it
        assert list((data / "medmnist").iterdir()) == []
    else:
        assert sorted(data.rglob("*")) == data_files_before


def test_out_that_is_not_empty_is_refused_untouched(
    tmp_path: Path, cwd: Path, data_root: Path
) -> None:
    out = tmp_path / "runs" / "old-run"
    out.mkdir(parents=True)
    (out / "metrics.csv").write_text("round\n0\n")
    proc = medbloom("run", "--data-dir", str(data_root), "--out", str(out), cwd=cwd)
    assert_one_line_error(proc, "--out", str(out), "not an empty directory")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["old-run"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]
    assert (out / "metrics.csv").read_text() == "round\n0\n"
    assert list(cwd.iterdir()) == []


def test_out_under_a_read_only_folder_is_refused(
    tmp_path: Path, cwd: Path, data_root: Path
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root?) can write into a 0o500 folder")
        out = ro / "run"
        proc = medbloom("run", "--data-dir", str(data_root), "--out", str(out), cwd=cwd)
        assert_one_line_error(proc, "--out", str(ro), "not writable")
        assert list(ro.iterdir()) == []
        assert list(cwd.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_badly_typed_flag_is_one_line(
    tmp_path: Path, cwd: Path, data_root: Path, run_cli: Cli
) -> None:
    out = tmp_path / "run"
    proc = run_cli(
        "run", "--data-dir", str(data_root), "--out", str(out), "--num-clients", "ten", cwd=cwd
    )
    assert not out.exists()
    assert_one_line_error(proc, "--num-clients", "ten")


def test_unknown_data_set_message_offers_only_real_names(cwd: Path, run_cli: Cli) -> None:
    proc = run_cli("data", "fetch", "nosuch", "--data-dir", str(cwd / "d"), cwd=cwd)
    line = assert_one_line_error(proc, "--dataset", "nosuch")
    offered = line.split("expected one of ", 1)[1]
    names = [n.strip().removeprefix("or ").strip() for n in offered.split(",")]
    assert names
    unknown = [n for n in names if n not in medmnist.flags()]
    assert not unknown, f"offered but not accepted: {unknown}"


# ----------------------------------------------------------- help and listings


def test_top_level_help_lists_the_commands(cwd: Path) -> None:
    proc = medbloom("--help", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "data", "models"):
        assert command in proc.stdout
    assert "exit with code 2" in proc.stdout


@pytest.mark.parametrize("command", [["run"], ["data", "partition"]])
def test_help_lists_every_config_flag(command: list[str], cwd: Path, run_cli: Cli) -> None:
    proc = run_cli(*command, "--help", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    flags = [f"--{ExperimentConfig.flag(f.name)}" for f in ExperimentConfig.knobs()]
    assert len(flags) == len(ExperimentConfig.knobs())
    for flag in ("--num-clients", "--alpha", "--fraction-train", "--proximal-mu", "--out"):
        assert flag in flags
    for flag in [*flags, "--config"]:
        assert f"{flag} " in proc.stdout or f"{flag}\n" in proc.stdout, flag


def test_run_help_names_the_choices(cwd: Path, run_cli: Cli) -> None:
    proc = run_cli("run", "--help", cwd=cwd)
    text = " ".join(proc.stdout.split())
    for value in ("fedtrimmedavg", "krum", "pathological", "sgd", "balanced", "cuda"):
        assert value in text, value


def test_models_lists_every_model(cwd: Path, run_cli: Cli) -> None:
    proc = run_cli("models", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert names == ["cnn", "resnet10", "resnet18", "resnet50", "vgg16", "scatternet"]


ALL_FLAGS = [
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
]


def test_data_list_lists_every_data_set(cwd: Path, data_root: Path, run_cli: Cli) -> None:
    proc = run_cli("data", "list", "--data-dir", str(data_root), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"data root: {data_root}"
    rows = {line.split()[0]: line.split() for line in lines[2:] if not line.startswith("any ")}
    assert list(rows) == [*ALL_FLAGS, "brain-tumor-mri"]
    assert rows["brain-tumor-mri"][-2:] == ["any", "-"]
    assert "folder:PATH" in lines[-1]
    assert rows["organmnist3d"][1] == "3D"
    assert rows["pneumoniamnist"][-1] == "28"  # the synthetic file is on disk
    assert rows["bloodmnist"][-1] == "-"


def test_data_partition_prints_one_row_per_client(cwd: Path, data_root: Path, run_cli: Cli) -> None:
    proc = run_cli("data", "partition", "--data-dir", str(data_root), "--num-clients", "3", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"pneumoniamnist: dirichlet partition of {N_TRAIN} training")
    assert lines[1].split() == ["client", "train", "val", "normal", "pneumonia"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    counts = [[int(v) for v in r[1:]] for r in rows]
    # local train + val sizes add up to the training set; the label counts are those of
    # each client's whole partition, as in partitions.json
    assert sum(c[0] + c[1] for c in counts) == N_TRAIN
    for train, val, normal, pneumonia in counts:
        assert normal + pneumonia == train + val
        assert train + val >= 10  # --min-partition-size default
        assert val == round(0.1 * (train + val))  # --local-val-fraction default
    assert list(cwd.iterdir()) == []


def test_launch_refuses_batched(tmp_path: Path, cwd: Path, data_root: Path) -> None:
    """Batched training needs every client's data in the server process, which a
    deployment never has: refused before any process starts or anything is written."""
    out = tmp_path / "run"
    proc = medbloom(
        "launch", "--data-dir", str(data_root), "--out", str(out), "--batched", "on", cwd=cwd
    )
    assert_one_line_error(proc, "--batched on", "medbloom run")
    assert not out.exists()


def test_image_size_is_another_name_for_size() -> None:
    from medbloom.cli import build_parser, config_from_args

    parser = build_parser()
    for command in ("run", "launch"):
        by_alias = config_from_args(parser.parse_args([command, "--image-size", "64"]))
        assert by_alias.size == 64
        assert by_alias == config_from_args(parser.parse_args([command, "--size", "64"]))


def test_a_bad_value_in_a_config_file_is_refused_even_where_a_flag_overrides_it(
    tmp_path: Path,
) -> None:
    from medbloom.cli import build_parser, config_from_args
    from medbloom.errors import ConfigError

    bad = tmp_path / "exp.toml"
    bad.write_text("rounds = -3\nnum-clients = 4\n")
    parser = build_parser()
    with pytest.raises(ConfigError, match=r"exp\.toml: --rounds -3 is out of range"):
        config_from_args(parser.parse_args(["run", "--config", str(bad), "--rounds", "5"]))
    good = tmp_path / "good.toml"
    good.write_text("rounds = 3\nnum-clients = 4\n")
    cfg = config_from_args(parser.parse_args(["run", "--config", str(good), "--rounds", "5"]))
    assert (cfg.rounds, cfg.num_clients) == (5, 4)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_resume_from_a_broken_checkpoint_is_one_line_before_anything_starts(
    tmp_path: Path, cwd: Path, data_root: Path, damage: str
) -> None:
    import torch

    from medbloom.experiment import prepare_run

    cfg = ExperimentConfig(data_dir=str(data_root), num_clients=2, out=str(tmp_path / "run"))
    run_dir = prepare_run(cfg)
    (run_dir / "summary.json").write_text('{"status": "interrupted"}')
    latest = run_dir / "checkpoints" / "latest.pt"
    torch.save({"round": 3, "model": {"w": torch.zeros(1000)}, "strategy_state": {}}, latest)
    whole = latest.read_bytes()
    latest.write_bytes(
        {"truncated": whole[: len(whole) // 2], "garbage": b"\x80\x04garbage" * 50, "empty": b""}[
            damage
        ]
    )
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = medbloom("run", "--resume", str(run_dir), cwd=cwd)
    line = assert_one_line_error(proc, "--resume", "latest.pt is unreadable")
    assert "cannot go on from it" in line
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing started
