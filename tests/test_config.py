"""ExperimentConfig: defaults in sync with pyproject.toml, parsing, validation, config files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from medbloom.config import (
    CLASS_WEIGHTINGS,
    DEVICES,
    OPTIMIZERS,
    PARTITIONS,
    STRATEGIES,
    ExperimentConfig,
    load_config_file,
)
from medbloom.errors import ConfigError, MedbloomError

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


@pytest.fixture(scope="module")
def app_config() -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml."""
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    table: dict[str, Any] = data["tool"]["flwr"]["app"]["config"]
    return table


# ------------------------------------------------------------------ defaults


def test_flag_is_kebab_case() -> None:
    assert ExperimentConfig.flag("num_clients") == "num-clients"
    assert ExperimentConfig.flag("min_partition_size") == "min-partition-size"
    assert ExperimentConfig.flag("alpha") == "alpha"


def test_pyproject_has_exactly_the_knobs(app_config: dict[str, Any]) -> None:
    flags = [ExperimentConfig.flag(f.name) for f in ExperimentConfig.knobs()]
    assert len(flags) == len(set(flags))
    assert sorted(app_config) == sorted(flags)


@pytest.mark.parametrize("knob", ExperimentConfig.knobs(), ids=lambda f: f.name)
def test_default_equals_pyproject(knob: dataclasses.Field[Any], app_config: dict[str, Any]) -> None:
    flag = ExperimentConfig.flag(knob.name)
    assert flag in app_config, f"{flag} missing from [tool.flwr.app.config]"
    toml_value = app_config[flag]
    assert toml_value == knob.default
    # Same type: 600.0 in the dataclass must be written 600.0 (a TOML float) too.
    assert type(toml_value) is type(knob.default), (flag, toml_value, knob.default)
    # And the annotation agrees with the default.
    assert knob.type == type(knob.default).__name__


