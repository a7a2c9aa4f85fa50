"""Record-level differential privacy: DP-SGD at each hospital, and what it has spent.

With ``--privacy sample`` every hospital trains with Opacus: each image's gradient is
clipped to ``--clip-norm``, Gaussian noise is added to each step's sum, batches are
drawn by Poisson sampling, and Opacus' RDP accountant adds up what each step spends.
Each hospital derives its own noise multiplier from its own number of images, the batch
size, the local epochs and the planned rounds (:func:`plan_for`), so that the whole run
spends at most ``--target-epsilon`` at ``--delta`` per image.

What a hospital has spent is its :class:`Ledger`: the accountant's history, in a JSON
file kept at the hospital (never sent), read before and written after every round. It
survives the hospital's process (a restart, a resumed run), and a round the hospital
trained counts even when the server never recorded it: its images were used. A
hospital may hold a ceiling of its own (``max-epsilon`` in its node config) and refuses
to train a round that would pass it (:class:`BudgetExceeded`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbloom.errors import ConfigError

if TYPE_CHECKING:  # torch loads where a model trains, not where a summary is read
    import torch
    from torch import nn

ACCOUNTANT = "Opacus RDP accountant"
# the models whose layers give per-image gradients (GroupNorm, no BatchNorm)
PRIVATE_MODELS = ("scatternet", "cnn", "resnet10")


def _load_opacus() -> None:
    """Import Opacus without the console handler it installs on the root logger (its
    ``logging.basicConfig`` on import), which printed every DEBUG line of Flower's."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


class BudgetExceeded(RuntimeError):
    """A hospital refuses to train: the round would pass its own epsilon ceiling."""


def check_model(model: nn.Module, name: str) -> None:
    """A model DP-SGD can train, or a ConfigError naming the ones that work: BatchNorm
    mixes the images of a batch, so no image's gradient is its own."""
    _load_opacus()
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        kinds = sorted({type(e).__name__ for e in errors})
        raise ConfigError(
            f"--privacy sample: --model {name} has layers DP-SGD cannot give per-image "
            f"gradients for ({', '.join(kinds)}: BatchNorm mixes the images of a batch); "
            f"use a GroupNorm model: {', '.join(PRIVATE_MODELS)}"
        )


@dataclass(frozen=True)
class Plan:
    """One hospital's DP-SGD settings for the run."""

    noise_multiplier: float
    sample_rate: float  # Poisson sampling: each image's chance to be in a batch
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    clip_norm: float


def plan_for(
    n_images: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    clip_norm: float,
) -> Plan:
    """The noise multiplier with which ``rounds`` rounds of ``local_epochs`` epochs over
    ``n_images`` spend ``target_epsilon`` (Opacus' ``get_noise_multiplier``, RDP), on
    the steps and sample rate Opacus' accountant will record.

    Opacus samples each image with probability 1 / (batches an epoch) and runs
    ``int(1 / that)`` steps, recording a sample rate of 1 over that number: one step
    fewer, and a larger rate, where the division rounds down (93 batches: 92 steps at
    1/92; 153 of the batch counts below 3000). Planning for 1/93 then had the
    accountant report epsilon 8.05 for a target of 8 (Brain Tumor MRI, a hospital of
    2955 images). Planned on what is recorded, the reported epsilon stays within the
    target, and the real one (sampled at 1/93) is lower still."""
    _load_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if n_images < 1:
        raise ValueError("a hospital without training images cannot train")
    batches = int(1.0 / (1.0 / math.ceil(n_images / batch_size)))  # as Opacus counts them
    sample_rate = 1.0 / batches
    steps = local_epochs * batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps * rounds,
            accountant="rdp",
        )
    return Plan(float(sigma), sample_rate, steps, rounds, target_epsilon, delta, clip_norm)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after the steps in ``history`` ((noise multiplier, sample
    rate, steps) entries, as Opacus' RDPAccountant keeps them); 0 for none."""
    _load_opacus()
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta))


