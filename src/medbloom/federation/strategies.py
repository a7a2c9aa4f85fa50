"""Strategy names -> Flower's own strategies, configured from the experiment config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fl

from medbloom.config import STRATEGIES, ExperimentConfig
from medbloom.errors import ConfigError


def build_strategy(cfg: ExperimentConfig) -> Any:
    """The strategy for ``cfg``: Flower's own, wrapped in Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` for ``--privacy hospital``."""
    strategy = _flower_strategy(cfg)
    if cfg.privacy != "hospital":
        return strategy
    from medbloom.federation import flower_internals
    from medbloom.privacy import hospital_accountant, hospital_noise

    flower_internals.clip_zero_updates()
    return fl.DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=hospital_noise(cfg),
        clipping_norm=cfg.clip_norm,
        num_sampled_clients=cfg.num_clients,
        accountant=hospital_accountant(cfg),
    )


def _flower_strategy(cfg: ExperimentConfig) -> fl.FedAvg:
    """A Flower strategy for ``cfg.strategy``.

    Federated (client-side) evaluation is off: medbloom evaluates the global model
    at the server on the held-out splits every round. ``min_available_nodes`` is 1
    because the server loop itself decides how many nodes it waits for.
    """
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 1,
    }
    if cfg.privacy == "hospital":
        # Flower's accounted average needs equal weights: each hospital is one unit
        common["weighted_by_key"] = "dp-weight"
    name = cfg.strategy
    if name == "fedavg":
        return fl.FedAvg(**common)
    if name == "fedprox":
        return fl.FedProx(proximal_mu=cfg.proximal_mu, **common)
    if name in ("fedadam", "fedyogi"):
        # Adaptive server optimizers (Reddi et al., 2021) need a small server step
        # and a tau well above Flower's 1e-9 to stay stable on small models.
        cls = fl.FedAdam if name == "fedadam" else fl.FedYogi
        return cls(eta=cfg.server_lr or 0.01, eta_l=cfg.lr, tau=1e-3, **common)
    if name == "fedavgm":
        return fl.FedAvgM(
            server_learning_rate=cfg.server_lr or 1.0,
            server_momentum=cfg.server_momentum,
            **common,
        )
    if name == "fedmedian":
        return fl.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl.FedTrimmedAvg(beta=cfg.trimmed_beta, **common)
    if name == "krum":
        return fl.Krum(num_malicious_nodes=0, **common)
    raise ConfigError(f"--strategy {name!r} is unknown: expected one of {', '.join(STRATEGIES)}")
