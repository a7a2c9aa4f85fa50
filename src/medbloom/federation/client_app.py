"""The ClientApp: one hospital trains the global model on its own data and replies with
weights and metrics only."""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from medbloom.config import NO_GLOBAL_MODEL, ExperimentConfig
from medbloom.data.types import DatasetSpec
from medbloom.experiment import ClientData, TensorSplit, client_data
from medbloom.federation import secure
from medbloom.federation.wire import Layout, flat_values
from medbloom.metrics import evaluate_scores, medmnist_acc
from medbloom.models import build_model
from medbloom.personal import KEEPS_STATE, PersonalStore, private_keys
from medbloom.privacy import BudgetExceeded, Ledger, Plan, plan_for, train_private
from medbloom.training import (
    TrainResult,
    client_seed,
    count_correct,
    load_arrays,
    loss_function,
    make_optimizer,
    predict,
    resolve_device,
    resolve_precision,
    set_threads,
    state_arrays,
    train_local,
)

# Ditto's personal model and FedAvg+FT's fine-tuning draw from seeds of their own, apart
# from the hospitals' seeds of the same round (client_seed of partition k + 1 is seed + 1)
PERSONAL_SEED_OFFSET = 0x9E3779B97F4A7C15

_MODELS: dict[tuple[str, str, int, str, str, str], nn.Module] = {}


def _model(cfg: ExperimentConfig, spec: DatasetSpec) -> nn.Module:
    # Built once per process and overwritten with the global weights each round;
    # never with pretrained weights: those come from the server in round 1.
    key = (cfg.model, spec.name, spec.image_size, cfg.pretrained, cfg.freeze, cfg.privacy)
    if key not in _MODELS:
        _MODELS[key] = build_model(
            cfg.model, spec, pretrained=cfg.pretrained, freeze=cfg.freeze, load_weights=False,
            privacy=cfg.privacy,
        )  # fmt: skip
    return _MODELS[key]


def _augmenter(kind: str, spec: DatasetSpec) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if kind == "none":
        return None
    from medbloom.augment import make_augmenter

    # OrganMNIST labels name body sides (left/right kidney, lung, femur): no flips there.
    return make_augmenter(kind, spec.spatial_dims, flip=not spec.name.startswith("organ"))


def site_scores(
    model: nn.Module, data: ClientData, device: torch.device, amp: torch.dtype | None
) -> dict[str, float]:
    """The model as it is now (the global model just received) on this hospital's local
    validation split: ``site_accuracy``, ``site_auc`` (NaN where the split lacks a
    class) and ``site_loss``; nothing when the hospital keeps no validation split."""
    if not len(data.val):
        return {}
    return _scores(model, data.val, data.spec.task, device, amp)


def _scores(
    model: nn.Module,
    split: TensorSplit,
    task: str,
    device: torch.device,
    amp: torch.dtype | None,
    prefix: str = "site_",
    log_prior: torch.Tensor | None = None,
) -> dict[str, float]:
    """``site_accuracy``, ``site_auc`` (NaN where the split lacks a class),
    ``site_balanced_accuracy`` and ``site_loss`` of ``model`` on ``split`` (another
    ``prefix`` than ``site_`` where given).

    ``log_prior``: the hospital's log class frequencies, added back to the logits of a
    personal model trained with ``--class-weighting logit-adjust``. Such a model learns
    as if every class were equally common; the hospital's own model serves the
    hospital's patients, whose class mix is the one it trained on (Menon et al.'s
    post-hoc adjustment, reversed). The global model is scored without it."""
    probs, loss = predict(model, split.x, split.y, task, device=device, amp_dtype=amp)
    if log_prior is not None and len(probs):
        # imported here: scipy, which it pulls in, is no cost to the other strategies
        from medbloom.calibration import calibrated, logits_of

        probs = calibrated(logits_of(probs, task), 1.0, task, log_prior.numpy())
        truth = np.asarray(split.labels).reshape(-1).astype(int)
        loss = float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None)).mean())
    scores = evaluate_scores(split.labels, probs, task)
    return {
        f"{prefix}accuracy": scores["accuracy"],
        f"{prefix}auc": scores["auc"],
        f"{prefix}balanced_accuracy": scores["balanced_accuracy"],
        f"{prefix}loss": loss,
    }


