"""Strategy names -> Flower's own strategies, configured from the experiment config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fl

from medbloom.config import PERSONAL, STRATEGIES, ExperimentConfig
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
    if name == "fedavg" or name in PERSONAL or name == "pooled":
        # the personalised methods share FedAvg's average of what is not personal;
        # local and pooled aggregate nothing (the round loop never asks them to)
        return fl.FedAvg(**common)
    if name == "fedprox":
        return fl.FedProx(proximal_mu=cfg.proximal_mu, **common)
    if name in ("fedadam", "fedyogi"):
        # Adaptive server optimizers (Reddi et al., 2021) need a small server step
        # and a tau well above Flower's 1e-9 to stay stable on small models.
        cls = fl.FedAdam if name == "fedadam" else fl.FedYogi
        return cls(eta=cfg.server_lr or 0.01, eta_l=cfg.learning_rate(), tau=1e-3, **common)
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


# What a Flower strategy changes while it runs: the server optimizer's arrays
# (FedAdam/FedYogi: current_arrays, m_t, v_t; FedAvgM: current_arrays,
# momentum_vector; the DP wrapper: current_arrays). Everything else is rebuilt from
# the experiment config, so a checkpoint stores only these, as tensors.
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def _layers(strategy: Any) -> list[tuple[str, Any]]:
    """The strategy and the strategies it wraps, outermost first, with a path name."""
    out, path = [], "strategy"
    while strategy is not None:
        out.append((path, strategy))
        strategy, path = getattr(strategy, "strategy", None), f"{path}.strategy"
    return out


def _to_tensors(value: Any) -> Any:
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    if value is None:
        return None
    if isinstance(value, ArrayRecord):
        return {"arrayrecord": {k: torch.from_numpy(np.array(a.numpy())) for k, a in value.items()}}
    if isinstance(value, dict):
        return {"dict": {k: torch.from_numpy(np.array(v)) for k, v in value.items()}}
    if isinstance(value, list):
        return {"list": [torch.from_numpy(np.array(v)) for v in value]}
    raise TypeError(f"strategy state of type {type(value).__name__} cannot be stored as tensors")


def _from_tensors(value: Any) -> Any:
    from flwr.app import Array, ArrayRecord

    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("malformed strategy state")
    ((kind, items),) = value.items()
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(v.numpy()) for k, v in items.items()})
    if kind == "dict":
        return {k: v.numpy() for k, v in items.items()}
    if kind == "list":
        return [v.numpy() for v in items]
    raise ValueError(f"malformed strategy state ({kind!r})")


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The running state of ``strategy`` (and of the strategies it wraps) as plain
    tensors, lists and dicts: what ``torch.load(weights_only=True)`` reads back and no
    loader can turn into code. The privacy accountant is stored apart (JSON)."""
    state: dict[str, Any] = {}
    for path, layer in _layers(strategy):
        for attr in STATE_ATTRIBUTES:
            if hasattr(layer, attr):
                state[f"{path}.{attr}"] = _to_tensors(getattr(layer, attr))
    return state


def restore_strategy(cfg: ExperimentConfig, state: dict[str, Any]) -> Any:
    """The strategy for ``cfg`` with the running state :func:`strategy_state` stored;
    ValueError when the state does not fit the strategy (another strategy's checkpoint)."""
    strategy = build_strategy(cfg)
    expected = strategy_state(strategy).keys()
    if set(state) != set(expected):
        raise ValueError(
            f"the stored strategy state ({', '.join(sorted(state)) or 'none'}) does not fit "
            f"--strategy {cfg.strategy} ({', '.join(sorted(expected)) or 'none'})"
        )
    for path, layer in _layers(strategy):
        for attr in STATE_ATTRIBUTES:
            key = f"{path}.{attr}"
            if key in state:
                setattr(layer, attr, _from_tensors(state[key]))
    return strategy