def test_defaults_round_trip_through_pyproject(app_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.from_mapping(app_config, "pyproject.toml")
    assert cfg == ExperimentConfig()
    assert cfg.validate() is cfg
    assert ExperimentConfig().to_run_config() == app_config
    assert load_config_file(PYPROJECT) == app_config


def test_choices_are_declared() -> None:
    choices = {f.name: f.metadata["choices"] for f in ExperimentConfig.knobs()}
    assert choices["partition"] == PARTITIONS == ("iid", "dirichlet", "pathological")
    assert choices["strategy"] == STRATEGIES
    assert "fedavg" in STRATEGIES and "fedprox" in STRATEGIES
    assert choices["optimizer"] == ("auto", *OPTIMIZERS) and OPTIMIZERS == ("adam", "sgd")
    assert choices["device"] == DEVICES == ("auto", "cpu", "cuda")
    assert choices["class_weighting"] == CLASS_WEIGHTINGS


# -------------------------------------------------------------- from_mapping


def test_from_mapping_accepts_kebab_and_snake_keys() -> None:
    cfg = ExperimentConfig.from_mapping(
        {"num-clients": 3, "local_epochs": 4, "min-partition-size": 7, "class_weighting": "none"}
    )
    assert cfg.num_clients == 3
    assert cfg.local_epochs == 4
    assert cfg.min_partition_size == 7
    assert cfg.class_weighting == "none"
    # everything else keeps its default
    assert (
        cfg.replace(
            num_clients=10,
            local_epochs=ExperimentConfig().local_epochs,
            min_partition_size=10,
            class_weighting="balanced",
        )
        == ExperimentConfig()
    )


def test_from_mapping_coerces_compatible_numbers() -> None:
    cfg = ExperimentConfig.from_mapping({"alpha": 1, "rounds": 5.0, "lr": 0.1})
    assert cfg.alpha == 1.0 and type(cfg.alpha) is float
    assert cfg.rounds == 5 and type(cfg.rounds) is int
    assert cfg.lr == 0.1


def test_from_mapping_rejects_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({"num-client": 3}, "my.toml")
    msg = str(info.value)
    assert "my.toml" in msg
    assert "'num-client'" in msg
    assert "num-clients" in msg  # the list of known settings helps spot the typo


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-clients", "ten"),
        ("num-clients", True),
        ("num-clients", 2.5),
        ("num-clients", None),
        ("rounds", [1, 2]),
        ("seed", float("nan")),
        ("dataset", 5),
        ("model", None),
        ("alpha", "high"),
        ("alpha", None),
        ("lr", {"value": 1}),
    ],
)
def test_from_mapping_rejects_wrong_types(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({key: value}, "run config")
    msg = str(info.value)
    assert msg.startswith("run config: ")
    assert key in msg
    assert isinstance(info.value, MedbloomError) and info.value.exit_code == 2


@pytest.mark.parametrize("key", ["alpha", "fraction-train"])
def test_from_mapping_rejects_bool_for_float(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ExperimentConfig.from_mapping({key: True})


# ---------------------------------------------------------------- validate


def test_defaults_validate() -> None:
    cfg = ExperimentConfig()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("alpha", -0.5),
        ("alpha", float("nan")),
        ("alpha", float("inf")),
        ("num_clients", 0),
        ("num_clients", -3),
        ("rounds", 0),
        ("fraction_train", 0.0),
        ("fraction_train", 1.5),
        ("fraction_train", float("nan")),
        ("fraction_train", -0.1),
        ("local_val_fraction", 1.0),
        ("local_val_fraction", -0.1),
        ("classes_per_client", 0),
        ("min_partition_size", 0),
        ("local_epochs", 0),
        ("batch_size", 0),
        ("lr", -0.001),
        ("lr", float("nan")),
        ("weight_decay", -1e-4),
        ("proximal_mu", -0.01),
        ("server_lr", -1.0),
        ("server_momentum", 1.0),
        ("trimmed_beta", 0.5),
        ("trimmed_beta", float("nan")),
        ("round_timeout", 0.0),
        ("round_timeout", float("nan")),
        ("size", -1),
    ],
)
def test_validate_rejects_out_of_range(field: str, value: Any) -> None:
    cfg = ExperimentConfig().replace(**{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    msg = str(info.value)
    flag = "--" + ExperimentConfig.flag(field)
    assert msg.startswith(flag + " "), msg
    assert "out of range" in msg
    assert "expected" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("strategy", "fedfoo"),
        ("strategy", "FedAvg"),
        ("partition", "random"),
        ("optimizer", "rmsprop"),
        ("device", "tpu"),
        ("class_weighting", "inverse"),
    ],
)
def test_validate_rejects_unknown_choice(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig().replace(**{field: value}).validate()
    msg = str(info.value)
    flag = "--" + ExperimentConfig.flag(field)
    assert msg.startswith(f"{flag} {value!r} is unknown"), msg
    choices = next(f for f in ExperimentConfig.knobs() if f.name == field).metadata["choices"]
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize(
    "changes",
    [
        {"fraction_train": 1.0},
        {"fraction_train": 1e-6},
        {"alpha": 1e-3},
        {"local_val_fraction": 0.0},
        {"server_momentum": 0.0},
        {"trimmed_beta": 0.0},
        {"strategy": "krum", "partition": "iid", "optimizer": "sgd", "device": "cpu"},
        {"num_clients": 1, "rounds": 1},
    ],
)
def test_validate_accepts_edges(changes: dict[str, Any]) -> None:
    cfg = ExperimentConfig().replace(**changes)
    assert cfg.validate() is cfg


def test_config_is_frozen() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 1.0  # type: ignore[misc]
    changed = cfg.replace(alpha=1.0)
    assert changed.alpha == 1.0 and cfg.alpha == 0.5


# ------------------------------------------------------------ config files


def test_load_toml_top_level(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('num-clients = 3\nalpha = 0.1\nstrategy = "fedprox"\nlocal_epochs = 1\n')
    values = load_config_file(path)
    assert values == {"num-clients": 3, "alpha": 0.1, "strategy": "fedprox", "local_epochs": 1}
    cfg = ExperimentConfig.from_mapping(values, str(path)).validate()
    assert (cfg.num_clients, cfg.alpha, cfg.strategy, cfg.local_epochs) == (3, 0.1, "fedprox", 1)


def test_load_toml_pyproject_style(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "x"\n\n'
        "[tool.ruff]\nline-length = 100\n\n"
        '[tool.flwr.app]\npublisher = "me"\n\n'
        '[tool.flwr.app.config]\nrounds = 7\npartition = "iid"\n'
    )
    assert load_config_file(path) == {"rounds": 7, "partition": "iid"}
    cfg = ExperimentConfig.from_mapping(load_config_file(path)).validate()
    assert cfg.rounds == 7 and cfg.partition == "iid"


def test_load_json_config_key(tmp_path: Path) -> None:
    # A config.json as a run writes it: the settings under "config", plus other records.
    run_cfg = ExperimentConfig().replace(num_clients=4, seed=7).to_run_config()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"medbloom": "0.1.0", "config": run_cfg}))
    values = load_config_file(path)
    assert values == run_cfg
    assert ExperimentConfig.from_mapping(values) == ExperimentConfig().replace(
        num_clients=4, seed=7
    )


def test_load_json_top_level(tmp_path: Path) -> None:
    path = tmp_path / "exp.JSON"  # suffix is case-insensitive
    path.write_text('{"batch-size": 16, "lr": 0.01}')
    assert load_config_file(path) == {"batch-size": 16, "lr": 0.01}


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"--config {path}: no such file"


