"""Evaluation metrics, with ACC and AUC exactly as MedMNIST's own evaluator defines them.

Scores are probabilities, never logits: softmax outputs for single-label tasks,
per-label sigmoid outputs for the multi-label task. Binary tasks use the score of
class 1 with a 0.5 threshold, as ``medmnist.evaluator.getACC`` and ``getAUC`` do.
"""

from __future__ import annotations

import warnings

import numpy as np

# scikit-learn is imported where it is used: it takes about a second to import, and
# a hospital process needs only the accuracy (numpy) for its local validation.

MULTI_LABEL = "multi-label, binary-class"
METRIC_NAMES = ("accuracy", "auc", "balanced_accuracy", "precision", "recall", "f1")


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