class Ledger:
    """What one hospital has spent in one run, kept in a file at the hospital.

    ``secret``: the seed of the hospital's DP noise in a deployment, drawn here and
    never sent (a server that knew it could subtract the noise)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[tuple[float, float, int]] = []
        self.secret = secrets.randbits(63)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
                self.secret = int(data["secret"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # losing the record would understate what was spent: refuse instead
                raise BudgetExceeded(
                    f"the privacy ledger {path} is unreadable ({exc}); this hospital "
                    "cannot tell what it has spent and will not train"
                ) from None

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def epsilon_after(self, plan: Plan) -> float:
        """Epsilon once one more round of ``plan`` is spent."""
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        return epsilon_of([*self.history, step], plan.delta)

    def record(self, history: list[tuple[float, float, int]]) -> None:
        """Add a round's accountant history and write the ledger (atomically)."""
        from medbloom.runs import atomic_write_json

        self.history.extend((float(s), float(q), int(n)) for s, q, n in history)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"history": self.history, "secret": self.secret})


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    plan: Plan,
    criterion: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    epochs: int,
    batch_size: int,
    seed: int,
    noise_seed: int,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    correct: Callable[[torch.Tensor, torch.Tensor], float],
) -> tuple[float, float, int, list[tuple[float, float, int]]]:
    """DP-SGD on one hospital's tensors, in place on ``model``: returns mean loss,
    accuracy, optimizer steps and the accountant's history of this round.

    Trained on a copy that Opacus wraps (its hooks never stay on ``model``), in float32.
    Batches are Poisson-sampled from ``seed``; the noise comes from ``noise_seed``."""
    _load_opacus()
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    work = copy.deepcopy(model).to(device).train()
    criterion = criterion.to(device)  # its class weights or log prior, beside the logits
    for module in work.modules():
        # an in-place activation overwrites the view Opacus' hooks keep
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
    cuda = [device.index or 0] if device.type == "cuda" else []
    total_loss, total_correct, seen, steps = 0.0, 0.0, 0, 0
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        # Opacus warns about secure RNG and about optimizer state on every call
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch_size)
        engine = PrivacyEngine(accountant="rdp")
        noise = torch.Generator(device=device).manual_seed(noise_seed)
        private, optimizer, batches = engine.make_private(
            module=work,
            optimizer=make_optimizer(work),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm,
            poisson_sampling=True,
            noise_generator=noise,
        )
        for _ in range(epochs):
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                if augment is not None and len(xb):
                    xb = augment(xb)
                optimizer.zero_grad(set_to_none=True)
                logits = private(xb)
                loss = criterion(logits, yb)
                loss.backward()
                optimizer.step()  # an empty batch still adds noise and counts
                steps += 1
                if len(xb):
                    with torch.no_grad():
                        total_loss += float(loss) * len(xb)
                        total_correct += correct(logits, yb)
                        seen += len(xb)
    model.load_state_dict(work.state_dict())
    history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    return total_loss / max(seen, 1), total_correct / max(seen, 1), steps, history


HOSPITAL_ACCOUNTANT = "Flower's RdpAccountant (dp-accounting)"


def hospital_accountant(cfg: Any) -> Any:
    """A fresh Flower RdpAccountant for hospital-level DP: neighbouring runs differ by
    one hospital's whole data; no subsampling (every hospital, every round)."""
    from flwr.serverapp import (
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    return RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.delta,
            population_size=cfg.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def hospital_epsilon(cfg: Any, noise_multiplier: float, rounds: int) -> float:
    """Epsilon after ``rounds`` releases at ``noise_multiplier``, by Flower's accountant."""
    from flwr.serverapp import GaussianPrivacyEvent

    accountant = hospital_accountant(cfg)
    event = GaussianPrivacyEvent(noise_multiplier, cfg.num_clients, cfg.num_clients)
    accountant.compose(event, count=rounds)
    return float(accountant.get_epsilon(cfg.delta))


def hospital_noise(cfg: Any) -> float:
    """The smallest noise multiplier (to 0.1 %) with which ``cfg.rounds`` rounds spend at
    most ``cfg.target_epsilon``, found by bisection on Flower's accountant. Kept per
    setting: the search takes about 1.7 s, and a run builds its strategy twice (checked
    when the run is prepared, then built by the server)."""
    return _hospital_noise(cfg.num_clients, cfg.rounds, cfg.target_epsilon, cfg.delta)


@functools.lru_cache(maxsize=16)
def _hospital_noise(num_clients: int, rounds: int, target_epsilon: float, delta: float) -> float:
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        num_clients=num_clients, rounds=rounds, target_epsilon=target_epsilon, delta=delta
    )
    low, high = 1e-3, 1.0
    while hospital_epsilon(cfg, high, cfg.rounds) > cfg.target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigError(f"--target-epsilon {cfg.target_epsilon:g} cannot be reached")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if hospital_epsilon(cfg, mid, cfg.rounds) > cfg.target_epsilon:
            low = mid
        else:
            high = mid
    return high


def describe(summary_privacy: dict[str, Any] | None) -> str:
    """One line for the closing lines, ``medbloom report`` and the dashboard."""
    return _describe_dp(summary_privacy) + _describe_secure(summary_privacy)


def _describe_secure(summary_privacy: dict[str, Any] | None) -> str:
    secure = (summary_privacy or {}).get("secure_aggregation")
    if not secure:
        return ""
    return (
        f"; secure aggregation: the server saw only the sum of the updates, unmasked with "
        f"the key shares of at least {secure['threshold']} hospitals (their metrics travel "
        "in the clear)"
    )


def _describe_dp(summary_privacy: dict[str, Any] | None) -> str:
    if not summary_privacy or summary_privacy.get("mode", "none") == "none":
        return "privacy: no formal privacy guarantee (--privacy none)"
    eps = summary_privacy.get("epsilon")
    spent = "nothing spent yet" if eps is None else f"epsilon {eps:.2f}"
    target = (
        f"target epsilon {summary_privacy['target_epsilon']:g}, clip norm "
        f"{summary_privacy['clip_norm']:g}"
    )
    if summary_privacy["mode"] == "hospital":
        return (
            f"privacy: {spent} (delta {summary_privacy['delta']:g}) per hospital; clipping "
            f"and noise at the server, {target} ({HOSPITAL_ACCOUNTANT})"
        )
    return (
        f"privacy: {spent} (delta {summary_privacy['delta']:g}) per image, the largest "
        f"over the hospitals; DP-SGD at each hospital, {target} ({ACCOUNTANT})"
    )
