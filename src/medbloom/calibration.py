"""Calibration: expected calibration error, temperature scaling, reliability diagrams.

A model is calibrated when, of the images it gives 80 % confidence, about 80 % are
right. Every run measures it on the test split (expected calibration error, ECE: the
gap between confidence and accuracy, averaged over 15 equal-width confidence bins and
weighted by how many images fall in each) and fits one temperature T on the
*validation* split (Guo et al., 2017): the logits are divided by T before the softmax
(or sigmoid), which changes no prediction's class, only how sure it says it is. T > 1
softens an over-confident model. The test split is never used to fit T, so the ECE
after scaling on it is an honest estimate.

Probabilities are what the run records; the logits are recovered from them (log of the
softmax, which is the logits up to a constant per image; logit of a sigmoid), so the
same functions serve a run's records and a model's outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

MULTI_LABEL = "multi-label, binary-class"
ECE_BINS = 15
# the temperatures searched: far beyond any sensible value at both ends
T_RANGE = (0.05, 20.0)
_EPS = 1e-7


def logits_of(probs: np.ndarray, task: str) -> np.ndarray:
    """Logits (up to a per-image constant for softmax) of recorded probabilities.

    Softmax probabilities are floored at 1e-300 only (a float32 probability can be as
    small as 1e-45): an over-confident model puts many classes below 1e-7, and flooring
    them there would erase how far below they are, which the temperature and the class
    biases are fitted from."""
    p = np.asarray(probs, dtype=np.float64)
    if task == MULTI_LABEL:
        p = np.clip(p, _EPS, 1 - _EPS)
        return np.log(p) - np.log1p(-p)
    return np.log(np.maximum(p, 1e-300))


def calibrated(
    logits: np.ndarray, temperature: float, task: str, bias: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities of ``logits`` divided by ``temperature`` (plus a per-class ``bias``,
    see :func:`fit_class_bias`): softmax, or a sigmoid per label for a multi-label task."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    if task == MULTI_LABEL:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scaled(probs: np.ndarray, temperature: float, task: str) -> np.ndarray:
    """``probs`` with their logits divided by ``temperature``."""
    return calibrated(logits_of(probs, task), temperature, task)


def _confidence_and_correct(
    labels: np.ndarray, probs: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if task == MULTI_LABEL:
        # each label a binary decision: confidence in the state predicted
        y = np.asarray(labels).reshape(probs.shape).astype(bool)
        pred = probs >= 0.5
        conf = np.where(pred, probs, 1 - probs)
        return conf.ravel(), (pred == y).ravel()
    flat = np.asarray(labels).reshape(-1)
    return probs.max(axis=1), probs.argmax(axis=1) == flat


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, task: str, bins: int = ECE_BINS
) -> float:
    """ECE with ``bins`` equal-width bins of top-label confidence (per label for a
    multi-label task); NaN for an empty split."""
    conf, correct = _confidence_and_correct(labels, probs, task)
    if not len(conf):
        return float("nan")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(conf[inside].mean() - correct[inside].mean())
    return float(total / len(conf))


def reliability(
    labels: np.ndarray, probs: np.ndarray, task: str, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, the images in it, their mean confidence and accuracy."""
    conf, correct = _confidence_and_correct(labels, probs, task)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": float(conf[inside].mean()) if n else float("nan"),
                "accuracy": float(correct[inside].mean()) if n else float("nan"),
            }
        )
    return out


def nll(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Mean negative log-likelihood of the labels (per label for multi-label)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    if task == MULTI_LABEL:
        y = np.asarray(labels).reshape(p.shape).astype(np.float64)
        return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())
    idx = np.asarray(labels).reshape(-1).astype(int)
    return float(-np.log(p[np.arange(len(idx)), idx]).mean())