def test_load_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path)


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("num-clients = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    msg = str(info.value)
    assert msg.startswith(f"--config {path}: not valid TOML")
    assert "line 1" in msg  # tomllib's own location is kept


def test_load_invalid_toml_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "settings"
    path.write_text("[unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(path)


def test_load_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"rounds": 3,}')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"--config {path}: not valid JSON")


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.toml"
    path.write_bytes(b"\x80\x81\xfe\xff" * 16)
    with pytest.raises(ConfigError, match=r"model\.toml"):
        load_config_file(path)


def test_load_json_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"list\.json"):
        load_config_file(path)


def test_nan_from_file_is_rejected_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text("alpha = nan\n")
    cfg = ExperimentConfig.from_mapping(load_config_file(path), str(path))
    assert math.isnan(cfg.alpha)
    with pytest.raises(ConfigError, match=r"^--alpha nan is out of range"):
        cfg.validate()


# ------------------------------------------------------------------ --lr-schedule
def test_constant_is_lr_every_round() -> None:
    cfg = ExperimentConfig(lr=0.01, rounds=5)
    assert [cfg.round_lr(r) for r in range(1, 8)] == [0.01] * 7


def test_cosine_anneals_over_the_rounds() -> None:
    cfg = ExperimentConfig(lr=0.01, rounds=10, lr_schedule="cosine")
    lrs = [cfg.round_lr(r) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == pytest.approx(0.005)  # half way (round 6 of 10) the rate has halved
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert 0 < lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lrs[-1] < 0.03 * lrs[0]
    assert cfg.round_lr(11) == cfg.round_lr(10) == cfg.round_lr(50)  # resumed with more rounds
    assert cfg.round_lr(0) == cfg.round_lr(1)  # round 0 (never trained) is clamped
    assert ExperimentConfig(lr=0.01, rounds=1, lr_schedule="cosine").round_lr(1) == 0.01


def test_auto_schedule_is_the_data_set_s() -> None:
    assert ExperimentConfig().schedule() == "constant"  # MedMNIST
    assert ExperimentConfig(lr=0.01, rounds=4).round_lr(4) == 0.01
    for dataset in ("brain-tumor-mri", "folder:/data/scans"):
        cfg = ExperimentConfig(dataset=dataset, lr=0.01, rounds=4)
        assert cfg.schedule() == "cosine" and cfg.round_lr(3) == pytest.approx(0.005)
        assert cfg.replace(lr_schedule="constant").round_lr(3) == 0.01  # asked for: kept


def test_auto_augmentation_is_the_data_set_s() -> None:
    assert ExperimentConfig().augmentation() == "none"  # MedMNIST
    for dataset in ("brain-tumor-mri", "folder:/data/scans"):
        cfg = ExperimentConfig(dataset=dataset)
        assert cfg.augmentation() == "flip"
        assert cfg.replace(batched="on").augmentation() == "none"  # batched cannot augment
        cfg.replace(batched="on").validate()  # so auto is allowed with it
        for kind in ("none", "light"):
            assert cfg.replace(augment=kind).augmentation() == kind  # asked for: kept
    with pytest.raises(ConfigError, match="--batched on does not support --augment"):
        ExperimentConfig(batched="on", augment="flip").validate()


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match="--lr-schedule 'step' is unknown"):
        ExperimentConfig(lr_schedule="step").validate()


def test_auto_optimizer_and_learning_rate_follow_the_privacy_mode() -> None:
    """Adam at 0.001 by default; under DP-SGD, SGD at 0.02, which measured best there
    (benchmarks/README.md); a value given is kept."""
    plain = ExperimentConfig()
    assert (plain.optimizer, plain.lr) == ("auto", 0.0)
    assert (plain.optimizer_name(), plain.learning_rate()) == ("adam", 0.001)
    private = ExperimentConfig(privacy="sample")
    assert (private.optimizer_name(), private.learning_rate()) == ("sgd", 0.02)
    assert private.round_lr(3) == 0.02
    hospital = ExperimentConfig(privacy="hospital")
    assert (hospital.optimizer_name(), hospital.learning_rate()) == ("adam", 0.001)
    chosen = ExperimentConfig(privacy="sample", optimizer="adam", lr=0.003)
    assert (chosen.optimizer_name(), chosen.learning_rate()) == ("adam", 0.003)
    assert ExperimentConfig(privacy="sample", optimizer="adam").learning_rate() == 0.001
    with pytest.raises(ConfigError, match="--lr"):
        ExperimentConfig(lr=-0.1).validate()
