"""Metrics against MedMNIST's own evaluator and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from medbloom.metrics import (
    METRIC_NAMES,
    bootstrap_intervals,
    evaluate_scores,
    medmnist_acc,
    medmnist_auc,
    per_class_report,
    predictions,
)

# The official functions (medmnist 3.0.2). Importing the package prints a note about
# torchvision, which it lacks here; the evaluator itself needs only numpy/sklearn/pandas.
evaluator = pytest.importorskip("medmnist.evaluator")
getACC = evaluator.getACC
getAUC = evaluator.getAUC

BINARY = "binary-class"
MULTI = "multi-class"
ORDINAL = "ordinal-regression"
MULTI_LABEL = "multi-label, binary-class"
TASKS = [BINARY, MULTI, ORDINAL, MULTI_LABEL]
CLASSES = {BINARY: 2, MULTI: 8, ORDINAL: 5, MULTI_LABEL: 14}


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_case(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels as medbloom holds them, labels as the official files hold them, scores)."""
    rng = np.random.default_rng(seed)
    k = CLASSES[task]
    if task == MULTI_LABEL:
        y = (rng.random((n, k)) < 0.3).astype(np.uint8)
        y[0], y[1] = 1, 0  # both values in every column
        # scores somewhat informative, so metrics are not all ~0.5
        score = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.5 * (y - 0.5))))
        return y, y, score
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    return y, y.reshape(n, 1).astype(np.uint8), _softmax(logits)


