"""Calibration of trained models: test ECE before and after temperature scaling.

For each run directory given, the model of ``checkpoints/best.pt`` (the run's best round
by validation AUC) scores the run's validation and test splits; a temperature is fitted
on validation (never test) exactly as a run does when it ends
(:mod:`medbloom.calibration`), and the test split's expected calibration error (15 bins)
and negative log-likelihood are printed before and after. Runs made before calibration
was recorded are measured the same way.

    .venv/bin/python benchmarks/bench_calibration.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()

    from medbloom.calibration import calibration_report
    from medbloom.experiment import load_run_config, server_data
    from medbloom.trained import load_trained
    from medbloom.training import predict

    rows = []
    for run_dir in args.run_dirs:
        cfg = load_run_config(run_dir)
        trained = load_trained(run_dir, "best")
        spec, val, test = server_data(cfg)
        val_p = predict(trained.model, val.x, None, spec.task)[0]
        test_p = predict(trained.model, test.x, None, spec.task)[0]
        r = calibration_report(val.labels, val_p, test.labels, test_p, spec.task)
        rows.append(
            [
                f"{run_dir.parent.name}/{run_dir.name}",
                cfg.dataset,
                str(trained.round),
                f"{r['temperature']:.3f}",
                f"{r['test_ece_before']:.4f}",
                f"{r['test_ece_after']:.4f}",
                f"{r['test_nll_before']:.4f}",
                f"{r['test_nll_after']:.4f}",
            ]
        )
    print(
        table(
            [
                "run",
                "dataset",
                "best round",
                "T",
                "test ECE",
                "ECE after T",
                "test NLL",
                "NLL after T",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