def fit(
    cfg: ExperimentConfig,
    model: nn.Module,
    train: TensorSplit,
    weights: torch.Tensor | None,
    spec: DatasetSpec,
    server_round: int,
    seed: int,
    device: torch.device,
    amp: torch.dtype | None,
    *,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    proximal_to: list[torch.Tensor] | None = None,
    log_prior: torch.Tensor | None = None,
) -> TrainResult:
    """Local training of ``model`` on ``train`` with the run's recipe for
    ``server_round`` (optimizer, learning rate, batch size, augmentation, class
    ``weights`` or the ``log_prior`` of a logit adjustment); ``epochs`` defaults to
    ``--local-epochs``. A hospital's training and the pooled baseline's both come
    through here."""
    return train_local(
        model,
        train.x,
        train.y,
        task=spec.task,
        epochs=epochs or cfg.local_epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer_name(),
        lr=cfg.round_lr(server_round),
        weight_decay=cfg.weight_decay,
        weights=weights,
        log_prior=log_prior,
        proximal_mu=proximal_mu,
        proximal_to=proximal_to,
        seed=seed,
        device=device,
        amp_dtype=amp,
        augment=_augmenter(cfg.augmentation(), spec),
    )


def as_personal(site: Mapping[str, float]) -> dict[str, float]:
    """``personal_*`` scores for a strategy without personal parameters: the model a
    hospital uses is the global one it received, so they are its ``site_*`` scores."""
    return {k.replace("site_", "personal_", 1): v for k, v in site.items()}


def node_config_of(
    cfg: ExperimentConfig, node_config: Mapping[str, Any]
) -> tuple[ExperimentConfig, int, int]:
    """The experiment as this node sees it: its partition and, if set, its own data root.

    A node without ``partition-id`` is a hospital with data of its own: it trains on
    the whole training split under its ``data-dir`` (partition -1).
    """
    pid = int(node_config.get("partition-id", -1))
    num = int(node_config.get("num-partitions", cfg.num_clients))
    if node_config.get("data-dir"):
        cfg = cfg.replace(data_dir=str(node_config["data-dir"]))
    return cfg, pid, num


