"""What both sides of a federation derive from the config: data, partitions, models.

Everything here is deterministic in the config, so the server and every client
(each in its own process, possibly on its own machine) compute the same partition
map without exchanging it. Results are cached per process: a Flower client
process loads and partitions its data once, not once per round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medbloom.config import ExperimentConfig
from medbloom.data import partition as part
from medbloom.data.audit import Audit, audit_splits, dedup_mask
from medbloom.data.registry import FOLDER_PREFIX, load_dataset, resolve_size, spec_of
from medbloom.data.types import DatasetSpec, ImageSet, Splits
from medbloom.errors import ConfigError, MedbloomError
from medbloom.federation.strategies import build_strategy
from medbloom.metrics import MULTI_LABEL
from medbloom.models import build_model, resolve_model
from medbloom.runs import check_writable, create_run_dir, default_run_dir, run_info
from medbloom.system import longest_first
from medbloom.training import (
    class_log_prior,
    class_weights,
    labels_tensor,
    resolve_device,
    state_arrays,
    to_tensor,
)

log = logging.getLogger("medbloom")


@lru_cache(maxsize=2)
def load_splits(dataset: str, size: int, data_dir: str) -> Splits:
    return load_dataset(dataset, size, data_dir or None)


@lru_cache(maxsize=2)
def load_audit(dataset: str, size: int, data_dir: str, threshold: int) -> Audit:
    """The twins among a data set's images (:mod:`medbloom.data.audit`); the hashes are
    cached on disk, so only the first audit of a data set hashes its images."""
    splits = load_splits(dataset, size, data_dir)
    t0 = time.monotonic()
    audit = audit_splits(splits, threshold)
    log.info("audit of %s: %.1f s", dataset, time.monotonic() - t0)
    return audit


@lru_cache(maxsize=4)
def training_splits(dataset: str, size: int, data_dir: str, dedup: str, threshold: int) -> Splits:
    """The splits with the training images ``--dedup`` keeps (validation and test as
    they are)."""
    splits = load_splits(dataset, size, data_dir)
    if dedup == "none":
        return splits
    keep = dedup_mask(load_audit(dataset, size, data_dir, threshold), dedup)
    return Splits(splits.spec, splits.train.subset(np.flatnonzero(keep)), splits.val, splits.test)


def splits_for(cfg: ExperimentConfig) -> Splits:
    """The data a run trains on: the data set after ``--dedup``."""
    dedup = cfg.dedup
    threshold = cfg.dup_threshold if dedup != "none" else 0
    return training_splits(cfg.dataset, cfg.size, cfg.data_dir, dedup, threshold)


def _partition_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything a partition depends on, besides the data itself; sizes and paths as
    a run records them (``--size 0`` is the data set's default, paths are absolute), so
    a process given the settings as typed finds the partition the run recorded."""
    dedup = cfg.dedup
    paths = absolute_paths(cfg)
    return {
        "dataset": paths.get("dataset", cfg.dataset),
        "size": resolve_size(cfg.dataset, cfg.size),
        "data_dir": paths.get("data_dir", cfg.data_dir),
        "dedup": dedup,
        "dup_threshold": cfg.dup_threshold if dedup != "none" else 0,
        "partition": cfg.partition,
        "num_clients": cfg.num_clients,
        "alpha": cfg.alpha,
        "classes_per_client": cfg.classes_per_client,
        "min_partition_size": cfg.min_partition_size,
        "local_val_fraction": cfg.local_val_fraction,
        "seed": cfg.seed,
    }


def partitions_for(cfg: ExperimentConfig) -> list[part.ClientPartition]:
    """The partition of the training set across clients (seeded, so the same everywhere).

    Where this process can read the run's ``partitions.json`` (a simulation, or a
    launch on one machine), the partition recorded there is used instead of computed:
    Flower Datasets' partitioners import Hugging Face ``datasets`` and seaborn, about
    4 CPU-s in every hospital process before its first round.
    """
    settings = _partition_settings(cfg)
    if cfg.out:
        recorded = _recorded_partitions(Path(cfg.out) / "partitions.json", settings)
        if recorded is not None:
            return recorded
    return _partitions(**settings)


