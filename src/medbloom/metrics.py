"""Evaluation metrics, with ACC and AUC exactly as MedMNIST's own evaluator defines them.

Scores are probabilities, never logits: softmax outputs for single-label tasks,
per-label sigmoid outputs for the multi-label task. Binary tasks use the score of
class 1 with a 0.5 threshold, as ``medmnist.evaluator.getACC`` and ``getAUC`` do.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

# scikit-learn is imported where it is used: it takes about a second to import, and
# a hospital process needs only the accuracy (numpy) for its local validation.

MULTI_LABEL = "multi-label, binary-class"
METRIC_NAMES = ("accuracy", "auc", "balanced_accuracy", "precision", "recall", "f1")


# summary.json's confidence intervals: 1000 resamples put the 2.5th and 97.5th
# percentiles within about 0.003 of their limit on a test split of 600-1300 images.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def _safe_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    # roc_auc_score is undefined when only one class is present (scikit-learn warns
    # and returns NaN); a small validation split can hit that, so it is NaN here, quietly.
    if len(np.unique(y_true)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, y_score))


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """AUC as ``medmnist.evaluator.getAUC`` computes it."""
    if task == MULTI_LABEL:
        return float(
            np.mean([_safe_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])])
        )
    if task == "binary-class":
        score = y_score[:, -1] if y_score.ndim == 2 else y_score
        return _safe_auc(y_true, score)
    aucs = [_safe_auc((y_true == i).astype(float), y_score[:, i]) for i in range(y_score.shape[1])]
    return float(np.mean(aucs))


def medmnist_acc(
    y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5
) -> float:
    """Accuracy as ``medmnist.evaluator.getACC`` computes it (scikit-learn's
    ``accuracy_score``, per label for the multi-label task, then averaged)."""
    y_true = np.asarray(y_true)
    if task == MULTI_LABEL:
        pred = y_score > threshold
        return float(np.mean([np.mean(y_true[:, i] == pred[:, i]) for i in range(y_true.shape[1])]))
    if task == "binary-class":
        score = y_score[:, -1] if y_score.ndim == 2 else y_score
        return float(np.mean(y_true.reshape(-1) == (score > threshold)))
    return float(np.mean(y_true.reshape(-1) == np.argmax(y_score, axis=-1)))


def predictions(y_score: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions, by the same rule the accuracy uses."""
    if task == MULTI_LABEL:
        return (y_score > threshold).astype(np.int64)
    if task == "binary-class":
        return (y_score[:, -1] > threshold).astype(np.int64)
    return np.argmax(y_score, axis=-1)