def _pred(task: str, score: np.ndarray) -> np.ndarray:
    if task == MULTI_LABEL:
        return (score > 0.5).astype(int)
    if task == BINARY:
        return (score[:, 1] > 0.5).astype(int)
    return score.argmax(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", TASKS)
def test_acc_and_auc_equal_official(task: str, seed: int) -> None:
    y, y_official, score = random_case(task, 257, seed)
    acc = getACC(y_official, score, task)
    auc = getAUC(y_official, score, task)
    assert 0.3 < acc < 1.0 and 0.5 < auc < 1.0  # a non-trivial case
    assert medmnist_acc(y, score, task) == pytest.approx(acc, rel=1e-12, abs=1e-15)
    assert medmnist_auc(y, score, task) == pytest.approx(auc, rel=1e-12, abs=1e-15)
    result = evaluate_scores(y, score, task)
    assert result["accuracy"] == pytest.approx(acc, rel=1e-12, abs=1e-15)
    assert result["auc"] == pytest.approx(auc, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", [3, 4])
def test_binary_one_column_scores_equal_official(seed: int) -> None:
    y, y_official, score = random_case(BINARY, 101, seed)
    p1 = score[:, 1]
    assert medmnist_acc(y, p1, BINARY) == pytest.approx(getACC(y_official, p1, BINARY))
    assert medmnist_auc(y, p1, BINARY) == pytest.approx(getAUC(y_official, p1, BINARY))


def test_binary_threshold_is_strict() -> None:
    y = np.array([0, 1, 1, 0])
    score = np.array([[0.5, 0.5], [0.4, 0.6], [0.5, 0.5], [0.9, 0.1]])
    # 0.5 is not above the threshold: predicted 0, as getACC does
    assert medmnist_acc(y, score, BINARY) == 0.75 == getACC(y[:, None], score, BINARY)
    assert predictions(score, BINARY).tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("task", TASKS)
def test_other_metrics_equal_sklearn_macro(task: str, seed: int) -> None:
    y, _, score = random_case(task, 300, seed)
    pred = _pred(task, score)
    result = evaluate_scores(y, score, task)
    assert set(result) == set(METRIC_NAMES)
    assert all(type(v) is float for v in result.values())
    np.testing.assert_array_equal(predictions(score, task), pred)
    if task == MULTI_LABEL:
        expected_bal = np.mean(
            [balanced_accuracy_score(y[:, i], pred[:, i]) for i in range(y.shape[1])]
        )
        kwargs: dict[str, object] = {"average": "macro", "zero_division": 0}
    else:
        expected_bal = balanced_accuracy_score(y, pred)
        kwargs = {"average": "macro", "zero_division": 0, "labels": np.arange(CLASSES[task])}
    assert result["balanced_accuracy"] == pytest.approx(expected_bal, rel=1e-12)
    assert result["precision"] == pytest.approx(precision_score(y, pred, **kwargs), rel=1e-12)
    assert result["recall"] == pytest.approx(recall_score(y, pred, **kwargs), rel=1e-12)
    assert result["f1"] == pytest.approx(f1_score(y, pred, **kwargs), rel=1e-12)
    # the binary task is macro over both classes, not sklearn's positive-class default
    if task == BINARY:
        assert result["f1"] != pytest.approx(f1_score(y, pred), rel=1e-6)


def test_macro_counts_classes_never_predicted() -> None:
    # class 2 is in y_true but never predicted: precision 0 for it, included in the mean
    y = np.array([0, 1, 2, 2])
    score = np.eye(3)[[0, 1, 0, 1]]
    result = evaluate_scores(y, score, MULTI)
    assert result["accuracy"] == 0.5
    assert result["precision"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert result["recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("task", TASKS)
def test_perfect_predictor(task: str) -> None:
    y, _, _ = random_case(task, 120, 5)
    if task == MULTI_LABEL:
        score = y.astype(float) * 0.98 + 0.01
    else:
        score = np.full((len(y), CLASSES[task]), 0.01)
        score[np.arange(len(y)), y] = 0.99
    result = evaluate_scores(y, score, task)
    assert result == {name: 1.0 for name in METRIC_NAMES}


def test_auc_nan_when_one_class_present() -> None:
    y = np.zeros(10, np.int64)
    score = _softmax(np.random.default_rng(0).normal(size=(10, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither an exception nor a warning
        assert math.isnan(medmnist_auc(y, score, BINARY))
        result = evaluate_scores(y, score, BINARY)
    assert math.isnan(result["auc"])
    assert result["accuracy"] == medmnist_acc(y, score, BINARY)
    assert result["accuracy"] == float(np.mean(score[:, 1] <= 0.5))


def test_auc_nan_multiclass_and_multilabel_missing_class() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 0, 1, 0, 1])  # class 2 absent
    score = _softmax(rng.normal(size=(6, 3)))
    assert math.isnan(evaluate_scores(y, score, MULTI)["auc"])
    y_ml = np.array([[1, 0], [0, 0], [1, 0]], np.uint8)  # label 1 never positive
    assert math.isnan(medmnist_auc(y_ml, rng.random((3, 2)), MULTI_LABEL))


def test_empty_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate_scores(np.zeros(0, np.int64), np.zeros((0, 2)), BINARY)


@pytest.mark.parametrize("task", [BINARY, MULTI, ORDINAL])
def test_per_class_report_single_label(task: str) -> None:
    y, _, score = random_case(task, 211, 6)
    k = CLASSES[task]
    names = tuple(f"c{i}" for i in range(k))
    report = per_class_report(y, score, task, names)
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (k, k)
    assert cm.sum() == len(y)
    pred = _pred(task, score)
    np.testing.assert_array_equal(cm, confusion_matrix(y, pred, labels=np.arange(k)))
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(y, minlength=k))
    assert report["support"] == np.bincount(y, minlength=k).tolist()
    assert report["class_names"] == list(names)
    expected_recall = (np.diag(cm) / cm.sum(axis=1)).tolist()
    assert report["recall"] == pytest.approx(expected_recall)
    assert report["precision"] == pytest.approx(
        precision_score(y, pred, average=None, labels=np.arange(k), zero_division=0).tolist()
    )
    # the mean of the per-class numbers is the macro number evaluate_scores reports
    assert np.mean(report["f1"]) == pytest.approx(evaluate_scores(y, score, task)["f1"])


def test_per_class_report_counts_unseen_classes() -> None:
    y = np.array([0, 0, 1])
    score = np.eye(4)[[0, 1, 1]]
    report = per_class_report(y, score, MULTI, ("a", "b", "c", "d"))
    assert report["confusion_matrix"] == [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert report["support"] == [2, 1, 0, 0]


def test_per_class_report_multilabel() -> None:
    y, _, score = random_case(MULTI_LABEL, 150, 7)
    names = tuple(f"l{i}" for i in range(14))
    report = per_class_report(y, score, MULTI_LABEL, names)
    assert "confusion_matrix" not in report
    assert report["support"] == y.sum(axis=0).tolist()
    pred = _pred(MULTI_LABEL, score)
    assert report["recall"] == pytest.approx(
        recall_score(y, pred, average=None, zero_division=0).tolist()
    )
    assert len(report["f1"]) == 14


# ------------------------------------------------------------ bootstrap intervals
def test_bootstrap_accuracy_matches_the_binomial_interval() -> None:
    """90 of 400 binary cases wrong: ACC 0.775, whose 95% interval is about
    0.775 +/- 1.96 * sqrt(0.775 * 0.225 / 400) = [0.734, 0.816]."""
    y = np.array([0, 1] * 200)
    score = np.where(y == 1, 0.8, 0.2)
    score[:90] = 1 - score[:90]  # these 90 are predicted wrong
    probs = np.stack([1 - score, score], axis=1)
    ci = bootstrap_intervals(y, probs, "binary-class", resamples=2000, seed=1)
    half = 1.96 * math.sqrt(0.775 * 0.225 / 400)
    assert ci["accuracy"][0] == pytest.approx(0.775 - half, abs=0.01)
    assert ci["accuracy"][1] == pytest.approx(0.775 + half, abs=0.01)
    assert ci["accuracy"][0] < 0.775 < ci["accuracy"][1]


def test_bootstrap_of_a_perfect_model_is_a_point() -> None:
    y = np.array([0, 1, 2, 3] * 25)
    probs = np.eye(4)[y] * 0.9 + 0.025
    ci = bootstrap_intervals(y, probs, "multi-class", resamples=200)
    assert ci == {"accuracy": [1.0, 1.0], "auc": [1.0, 1.0], "f1": [1.0, 1.0]}


@pytest.mark.parametrize("task", ["binary-class", "multi-class", MULTI_LABEL])
def test_bootstrap_brackets_the_point_estimate_and_is_seeded(task: str) -> None:
    rng = np.random.default_rng(5)
    n, k = 300, (2 if task == "binary-class" else 5)
    if task == MULTI_LABEL:
        y = (rng.random((n, k)) < 0.3).astype(np.int64)
        probs = np.clip(0.4 * y + rng.random((n, k)) * 0.6, 0, 1).round(2)  # ties too
    else:
        y = rng.integers(0, k, n)
        probs = rng.random((n, k))
        probs[np.arange(n), y] += 0.6
        probs = (probs / probs.sum(axis=1, keepdims=True)).round(2)
    point = evaluate_scores(y, probs, task)
    ci = bootstrap_intervals(y, probs, task, resamples=500, seed=3)
    for metric in ("accuracy", "auc", "f1"):
        lo, hi = ci[metric]
        assert lo < point[metric] < hi, (metric, lo, point[metric], hi)
        assert hi - lo < 0.25
    assert ci == bootstrap_intervals(y, probs, task, resamples=500, seed=3)
    assert ci != bootstrap_intervals(y, probs, task, resamples=500, seed=4)
    narrow = bootstrap_intervals(y, probs, task, resamples=500, level=0.5, seed=3)
    assert all(narrow[m][1] - narrow[m][0] < ci[m][1] - ci[m][0] for m in ci)


def test_resampled_auc_equals_scikit_learn_s() -> None:
    """The one-sort AUC of a resample is scikit-learn's AUC of that resample (ties too)."""
    from sklearn.metrics import roc_auc_score

    from medbloom.metrics import _WeightedAUC

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = (rng.random(200) + 0.3 * y).round(1)
    auc = _WeightedAUC(y, s)
    for _ in range(5):
        idx = rng.integers(0, 200, 200)
        expected = roc_auc_score(y[idx], s[idx])
        assert auc(np.bincount(idx, minlength=200)) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(auc(np.bincount(np.flatnonzero(y), minlength=200)))  # positives only


def test_bootstrap_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_intervals(np.array([]), np.zeros((0, 2)), "binary-class")
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(np.array([0, 1]), np.eye(2), "binary-class", level=1.5)