def _recorded_partitions(path: Path, settings: dict[str, Any]) -> list[part.ClientPartition] | None:
    """The partition in ``path`` if it was made with ``settings`` from the data as it is
    now, else None (a client on another machine, or another run's file)."""
    try:
        pmap = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(pmap, dict) or pmap.get("settings") != settings:
        return None  # another run's, or a run recorded before settings were
    try:
        parts = [
            part.ClientPartition(
                int(c["client_id"]),
                np.asarray(c["train_indices"], dtype=np.int64),
                np.asarray(c["val_indices"], dtype=np.int64),
            )
            for c in pmap["clients"]
        ]
        # the data must still be what was partitioned: same labels at the same places
        splits = training_splits(
            settings["dataset"],
            settings["size"],
            settings["data_dir"],
            settings["dedup"],
            settings["dup_threshold"],
        )
        labels, n_classes = splits.train.labels, splits.spec.num_classes
        for p, c in zip(parts, pmap["clients"], strict=True):
            idx = np.concatenate([p.train, p.val])
            if len(idx) and (idx.min() < 0 or idx.max() >= len(labels)):
                return None
            if part.label_counts(labels[idx], n_classes) != c["label_counts"]:
                return None
    except (KeyError, TypeError, ValueError):
        return None
    return parts


@lru_cache(maxsize=2)
def _partitions(
    dataset: str,
    size: int,
    data_dir: str,
    dedup: str,
    dup_threshold: int,
    partition: str,
    num_clients: int,
    alpha: float,
    classes_per_client: int,
    min_partition_size: int,
    local_val_fraction: float,
    seed: int,
) -> list[part.ClientPartition]:
    splits = training_splits(dataset, size, data_dir, dedup, dup_threshold)
    return part.make_partitions(
        splits.train.labels,
        partition,
        num_clients,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_partition_size=min_partition_size,
        local_val_fraction=local_val_fraction,
        seed=seed,
    )


def largest_first(cfg: ExperimentConfig) -> list[int]:
    """The clients in the order a simulation should train them: most training samples
    first (ties by client number).

    Flower's Simulation Engine hands a round's messages to its workers in the order of
    its simulated nodes, and a worker takes the next one when it is free. Longest
    first is the classic rule for finishing such a queue early: with the largest
    client last, one worker trains it alone at the end of every round while the others
    wait. Which client trains where changes no result: local training is seeded per
    (round, client) and replies are aggregated in client order.
    """
    return longest_first([float(len(p.train)) for p in partitions_for(cfg)])


@dataclass(frozen=True)
class TensorSplit:
    """A split as ready-to-use tensors (normalised once), with its numpy labels."""

    x: torch.Tensor
    y: torch.Tensor
    labels: np.ndarray

    @classmethod
    def of(cls, s: ImageSet) -> TensorSplit:
        return cls(to_tensor(s.images), labels_tensor(s.labels, s.task), s.labels)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClientData:
    spec: DatasetSpec
    train: TensorSplit
    val: TensorSplit
    weights: torch.Tensor | None
    log_prior: torch.Tensor | None = None


# Unbounded: a simulation actor serves many clients in turn (10 clients on 2 actors:
# 5 each), and with room for 2 it rebuilt every client's tensors every round. The
# partitions are disjoint, so all entries together are at most the training set once.
@cache
def client_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> ClientData:
    """One client's local train and validation tensors and its loss weights.

    ``partition_id`` -1 means the node's whole training split (its own data).
    """
    if partition_id == -1:
        splits = splits_for(cfg)
        train_idx, val_idx = part.split_local(
            np.arange(len(splits.train)), cfg.local_val_fraction, cfg.seed, 0
        )
        return _client_data(cfg, splits, train_idx, val_idx)
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"this node is one of {num_partitions} partitions but num-clients is "
            f"{cfg.num_clients}: set the federation's num-supernodes to num-clients"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    splits = splits_for(cfg)
    p = partitions_for(cfg)[partition_id]
    return _client_data(cfg, splits, p.train, p.val)


def _client_data(
    cfg: ExperimentConfig, splits: Splits, train_idx: np.ndarray, val_idx: np.ndarray
) -> ClientData:
    train, val = splits.train.subset(train_idx), splits.train.subset(val_idx)
    k, mode = splits.spec.num_classes, cfg.class_weighting
    return ClientData(
        splits.spec,
        TensorSplit.of(train),
        TensorSplit.of(val),
        class_weights(train.labels, k, mode),
        class_log_prior(train.labels, k, mode),
    )


@lru_cache(maxsize=2)
def server_data(cfg: ExperimentConfig) -> tuple[DatasetSpec, TensorSplit, TensorSplit]:
    """The held-out splits the server evaluates on: validation and test."""
    splits = load_splits(cfg.dataset, cfg.size, cfg.data_dir)
    return splits.spec, TensorSplit.of(splits.val), TensorSplit.of(splits.test)