def evaluate_scores(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """ACC and AUC (MedMNIST definitions) plus balanced accuracy and macro precision/recall/F1.

    For the multi-label task, balanced accuracy, precision, recall and F1 are the
    macro averages over labels of the per-label binary metrics.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on an empty set")
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

    pred = predictions(y_score, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)
        if task == MULTI_LABEL:
            bal = float(
                np.mean(
                    [
                        balanced_accuracy_score(y_true[:, i], pred[:, i])
                        for i in range(y_true.shape[1])
                    ]
                )
            )
            p, r, f, _ = precision_recall_fscore_support(
                y_true, pred, average="macro", zero_division=0
            )
        else:
            labels = np.arange(y_score.shape[1])
            bal = float(balanced_accuracy_score(y_true, pred))
            p, r, f, _ = precision_recall_fscore_support(
                y_true, pred, labels=labels, average="macro", zero_division=0
            )
    return {
        "accuracy": medmnist_acc(y_true, y_score, task),
        "auc": medmnist_auc(y_true, y_score, task),
        "balanced_accuracy": bal,
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
    }


def per_class_report(
    y_true: np.ndarray, y_score: np.ndarray, task: str, class_names: tuple[str, ...]
) -> dict[str, object]:
    """Per-class precision, recall, F1, support, and the confusion matrix (single-label tasks)."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = predictions(np.asarray(y_score, dtype=np.float64), task)
    n = len(class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        p, r, f, s = precision_recall_fscore_support(
            y_true, pred, labels=None if task == MULTI_LABEL else np.arange(n), zero_division=0
        )
    report: dict[str, object] = {
        "class_names": list(class_names),
        "precision": [float(x) for x in p],
        "recall": [float(x) for x in r],
        "f1": [float(x) for x in f],
        "support": [int(x) for x in s],
    }
    if task != MULTI_LABEL:
        report["confusion_matrix"] = confusion_matrix(y_true, pred, labels=np.arange(n)).tolist()
    return report


BOOTSTRAP_METRICS = ("accuracy", "auc", "f1")


class _WeightedAUC:
    """ROC AUC of one binary label under many resamples, after one sort.

    A resample with replacement is the original set with a count per sample, so its
    AUC (Mann-Whitney, ties counted half, as scikit-learn's) follows from the counts of
    positives and negatives at each distinct score: no re-sorting per resample.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        order = np.argsort(s, kind="stable")
        self.order, self.pos = order, np.asarray(y, dtype=bool)[order]
        sorted_s = s[order]
        self.starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])

    def __call__(self, counts: np.ndarray) -> float:
        w = counts[self.order].astype(np.float64)
        p = np.add.reduceat(np.where(self.pos, w, 0.0), self.starts)
        q = np.add.reduceat(np.where(self.pos, 0.0, w), self.starts)
        npos, nneg = p.sum(), q.sum()
        if npos == 0 or nneg == 0:
            return float("nan")
        below = np.cumsum(q) - q  # negatives scored strictly lower
        return float((p * (below + 0.5 * q)).sum() / (npos * nneg))


def _macro_f1(y_true: np.ndarray, pred: np.ndarray, n_labels: int, multi_label: bool) -> float:
    if multi_label:
        tp = (pred & y_true).sum(axis=0)
        fp = (pred & ~y_true).sum(axis=0)
        fn = (~pred & y_true).sum(axis=0)
    else:
        idx = np.arange(n_labels)[:, None]
        t, p = y_true[None, :] == idx, pred[None, :] == idx
        tp, fp, fn = (t & p).sum(axis=1), (~t & p).sum(axis=1), (t & ~p).sum(axis=1)
    denom = 2 * tp + fp + fn
    # scikit-learn's zero_division=0: a class never true nor predicted scores 0
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def _auc_of_resamples(y_true: np.ndarray, y_score: np.ndarray, task: str) -> Any:
    """A function of a resample's per-sample counts giving its MedMNIST AUC."""
    if task == MULTI_LABEL:
        labels = [_WeightedAUC(y_true[:, i], y_score[:, i]) for i in range(y_true.shape[1])]
    elif task == "binary-class":
        labels = [_WeightedAUC(y_true == 1, y_score[:, -1])]
    else:
        labels = [_WeightedAUC(y_true == i, y_score[:, i]) for i in range(y_score.shape[1])]
    return lambda counts: float(np.mean([auc(counts) for auc in labels]))


def bootstrap_intervals(
    y_true: np.ndarray,
    y_score: np.ndarray,
    task: str,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of test ACC, AUC and macro F1.

    ``resamples`` times, the test set is drawn again with replacement (seeded: the same
    ``seed`` gives the same intervals) and the three metrics are computed on the draw;
    the interval is the central ``level`` of those values (2.5th to 97.5th percentile
    for 95%). For single-label tasks the draw is stratified: each class's samples are
    drawn from that class, so every draw holds each class as often as the test set
    does and the AUC (undefined without a class) is defined in every draw exactly when
    it is on the test set. For the multi-label task the draw is plain, and a draw that
    lacks a label's positives or negatives has no AUC and is left out of the AUC
    interval. The point estimates are :func:`evaluate_scores`'; macro F1 here is
    scikit-learn's ``f1_score(average="macro", zero_division=0)`` over the classes
    (labels) of the task.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    n = len(y_true)
    if n == 0:
        raise ValueError("cannot bootstrap an empty set")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level {level} must be in (0, 1) and resamples {resamples} >= 1")
    if task != MULTI_LABEL:
        y_true = y_true.reshape(-1).astype(np.int64)
    pred = predictions(y_score, task)
    if task == MULTI_LABEL:
        y_true, pred = y_true.astype(bool), pred.astype(bool)
        hits = (y_true == pred).mean(axis=1)
    else:
        hits = (y_true == pred).astype(np.float64)
    k = y_score.shape[1] if task != "binary-class" else 2
    auc = _auc_of_resamples(y_true, y_score, task)
    rng = np.random.default_rng(seed)
    # the samples of each stratum (single-label: each class; multi-label: all)
    strata = (
        [np.arange(n)]
        if task == MULTI_LABEL
        else [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    )
    draws: dict[str, list[float]] = {m: [] for m in BOOTSTRAP_METRICS}
    for _ in range(resamples):
        idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
        draws["accuracy"].append(float(hits[idx].mean()))
        draws["auc"].append(auc(np.bincount(idx, minlength=n)))
        draws["f1"].append(_macro_f1(y_true[idx], pred[idx], k, task == MULTI_LABEL))
    tail = (1 - level) / 2 * 100
    out = {}
    for name, values in draws.items():
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        out[name] = (
            [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
            if len(v)
            else [float("nan"), float("nan")]
        )
    return out
