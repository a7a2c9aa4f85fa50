"""Calibration of trained models: test ECE before and after temperature scaling, and
what the class-bias correction does to their decisions.

For each run directory given, the model of ``checkpoints/best.pt`` (the run's best round
by validation AUC; ``--which final``: ``latest.pt``, the last round) scores the run's
validation and test splits; a temperature is fitted on validation (never test) exactly
as a run does when it ends (:mod:`medbloom.calibration`), and the test split's expected
calibration error (15 bins) and negative log-likelihood are printed before and after.
Then the class-bias correction (BCTS: a temperature and a bias per class, also fitted
on validation) and its decisions on the test split and on the clean test split (the
test images without a twin among the training images, from the run's ``leakage.json``):
accuracy, balanced accuracy and recall per class, without and with it. Runs made
before calibration was recorded are measured the same way.

    .venv/bin/python benchmarks/bench_calibration.py [--which best|final] RUN_DIR [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from _common import table


def clean_indices(run_dir: Path, test_images: int) -> np.ndarray | None:
    """The clean test split's indices, from the run's leakage.json; None without one."""
    try:
        record = json.loads((run_dir / "leakage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not record.get("clean_test"):
        return None
    left = {entry["test_index"] for entry in record.get("left_out", [])}
    return np.array([i for i in range(test_images) if i not in left], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--which", choices=("best", "final"), default="best")
    args = parser.parse_args()

    from medbloom.calibration import calibration_report
    from medbloom.experiment import load_run_config, server_data
    from medbloom.trained import load_trained
    from medbloom.training import predict

    rows, bias_rows = [], []
    for run_dir in args.run_dirs:
        cfg = load_run_config(run_dir)
        trained = load_trained(run_dir, args.which)
        spec, val, test = server_data(cfg)
        val_p = predict(trained.model, val.x, None, spec.task)[0]
        test_p = predict(trained.model, test.x, None, spec.task)[0]
        clean = clean_indices(run_dir, len(test.labels))
        r = calibration_report(val.labels, val_p, test.labels, test_p, spec.task, clean)
        name = f"{run_dir.parent.name}/{run_dir.name}"
        rows.append(
            [
                name,
                cfg.dataset,
                str(trained.round),
                f"{r['temperature']:.3f}",
                f"{r['test_ece_before']:.4f}",
                f"{r['test_ece_after']:.4f}",
                f"{r['test_nll_before']:.4f}",
                f"{r['test_nll_after']:.4f}",
            ]
        )
        b = r["class_bias"]
        if b is None:
            continue

        def pair(split: str, key: str, b: dict[str, Any] = b) -> str:
            if split not in b:
                return "-"
            return f"{b[split]['before'][key]:.3f} -> {b[split]['after'][key]:.3f}"

        recalls = " / ".join(
            f"{x:.3f}->{y:.3f}"
            for x, y in zip(
                b["test"]["before"]["recall"], b["test"]["after"]["recall"], strict=True
            )
        )
        bias_rows.append(
            [
                name,
                str(trained.round),
                pair("test", "accuracy"),
                pair("clean", "accuracy"),
                pair("test", "balanced_accuracy"),
                recalls,
                " ".join(f"{x:+.2f}" for x in b["bias"]),
            ]
        )
    print(
        table(
            [
                "run",
                "dataset",
                f"{args.which} round",
                "T",
                "test ECE",
                "ECE after T",
                "test NLL",
                "NLL after T",
            ],
            rows,
        )
    )
    if bias_rows:
        print()
        print(
            table(
                [
                    "run",
                    "round",
                    "test ACC",
                    "clean ACC",
                    "balanced ACC",
                    "test recall per class",
                    "class biases",
                ],
                bias_rows,
            )
        )


if __name__ == "__main__":
    main()