def initial_model(cfg: ExperimentConfig, spec: DatasetSpec) -> nn.Module:
    """The global model of round 0, seeded so every run with this seed starts alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(
            cfg.model, spec, pretrained=cfg.pretrained, freeze=cfg.freeze, privacy=cfg.privacy
        )


def spec_summary(spec: DatasetSpec) -> dict[str, Any]:
    return {
        "task": spec.task,
        "class_names": list(spec.class_names),
        "image_size": spec.image_size,
        "in_channels": spec.in_channels,
        "spatial_dims": spec.spatial_dims,
        "benchmark": spec.benchmark,
        "benchmark_source": "MedMNIST v2 (Yang et al., Scientific Data 2023), centralized training"
        if spec.benchmark
        else None,
        # class-folder sets: unreadable files that were skipped, so the count travels
        # with the results
        "skipped_files": list(spec.extra.get("skipped_files", [])),
    }


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The resolved config a run directory was made with (its ``config.json``)."""
    info_file = run_dir / "config.json"
    if not info_file.is_file():
        raise MedbloomError(f"{run_dir}: not a run directory (no config.json)")
    config = json.loads(info_file.read_text(encoding="utf-8"))["config"]
    # runs recorded before --dedup existed trained on every image
    config.setdefault("dedup", "none")
    # and before --privacy: without any
    config.setdefault("privacy", "none")
    return ExperimentConfig.from_mapping(config, str(info_file)).validate()


def absolute_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """The data root (``--data-dir``, else ``$MEDBLOOM_DATA_DIR``) and a ``folder:PATH``
    data set as absolute paths, so the run's config means the same from any working
    directory (``medbloom launch`` starts its processes in the run directory, and
    ``--resume`` may be run from elsewhere)."""
    out: dict[str, str] = {}
    data_dir = cfg.data_dir or os.environ.get("MEDBLOOM_DATA_DIR", "")
    if data_dir:
        out["data_dir"] = str(Path(data_dir).expanduser().absolute())
    if cfg.dataset.startswith(FOLDER_PREFIX):
        path = Path(cfg.dataset[len(FOLDER_PREFIX) :]).expanduser().absolute()
        out["dataset"] = FOLDER_PREFIX + str(path)
    return out


def check_privacy_plan(cfg: ExperimentConfig, train_sizes: list[int]) -> None:
    """--delta below 1/n for every hospital's n training images, and a noise level
    that spends --target-epsilon over the run for each of them."""
    from medbloom.privacy import plan_for

    largest = max(train_sizes)
    if cfg.delta >= 1 / largest:
        raise ConfigError(
            f"--delta {cfg.delta:g} is out of range: expected a number in (0, 1/n) for every "
            f"hospital's n training images; the largest holds {largest} (1/n = {1 / largest:.3g})"
        )
    for n in sorted(set(train_sizes)):
        try:
            plan_for(
                n, cfg.batch_size, cfg.local_epochs, cfg.rounds, cfg.target_epsilon,
                cfg.delta, cfg.clip_norm,
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(
                f"--target-epsilon {cfg.target_epsilon:g}: no noise level reaches it for a "
                f"hospital of {n} images over {cfg.rounds} rounds ({exc})"
            ) from None


def prepare_run(
    cfg: ExperimentConfig, argv: list[str] | None = None, runs_root: str | os.PathLike[str] = "runs"
) -> Path:
    """Validate everything a run needs, then create its directory.

    Bad settings, a missing or corrupt data file, an impossible partition or an
    unwritable output all fail here, before anything is written.
    """
    cfg.validate()
    if cfg.score_model:
        cfg = scoring_config(cfg)
    spec = spec_of(cfg.dataset, cfg.size)
    if cfg.class_weighting == "logit-adjust" and spec.task == MULTI_LABEL:
        raise ConfigError(
            f"--class-weighting logit-adjust is for tasks with one label per image; "
            f"{cfg.dataset} is multi-label: use balanced or none"
        )
    size = resolve_size(cfg.dataset, cfg.size)
    # what --model auto stands for depends on --privacy: resolve it before anything builds
    cfg = cfg.replace(model=resolve_model(cfg.model, cfg.dataset, size, cfg.privacy))
    model = initial_model(cfg, spec_of(cfg.dataset, cfg.size))
    if cfg.batched == "on":
        from medbloom.batched import check_batchable

        try:
            check_batchable(model)
        except NotImplementedError as exc:
            raise ConfigError(f"--batched on: {exc}; use --batched off") from None
    if cfg.privacy == "sample":
        from medbloom.privacy import check_model

        check_model(model, cfg.model)
    from medbloom.personal import private_keys

    # fedper and fedbn on a model they cannot split: a one-line error before anything
    private_keys(cfg.strategy, model, list(state_arrays(model)))
    build_strategy(cfg)
    resolve_device(cfg.device)
    # config.json records what runs: the size, model, schedule and augmentation that 0 and
    # auto stand for
    cfg = cfg.replace(
        size=size,
        lr_schedule=cfg.schedule(),
        augment=cfg.augmentation(),
        optimizer=cfg.optimizer_name(),
        lr=cfg.learning_rate(),
    )
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg, runs_root)
    out = out.expanduser().absolute()
    check_writable(out)
    splits = splits_for(cfg)
    parts = partitions_for(cfg)
    pmap = part.partition_map(parts, splits.train.labels, splits.spec.class_names)
    if cfg.privacy == "sample":
        check_privacy_plan(cfg, [int(c["num_train"]) for c in pmap["clients"]])
    resolved = cfg.replace(out=str(out), **absolute_paths(cfg))
    # what the clients of this run check before they use the recorded partition
    pmap["settings"] = _partition_settings(resolved)
    files: dict[str, Any] = {"config.json": run_info(resolved, argv), "partitions.json": pmap}
    if cfg.audit == "on" or cfg.dedup != "none":
        audit = load_audit(cfg.dataset, cfg.size, cfg.data_dir, cfg.dup_threshold)
        files["leakage.json"] = leakage_record(audit, len(splits.train), cfg)
    return create_run_dir(out, files)