class Hospital:
    """One hospital's side of a round: its data, the model it trains, what it keeps
    from round to round and how it trains.

    What it keeps lives at the hospital, in files under its state folder (node config
    ``state-dir``; by default the run directory's ``hospitals/`` where that is on this
    machine, else the user's state folder): a restarted hospital process, a resumed run
    and the Ray workers of a simulation (any of which may serve a hospital in a round)
    all read the same record. Today that is the privacy ledger (``--privacy sample``).

    How it trains is :meth:`train`: plain local training (with FedProx's term where the
    strategy asks for it) or DP-SGD; the place where further recipes plug in.
    """

    def __init__(
        self, cfg: ExperimentConfig, node_config: Mapping[str, Any], simulated: bool
    ) -> None:
        self.cfg, self.pid, num = node_config_of(cfg, node_config)
        self.node_config = node_config
        self.simulated = simulated
        self.data = client_data(self.cfg, self.pid, num)

    def state_dir(self) -> Path:
        if self.node_config.get("state-dir"):
            return Path(str(self.node_config["state-dir"])).expanduser()
        out = Path(self.cfg.out) if self.cfg.out else None
        if out is not None and (out / "config.json").is_file():
            return out / "hospitals"
        import platformdirs

        name = out.name if out is not None else "default"
        return Path(platformdirs.user_state_dir("medbloom")) / "hospitals" / name

    def ledger(self) -> Ledger:
        name = f"client_{self.pid}" if self.pid >= 0 else "own-data"
        return Ledger(self.state_dir() / f"privacy-{name}.json")

    def plan(self) -> Plan:
        cfg = self.cfg
        n = len(self.data.train)
        if cfg.delta >= 1 / n:
            raise BudgetExceeded(
                f"--delta {cfg.delta:g} is not below 1/n for this hospital's {n} images"
            )
        return plan_for(
            n, cfg.batch_size, cfg.local_epochs, cfg.rounds, cfg.target_epsilon, cfg.delta,
            cfg.clip_norm,
        )  # fmt: skip

    def train(self, msg: Message) -> Message:
        """Train on this hospital's partition; reply with weights, metrics and
        ``num-examples`` (and with DP-SGD, the epsilon spent so far).

        Under a personalised strategy the hospital also trains and keeps its own model
        (:mod:`medbloom.personal`): its private entries are saved here and the reply
        carries the global values it received in their place, so no message holds
        them; ``personal_*`` scores that model on the local validation split."""
        started = time.perf_counter()
        set_threads()
        cfg, data = self.cfg, self.data
        model, layout, device, amp = self._received_model(msg)
        config = msg.content.config_records["config"]
        server_round = int(cast(int, config.get("server-round", 0)))
        scoring = bool(config.get("site-eval")) and len(data.val) > 0
        seed = client_seed(cfg.seed, server_round, self.pid)
        personal_seed = (seed + PERSONAL_SEED_OFFSET) % 2**63
        privacy: dict[str, float] = {}
        keys = private_keys(cfg.strategy, model, list(state_arrays(model)))
        store = self.personal_store() if cfg.strategy in KEEPS_STATE else None
        # the global values received, where this hospital keeps some of its own
        received: OrderedDict[str, torch.Tensor] = OrderedDict()
        if store is not None:
            received = OrderedDict((k, v.clone()) for k, v in state_arrays(model).items())
        # Every score here is taken before this round's training, of the models as they
        # stood after the last round: the global model received (aggregated last round)
        # and the model this hospital uses, so every strategy is scored a round behind
        # alike. Strategies without a global model score only the hospital's own.
        global_model = cfg.strategy not in NO_GLOBAL_MODEL
        site = {}
        if scoring and global_model:
            site = _scores(model, data.val, data.spec.task, device, amp)
        personal: dict[str, float] = {}
        if cfg.privacy == "sample":
            result, privacy = self._train_private(model, server_round, seed, device)
        elif cfg.strategy == "ditto":
            assert store is not None
            anchor = [p.detach().clone() for p in model.parameters()]
            own = copy.deepcopy(model)
            load_arrays(own, store.before(server_round) or received)
            if scoring:
                personal = _scores(
                    own, data.val, data.spec.task, device, amp, "personal_", data.log_prior
                )
            result = self._fit(model, server_round, seed, device, amp, config)
            self._fit(
                own, server_round, personal_seed, device, amp, config,
                proximal_mu=cfg.ditto_lambda, proximal_to=anchor,
            )  # fmt: skip
            store.save(server_round, state_arrays(own))
        elif cfg.strategy == "fedavg-ft":
            if scoring:  # the global model received, fine-tuned here, then scored
                tuned = copy.deepcopy(model)
                self._fit(
                    tuned, server_round, personal_seed, device, amp, config,
                    epochs=cfg.finetune_epochs,
                )  # fmt: skip
                personal = _scores(
                    tuned, data.val, data.spec.task, device, amp, "personal_", data.log_prior
                )
            result = self._fit(model, server_round, seed, device, amp, config)
        else:
            saved = store.before(server_round) if store is not None else None
            if saved is not None:
                load_arrays(model, {**received, **saved})
            if scoring and store is not None:
                personal = _scores(
                    model, data.val, data.spec.task, device, amp, "personal_", data.log_prior
                )
            elif scoring:  # the model this hospital uses is the global one
                personal = as_personal(site)
            result = self._fit(model, server_round, seed, device, amp, config)
            if store is not None:
                trained = state_arrays(model)
                store.save(server_round, {k: trained[k] for k in keys})
        # With DP-SGD the training loss and accuracy stay here: they are computed on the
        # training images without noise, outside the guarantee the hospital states.
        private = cfg.privacy != "none"
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "train_loss": math.nan if private else result.train_loss,
            "train_accuracy": math.nan if private else result.train_accuracy,
            "lr": cfg.round_lr(server_round),
            "num-examples": result.num_examples,
            "partition-id": self.pid,
            "val-size": len(data.val),
            **site,
            **personal,
            **privacy,
        }
        if cfg.privacy == "hospital":
            metrics["dp-weight"] = 1.0  # each hospital counts once in the private average
        if len(data.val):
            probs, _ = predict(
                model, data.val.x, None, data.spec.task, device=device, amp_dtype=amp
            )
            metrics["local_val_accuracy"] = medmnist_acc(data.val.labels, probs, data.spec.task)
        metrics["seconds"] = time.perf_counter() - started
        sent = state_arrays(model)
        if keys:  # what stays here goes back as the global values received
            sent = OrderedDict((k, received[k] if k in keys else v) for k, v in sent.items())
        packed = layout.pack(sent)
        content = RecordDict({"arrays": packed})
        if secure.RECORD in msg.content.config_records:
            # secure aggregation: Flower's secaggplus_mod masks this update and takes
            # every array record off the reply before it leaves
            legacy, clipped = secure.masked_update_fields(
                flat_values(msg.content.array_records["arrays"]), flat_values(packed),
                result.num_examples, seed,
            )  # fmt: skip
            for name, record in legacy.items():
                content[name] = record
            metrics["secagg-clipped"] = clipped
        content["metrics"] = MetricRecord(metrics)
        return Message(content=content, reply_to=msg)

    def personal_store(self) -> PersonalStore:
        """This hospital's personal parameters in this run (see :class:`PersonalStore`):
        a file named by the hospital and a digest of the run's settings, so that two
        runs sharing a state folder never touch each other's file."""
        import hashlib
        import json

        settings = json.dumps(self.cfg.to_run_config(), sort_keys=True, default=str)
        run = hashlib.sha256(settings.encode()).hexdigest()[:12]
        name = f"client_{self.pid}" if self.pid >= 0 else "own-data"
        return PersonalStore(self.state_dir() / f"personal-{name}-{run}.pt", run)

    def _fit(
        self,
        model: nn.Module,
        server_round: int,
        seed: int,
        device: torch.device,
        amp: torch.dtype | None,
        config: Mapping[str, Any],
        epochs: int | None = None,
        proximal_mu: float | None = None,
        proximal_to: list[torch.Tensor] | None = None,
    ) -> TrainResult:
        """Local training of ``model`` on this hospital's training images with the
        run's recipe (FedProx's term where the strategy asks for it)."""
        data = self.data
        if proximal_mu is None:
            proximal_mu = float(cast(float, config.get("proximal-mu", 0.0)))
        return fit(
            self.cfg, model, data.train, data.weights, data.spec, server_round, seed,
            device, amp, epochs=epochs, proximal_mu=proximal_mu, proximal_to=proximal_to,
            log_prior=data.log_prior,
        )  # fmt: skip

    def _received_model(
        self, msg: Message
    ) -> tuple[nn.Module, Layout, torch.device, torch.dtype | None]:
        """This process's model with the weights ``msg`` carries, their layout, and
        the device and precision to run it in."""
        model = _model(self.cfg, self.data.spec)
        layout = Layout.of(state_arrays(model))
        load_arrays(model, layout.unpack(msg.content.array_records["arrays"]))
        device = resolve_device(self.cfg.device)
        return model, layout, device, resolve_precision(self.cfg.precision, device)

    def score(self, msg: Message) -> Message:
        """Federated evaluation (``--score-model``): the model received, on every image
        this hospital holds (its training and local validation images); nothing is
        trained and only the scores go back."""
        started = time.perf_counter()
        set_threads()
        data = self.data
        model, _, device, amp = self._received_model(msg)
        every = TensorSplit(
            torch.cat([data.train.x, data.val.x]),
            torch.cat([data.train.y, data.val.y]),
            np.concatenate([data.train.labels, data.val.labels]),
        )
        metrics: dict[str, int | float | list[int] | list[float]] = {
            **_scores(model, every, data.spec.task, device, amp),
            "num-examples": len(every),
            "partition-id": self.pid,
            "seconds": time.perf_counter() - started,
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def _train_private(
        self, model: nn.Module, server_round: int, seed: int, device: torch.device
    ) -> tuple[TrainResult, dict[str, float]]:
        """DP-SGD within what this hospital's ledger and its own ceiling allow."""
        cfg, data = self.cfg, self.data
        plan = self.plan()
        ledger = self.ledger()
        after = ledger.epsilon_after(plan)
        ceiling = self.node_config.get("max-epsilon")
        if ceiling is not None and after > float(cast(float, ceiling)):
            raise BudgetExceeded(
                f"hospital {self.pid} refuses round {server_round}: it would bring its "
                f"privacy spent to epsilon {after:.3f} (delta {plan.delta:g}), past its own "
                f"ceiling max-epsilon={float(cast(float, ceiling)):g}; spent so far: "
                f"{ledger.epsilon(plan.delta):.3f}"
            )
        # Simulation: noise from the run's seed, so a run can be repeated. Deployment:
        # from the hospital's own secret, which the server (it knows the seed) cannot
        # reproduce and subtract.
        noise_seed = seed + 1 if self.simulated else (ledger.secret ^ server_round * 1_000_003)
        loss, acc, steps, history = train_private(
            model,
            data.train.x,
            data.train.y,
            plan=plan,
            criterion=loss_function(data.spec.task, data.weights, data.log_prior),
            make_optimizer=lambda m: make_optimizer(
                m, cfg.optimizer_name(), cfg.round_lr(server_round), cfg.weight_decay
            ),
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            seed=seed,
            noise_seed=noise_seed,
            device=device,
            augment=_augmenter(cfg.augmentation(), data.spec),
            correct=lambda logits, y: count_correct(logits, y, data.spec.task),
        )
        if not math.isfinite(loss):
            raise FloatingPointError(f"local training diverged (loss {loss}); lower --lr")
        ledger.record(history)
        spent = {
            "epsilon": ledger.epsilon(plan.delta),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
        }
        return TrainResult(loss, acc, len(data.train), steps), spent


def train_on_message(
    msg: Message,
    context: Context,
    cfg: ExperimentConfig,
    node_config: Mapping[str, Any] | None = None,
    simulated: bool = False,
) -> Message:
    """Train on this node's partition and reply (see :class:`Hospital`).

    ``node_config`` replaces the context's (see ``slot_order`` of :func:`make_client_app`).
    """
    return _hospital(cfg, context, node_config, simulated).train(msg)


def _hospital(
    cfg: ExperimentConfig,
    context: Context,
    node_config: Mapping[str, Any] | None,
    simulated: bool,
) -> Hospital:
    return Hospital(cfg, context.node_config if node_config is None else node_config, simulated)


def score_on_message(
    msg: Message,
    context: Context,
    cfg: ExperimentConfig,
    node_config: Mapping[str, Any] | None = None,
    simulated: bool = False,
) -> Message:
    """Score the model received on this node's images (see :meth:`Hospital.score`),
    with the model settings and image size the server sends (those of the run scored)."""
    from medbloom.experiment import SCORED_SETTINGS

    config = msg.content.config_records["config"]
    cfg = cfg.replace(**{k: config[k] for k in SCORED_SETTINGS if k in config})
    return _hospital(cfg, context, node_config, simulated).score(msg)


def make_client_app(
    cfg: ExperimentConfig | None = None, slot_order: Sequence[int] | None = None
) -> ClientApp:
    """A ClientApp; with ``cfg`` it ignores the run config (used by ``medbloom run``).

    ``slot_order`` (simulation only): the simulated node Flower numbers ``k`` holds
    client ``slot_order[k]``, so the engine, which serves its nodes in number order,
    trains the clients in that order (see :func:`medbloom.experiment.largest_first`).
    The client number is what the node reports and trains on; nothing else changes.
    """
    app = ClientApp(mods=[secure.stages_mod])

    def node_config(context: Context) -> Mapping[str, Any]:
        config = dict(context.node_config)
        if slot_order is not None and "partition-id" in config:
            config["partition-id"] = slot_order[int(cast(int, config["partition-id"]))]
        return config

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Say which partition this node holds, so the server can order nodes by
        client, the same way in every run (node IDs are random); asked (secure
        aggregation), also how many training images it holds."""
        pid = int(node_config(context).get("partition-id", -1))
        metrics: dict[str, int | float | list[int] | list[float]] = {"partition-id": pid}
        if "train-size" in msg.content.config_records:
            run_cfg = cfg or ExperimentConfig.from_mapping(context.run_config, "run config")
            hospital = _hospital(run_cfg, context, node_config(context), cfg is not None)
            metrics["train-size"] = len(hospital.data.train)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg or ExperimentConfig.from_mapping(context.run_config, "run config").validate()
        return train_on_message(msg, context, run_cfg, node_config(context), cfg is not None)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg = cfg or ExperimentConfig.from_mapping(context.run_config, "run config").validate()
        return score_on_message(msg, context, run_cfg, node_config(context), cfg is not None)

    return app


# The component `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