def fit_temperature(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (the
    validation split), searched on log T within :data:`T_RANGE` (bounded Brent); 1.0
    for an empty split."""
    if not len(probs):
        return 1.0
    result = minimize_scalar(
        lambda log_t: nll(labels, scaled(probs, math.exp(log_t), task), task),
        bounds=(math.log(T_RANGE[0]), math.log(T_RANGE[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def fit_class_bias(
    labels: np.ndarray, probs: np.ndarray, task: str
) -> tuple[float, np.ndarray] | None:
    """Bias-corrected temperature scaling (BCTS; Alexandari et al., ICML 2020): one
    temperature T and a bias per class, fitted together on ``labels`` (the validation
    split) by maximum likelihood, so that ``softmax(logits / T + bias)`` is calibrated.

    Unlike T alone, the biases move decisions: a federated model whose hospitals see a
    class seldom (or whose largest hospital does) learns to under-call it, and the
    biases undo that shift in the model's prior, measured on images with the training
    images' class mix. Returns (T, biases centred on 0), or None where it does not
    apply: a multi-label task, or a validation split that lacks a class (its bias
    would run off to minus infinity).
    """
    if task == MULTI_LABEL or not len(probs):
        return None
    z = logits_of(probs, task)
    y = np.asarray(labels).reshape(-1).astype(int)
    k = z.shape[1]
    if np.bincount(y, minlength=k).min() == 0:
        return None
    onehot = np.eye(k)[y]

    def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        t, b = math.exp(params[0]), params[1:]
        s = z / t + b
        s = s - s.max(axis=1, keepdims=True)
        log_p = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        diff = np.exp(log_p) - onehot  # d loss / d s, per image and class
        grad_log_t = -float((diff * z).sum(axis=1).mean()) / t
        return -float(log_p[np.arange(len(y)), y].mean()), np.r_[grad_log_t, diff.mean(0)]

    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    result = minimize(
        loss_and_grad,
        np.r_[math.log(fit_temperature(labels, probs, task)), np.zeros(k)],
        jac=True,
        method="L-BFGS-B",
        bounds=[(low, high)] + [(None, None)] * k,
    )
    bias = result.x[1:] - result.x[1:].mean()
    return float(math.exp(result.x[0])), bias


def _decisions(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy and recall per class of ``probs``' top class."""
    y = np.asarray(labels).reshape(-1).astype(int)
    pred = np.asarray(probs).argmax(axis=1)
    recall = [
        float((pred[y == c] == c).mean()) if (y == c).any() else float("nan")
        for c in range(np.asarray(probs).shape[1])
    ]
    present = [r for r in recall if not math.isnan(r)]
    return {
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "recall": recall,
    }


def class_bias_report(
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    test_labels: np.ndarray,
    test_probs: np.ndarray,
    task: str,
    clean: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """:func:`fit_class_bias` on validation, and what it does to the decisions on the
    test split (and its ``clean`` subset: indices into it): accuracy, balanced accuracy
    and recall per class, without (``before``) and with it (``after``)."""
    fitted = fit_class_bias(val_labels, val_probs, task)
    if fitted is None:
        return None
    t, bias = fitted
    after = calibrated(logits_of(test_probs, task), t, task, bias)
    out: dict[str, Any] = {
        "temperature": t,
        "bias": [float(b) for b in bias],
        "fitted_on": "validation split",
        "test_ece_after": expected_calibration_error(test_labels, after, task),
        "test": {
            "before": _decisions(test_labels, test_probs),
            "after": _decisions(test_labels, after),
        },
    }
    if clean is not None and len(clean):
        labels = np.asarray(test_labels).reshape(-1)[clean]
        out["clean"] = {
            "before": _decisions(labels, np.asarray(test_probs)[clean]),
            "after": _decisions(labels, after[clean]),
        }
    return out


def calibration_report(
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    test_labels: np.ndarray,
    test_probs: np.ndarray,
    task: str,
    clean: np.ndarray | None = None,
) -> dict[str, Any]:
    """Temperature fitted on validation; ECE and NLL on test before and after, with the
    reliability bins of both; and the class-bias correction (:func:`class_bias_report`,
    None where it does not apply)."""
    t = fit_temperature(val_labels, val_probs, task)
    after = scaled(test_probs, t, task)
    return {
        "temperature": t,
        "fitted_on": "validation split",
        "bins": ECE_BINS,
        "test_ece_before": expected_calibration_error(test_labels, test_probs, task),
        "test_ece_after": expected_calibration_error(test_labels, after, task),
        "test_nll_before": nll(test_labels, test_probs, task),
        "test_nll_after": nll(test_labels, after, task),
        "val_ece_before": expected_calibration_error(val_labels, val_probs, task),
        "reliability_before": reliability(test_labels, test_probs, task),
        "reliability_after": reliability(test_labels, after, task),
        "class_bias": class_bias_report(
            val_labels, val_probs, test_labels, test_probs, task, clean
        ),
    }


def plot_reliability(report: dict[str, Any], path: Path, title: str) -> None:
    """The reliability diagram of a :func:`calibration_report`: accuracy against
    confidence per bin, before and after temperature scaling, the diagonal ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for key, label, style in (
        ("reliability_before", f"as trained (ECE {report['test_ece_before']:.3f})", "o-"),
        (
            "reliability_after",
            f"T = {report['temperature']:.2f} (ECE {report['test_ece_after']:.3f})",
            "s-",
        ),
    ):
        pts = [(b["confidence"], b["accuracy"]) for b in report[key] if b["count"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