# the settings a federated evaluation (--score-model) takes from the run it scores: what
# builds the model and what size its images are decoded at
SCORED_SETTINGS = ("model", "pretrained", "freeze", "size")


def scoring_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` for scoring ``cfg.score_model``'s model: its model settings and image
    size, one round, the scored run's directory as an absolute path. A one-line error
    when it is not a run with a best checkpoint, or its classes are not this data set's
    (same names, same order: a class's index is its output unit)."""
    from medbloom.trained import NotARun, class_mapping, run_spec

    source = Path(cfg.score_model).expanduser().absolute()
    src = load_run_config(source)
    if not (source / "checkpoints" / "best.pt").is_file():
        raise NotARun(f"--score-model {source}: no checkpoints/best.pt to score")
    theirs = run_spec(source)
    cfg = cfg.replace(
        model=src.model,
        pretrained=src.pretrained,
        freeze=src.freeze,
        size=theirs.image_size,
        rounds=1,
        score_model=str(source),
    )
    mine = spec_of(cfg.dataset, 0)  # its kind and classes; the size is checked after
    if (mine.in_channels, mine.spatial_dims) != (theirs.in_channels, theirs.spatial_dims):
        raise ConfigError(
            f"--score-model {source}: its model takes {theirs.spatial_dims}D images with "
            f"{theirs.in_channels} channel(s), and {cfg.dataset} has {mine.spatial_dims}D "
            f"images with {mine.in_channels}"
        )
    try:
        mapping = class_mapping(theirs.class_names, mine.class_names)
    except ConfigError as exc:
        raise ConfigError(f"--score-model {source}: {exc}") from None
    if len(mine.class_names) != len(theirs.class_names) or list(mapping) != list(
        range(len(mapping))
    ):
        raise ConfigError(
            f"--score-model {source}: its classes ({', '.join(theirs.class_names)}) are not "
            f"{cfg.dataset}'s ({', '.join(mine.class_names)}) in the same order"
        )
    return cfg


def leakage_record(audit: Audit, n_train: int, cfg: ExperimentConfig) -> dict[str, Any]:
    """``leakage.json``: what the audit found, what ``--dedup`` removed, and each test
    image the clean split leaves out with its nearest training twin."""
    from medbloom.leakage import clean_test_record, test_twin_list

    return {
        "audit": audit.summary(),
        "dedup": {
            "mode": cfg.dedup,
            "training_images": audit.sizes["train"],
            "kept": n_train,
            "removed": audit.sizes["train"] - n_train,
        },
        "clean_test": clean_test_record(audit) if cfg.audit == "on" else None,
        "left_out": test_twin_list(audit) if cfg.audit == "on" else [],
    }
