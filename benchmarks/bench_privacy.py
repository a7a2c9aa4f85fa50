"""What DP-SGD (--privacy sample) costs a hospital's local training, side by side.

One hospital of the default PneumoniaMNIST experiment (10 hospitals, Dirichlet 0.5, batch
32, one local epoch; its largest, median and smallest partitions) trains one round
plainly (``train_local``) and with DP-SGD (``train_private``: Opacus' per-image gradients,
clipping, noise, Poisson sampling), alternately, ``--reps`` times each on one torch
thread, as a hospital of a simulation does, for each model of ``--models`` (the small CNN,
the default of plain runs, and ScatterNet, the default under ``--privacy sample``).
Prints the median seconds per round of each and their ratio; the ratios are what to
compare between machines. ``scatternet-nocache`` is ScatterNet with its per-process
feature cache off (``MEDBLOOM_SCATTER_CACHE_MB=0``): every round transforms every image
again, as each round's first touch of an image does.

    .venv/bin/python benchmarks/bench_privacy.py [--reps 5]
        [--models cnn,scatternet,scatternet-nocache]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from _common import DATA_DIR, check_data, median, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", default="cnn,scatternet,scatternet-nocache")
    args = parser.parse_args()
    check_data()

    import torch

    from medbloom.config import ExperimentConfig
    from medbloom.data.registry import resolve_size
    from medbloom.experiment import client_data
    from medbloom.models.scatter import configure_feature_cache, default_cache_mb

    torch.set_num_threads(1)
    cfg = ExperimentConfig(data_dir=str(DATA_DIR)).validate()
    cfg = cfg.replace(size=resolve_size(cfg.dataset, cfg.size))
    datas = sorted((client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)),
                   key=lambda d: len(d.train))  # fmt: skip
    picks = {"largest": datas[-1], "median": datas[len(datas) // 2], "smallest": datas[0]}
    rows = []
    for arm in args.models.split(","):
        model_name, _, nocache = arm.partition("-")
        configure_feature_cache(0 if nocache else default_cache_mb())
        rows += [[arm, *row[1:]] for row in _rows(cfg.replace(model=model_name), picks, args.reps)]
    print(table(["model", "hospital", "images", "noise", "plain s/round", "DP-SGD s/round",
                 "ratio"], rows))  # fmt: skip


def _rows(cfg: Any, picks: dict[str, Any], reps: int) -> list[list[Any]]:
    import torch

    from medbloom.experiment import initial_model
    from medbloom.privacy import plan_for, train_private
    from medbloom.training import count_correct, loss_function, make_optimizer, train_local

    dp = cfg.replace(privacy="sample")  # the optimizer and rate --privacy sample trains with
    rows = []
    for name, data in picks.items():
        model = initial_model(cfg, data.spec)
        plan = plan_for(len(data.train), cfg.batch_size, 1, cfg.rounds, 8.0, 1e-5, 1.0)
        plain, private = [], []
        for rep in range(reps):
            m = initial_model(cfg, data.spec)
            t0 = time.perf_counter()
            train_local(m, data.train.x, data.train.y, task=data.spec.task, epochs=1,
                        batch_size=cfg.batch_size, weights=data.weights, seed=rep)  # fmt: skip
            plain.append(time.perf_counter() - t0)
            m = initial_model(cfg, data.spec)
            t0 = time.perf_counter()
            train_private(
                m, data.train.x, data.train.y, plan=plan,
                criterion=loss_function(data.spec.task, data.weights),
                make_optimizer=lambda mod: make_optimizer(mod, dp.optimizer_name(),
                                                          dp.learning_rate()),
                epochs=1, batch_size=cfg.batch_size, seed=rep, noise_seed=rep + 1,
                device=torch.device("cpu"), augment=None,
                correct=functools.partial(count_correct, task=data.spec.task),
            )  # fmt: skip
            private.append(time.perf_counter() - t0)
        del model
        rows.append([cfg.model, name, len(data.train), f"{plan.noise_multiplier:.2f}",
                     f"{median(plain):.2f}", f"{median(private):.2f}",
                     f"{median(private) / median(plain):.2f}x"])  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
