"""Local training and evaluation loops: learning, determinism, FedProx, class weights,
probabilities and losses, devices and pixel scaling."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from medbloom.data.medmnist import spec_for
from medbloom.errors import ConfigError
from medbloom.metrics import MULTI_LABEL
from medbloom.models import build_model
from medbloom.training import (
    TrainResult,
    class_log_prior,
    class_weights,
    labels_tensor,
    loss_function,
    predict,
    resolve_device,
    resolve_precision,
    to_tensor,
    train_local,
)

SIDE = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bright_dark(n: int, seed: int = 0, side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1: bright noisy images (155..255); class 0: dark ones (0..100)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    low = np.where(labels == 1, 155, 0)[:, None, None, None]
    images = (low + rng.integers(0, 101, size=(n, 1, side, side))).astype(np.uint8)
    return to_tensor(images), labels_tensor(labels, "binary-class")


def linear_model(seed: int = 0, outputs: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, outputs))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------- train_local


def test_train_local_learns_a_separable_problem_with_the_cnn() -> None:
    x, y = bright_dark(64)
    torch.manual_seed(0)
    model = build_model("cnn", spec_for("pneumoniamnist", 28))
    # The real CNN works at any size (global pooling): 8x8 keeps this fast.
    _, loss_before = predict(model, x, y, "binary-class")
    result = train_local(model, x, y, task="binary-class", epochs=4, batch_size=16, lr=1e-2)
    probs, loss_after = predict(model, x, y, "binary-class")
    assert isinstance(result, TrainResult)
    assert result.num_examples == 64
    assert result.steps == 4 * 4
    assert math.isfinite(result.train_loss)
    assert 0.0 <= result.train_accuracy <= 1.0
    assert loss_after < 0.5 * loss_before
    assert (probs.argmax(axis=1) == y.numpy()).mean() >= 0.95


def test_train_local_reduces_loss_and_reports_accuracy() -> None:
    x, y = bright_dark(64)
    model = linear_model()
    _, before = predict(model, x, y, "binary-class")
    first = train_local(model, x, y, task="binary-class", epochs=1, batch_size=8, lr=1e-2)
    later = train_local(model, x, y, task="binary-class", epochs=5, batch_size=8, lr=1e-2)
    probs, after = predict(model, x, y, "binary-class")
    assert after < 0.2 * before
    assert later.train_loss < first.train_loss
    assert later.train_accuracy == pytest.approx(1.0)
    assert (probs.argmax(axis=1) == y.numpy()).all()
    # steps: ceil(64 / 8) batches per epoch; a partial last batch counts as a step
    assert first.steps == 8
    odd = train_local(linear_model(), x[:30], y[:30], task="binary-class", epochs=2, batch_size=8)
    assert odd.steps == 2 * 4
    assert odd.num_examples == 30


def test_train_local_multi_label() -> None:
    x, y1 = bright_dark(64)
    # label 0: bright; label 1: dark; label 2: never present
    y = torch.stack([y1.float(), 1 - y1.float(), torch.zeros(64)], dim=1)
    model = linear_model(outputs=3)
    _, before = predict(model, x, y, MULTI_LABEL)
    result = train_local(model, x, y, task=MULTI_LABEL, epochs=6, batch_size=8, lr=1e-2)
    probs, after = predict(model, x, y, MULTI_LABEL)
    assert after < 0.5 * before
    assert result.train_accuracy > 0.8
    assert ((probs > 0.5) == y.numpy().astype(bool)).mean() >= 0.95


def _train_copy(start: nn.Module, seed: int, mu: float = 0.0, **kw: object) -> nn.Module:
    model = copy.deepcopy(start)
    x, y = bright_dark(48, seed=5)
    train_local(
        model,
        x,
        y,
        task="binary-class",
        epochs=2,
        batch_size=8,
        lr=1e-2,
        seed=seed,
        proximal_mu=mu,
        **kw,
    )
    return model


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_local_is_deterministic_in_its_seed(optimizer: str) -> None:
    start = linear_model(seed=3)
    a = _train_copy(start, seed=11, optimizer=optimizer)
    b = _train_copy(start, seed=11, optimizer=optimizer)
    c = _train_copy(start, seed=12, optimizer=optimizer)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a), flat(start))


def test_train_local_does_not_touch_the_global_random_state() -> None:
    start = linear_model(seed=3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _train_copy(start, seed=11)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_proximal_term_keeps_weights_near_the_start(optimizer: str) -> None:
    start = linear_model(seed=4)
    w0 = flat(start)
    free = _train_copy(start, seed=1, mu=0.0, optimizer=optimizer)
    prox = _train_copy(start, seed=1, mu=1.0, optimizer=optimizer)
    strong = _train_copy(start, seed=1, mu=10.0, optimizer=optimizer)
    d_free = (flat(free) - w0).norm()
    d_prox = (flat(prox) - w0).norm()
    d_strong = (flat(strong) - w0).norm()
    assert d_prox < d_free
    assert d_strong < d_prox
    assert d_strong > 0


def test_mu_zero_is_plain_training() -> None:
    start = linear_model(seed=4)
    assert torch.equal(flat(_train_copy(start, seed=1, mu=0.0)), flat(_train_copy(start, seed=1)))


def test_class_weights_change_the_update() -> None:
    start = linear_model(seed=6)
    plain = _train_copy(start, seed=1)
    weighted = _train_copy(start, seed=1, weights=torch.tensor([5.0, 0.5]))
    assert not torch.equal(flat(plain), flat(weighted))


# ---------------------------------------------------------------- class_weights


def test_balanced_weights_for_counts_1_and_9() -> None:
    labels = np.array([0] + [1] * 9)
    w = class_weights(labels, 2, "balanced")
    assert w is not None
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), [5.0, 10 / 18], rtol=1e-6)
    assert float(w[0] / w[1]) == pytest.approx(9.0)
    sk = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    np.testing.assert_allclose(w.numpy(), sk, rtol=1e-6)


def test_balanced_weights_are_capped_at_10_and_floored_at_0_1() -> None:
    # counts [1, 99]: n / (k * count) = 50 for class 0, capped at 10
    w = class_weights(np.array([0] + [1] * 99), 2, "balanced")
    assert w is not None
    np.testing.assert_allclose(w.numpy(), [10.0, 100 / 198], rtol=1e-6)
    # 12 classes present, one with 989 of 1000 samples: 1000 / (12 * 989) < 0.1 -> 0.1
    labels = np.array([0] * 989 + list(range(1, 12)))
    w = class_weights(labels, 12, "balanced")
    assert w is not None
    np.testing.assert_allclose(w.numpy(), [0.1] + [10.0] * 11, rtol=1e-6)


def test_balanced_weights_with_an_absent_class() -> None:
    # classes present: 0 and 2 (k = 2); class 1 is absent and keeps weight 1
    labels = np.array([0] * 3 + [2] * 1)
    w = class_weights(labels, 3, "balanced")
    assert w is not None
    np.testing.assert_allclose(w.numpy(), [4 / 6, 1.0, 2.0], rtol=1e-6)


def test_no_weights() -> None:
    assert class_weights(np.array([0, 1, 1]), 2, "none") is None
    assert class_weights(np.array([], dtype=np.int64), 2, "balanced") is None


def test_multi_label_pos_weight() -> None:
    labels = np.zeros((20, 5), dtype=np.uint8)
    labels[:4, 0] = 1  # 16 negatives / 4 positives = 4
    # label 1: never positive -> 1
    labels[:, 2] = 1  # 0 negatives / 20 positives = 0 -> floored to 0.1
    labels[:1, 3] = 1  # 19 / 1 -> capped at 10
    labels[:10, 4] = 1  # 10 / 10 = 1
    w = class_weights(labels, 5, "balanced")
    assert w is not None
    np.testing.assert_allclose(w.numpy(), [4.0, 1.0, 0.1, 10.0, 1.0], rtol=1e-6)


# ------------------------------------------------------------- logit adjustment


def test_log_prior_is_the_log_of_the_class_frequencies() -> None:
    prior = class_log_prior(np.array([0, 0, 0, 2]), 3, "logit-adjust")
    assert prior is not None
    np.testing.assert_allclose(prior.numpy(), [math.log(0.75), -1e4, math.log(0.25)], rtol=1e-6)
    assert class_log_prior(np.array([0, 1]), 2, "balanced") is None
    assert class_log_prior(np.array([0, 1]), 2, "none") is None
    assert class_log_prior(np.array([], dtype=np.int64), 2, "logit-adjust") is None
    # the two corrections never stack: logit-adjust gives no class weights
    assert class_weights(np.array([0, 0, 1]), 2, "logit-adjust") is None
    with pytest.raises(ConfigError, match="multi-label"):
        class_log_prior(np.zeros((4, 3), dtype=np.uint8), 3, "logit-adjust")


def test_the_logit_adjusted_loss_is_cross_entropy_of_the_shifted_logits() -> None:
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 0, 0, 2, 0])
    prior = class_log_prior(y.numpy(), 3, "logit-adjust")
    assert prior is not None
    loss = loss_function("multi-class", log_prior=prior)(logits, y)
    expected = F.cross_entropy(logits + prior, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # a frequent class needs a wider margin: the loss exceeds plain cross-entropy's
    # where the model favours the rare class, and is below it where it favours the
    # frequent one
    assert not math.isclose(float(loss), float(F.cross_entropy(logits, y)), rel_tol=1e-3)
    with pytest.raises(ValueError, match="do not combine"):
        loss_function("multi-class", torch.ones(3), prior)
    with pytest.raises(ConfigError, match="one label per image"):
        loss_function(MULTI_LABEL, log_prior=prior)


def test_a_class_the_hospital_lacks_gets_no_push_down() -> None:
    # a hospital with classes 0 and 2 only: plain cross-entropy drives the logits of class 1
    # down (its row of the last layer moves); the logit adjustment leaves that row alone
    x, labels = bright_dark(40, seed=3)
    y = labels * 2  # classes 0 and 2 of 3
    prior = class_log_prior(y.numpy(), 3, "logit-adjust")
    start = linear_model(seed=8, outputs=3)
    rows = {}
    for name, kw in (("plain", {}), ("adjusted", {"log_prior": prior})):
        model = copy.deepcopy(start)
        train_local(model, x, y, task="multi-class", epochs=2, batch_size=8, lr=1e-2, **kw)
        rows[name] = model[1].weight.detach()[1] - start[1].weight.detach()[1]
    assert float(rows["plain"].abs().max()) > 1e-3
    assert float(rows["adjusted"].abs().max()) == 0.0


def test_a_uniform_prior_trains_as_plain_cross_entropy() -> None:
    # the same shift on every logit changes no softmax: the update is plain training's
    start = linear_model(seed=9, outputs=2)
    prior = class_log_prior(np.array([0, 1] * 10), 2, "logit-adjust")
    plain, adjusted = _train_copy(start, seed=2), _train_copy(start, seed=2, log_prior=prior)
    torch.testing.assert_close(flat(adjusted), flat(plain), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- predict


def test_predict_softmax_probabilities_and_loss() -> None:
    x, y = bright_dark(10, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 3))
    y3 = y.clone()
    y3[0] = 2
    probs, loss = predict(model, x, y3, "multi-class", batch_size=3)
    assert probs.shape == (10, 3)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert ((probs >= 0) & (probs <= 1)).all()
    with torch.no_grad():
        logits = model(x)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), atol=1e-6)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y3)), rel=1e-5)
    # the batch size changes nothing
    probs_full, loss_full = predict(model, x, y3, "multi-class", batch_size=512)
    np.testing.assert_allclose(probs, probs_full, atol=1e-6)
    assert loss == pytest.approx(loss_full, rel=1e-5)


def test_predict_multi_label_probabilities_and_loss() -> None:
    x, _ = bright_dark(10, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 4))
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 2, size=(10, 4))).float()
    probs, loss = predict(model, x, y, MULTI_LABEL, batch_size=4)
    assert probs.shape == (10, 4)
    assert ((probs >= 0) & (probs <= 1)).all()
    with torch.no_grad():
        logits = model(x)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-6)
    assert loss == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y)), rel=1e-5)


def test_predict_without_labels_gives_nan_loss() -> None:
    x, _ = bright_dark(5)
    probs, loss = predict(linear_model(), x, None, "binary-class")
    assert probs.shape == (5, 2)
    assert math.isnan(loss)


def test_predict_does_not_train() -> None:
    model = build_model("resnet18", spec_for("pneumoniamnist", 28))
    x, y = bright_dark(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(model, x, y, "binary-class")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------ devices and pixels


def test_cuda_without_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ConfigError, match="--device cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu")


def test_to_tensor_scales_pixels_to_minus_one_one() -> None:
    images = np.array([[[0, 255], [127, 128]]], dtype=np.uint8)
    t = to_tensor(images)
    assert t.dtype == torch.float32
    assert t.shape == (1, 2, 2)
    assert float(t[0, 0, 0]) == -1.0
    assert float(t[0, 0, 1]) == 1.0
    assert -0.01 < float(t[0, 1, 0]) < 0 < float(t[0, 1, 1]) < 0.01
    # the uint8 input is left alone
    assert images[0, 0, 1] == 255


def test_labels_tensor_types() -> None:
    assert labels_tensor(np.array([0, 1], dtype=np.uint8), "binary-class").dtype == torch.int64
    ml = labels_tensor(np.array([[0, 1]], dtype=np.uint8), MULTI_LABEL)
    assert ml.dtype == torch.float32


# ------------------------------------------------------------ mixed precision


def test_resolve_precision() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None  # bf16 autocast does not pay on a CPU
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", cpu)


def test_bf16_autocast_trains_and_evaluates_like_fp32() -> None:
    """Under bf16 autocast the CNN learns the same problem; weights stay float32 and the
    probabilities agree with float32 ones to bf16's precision."""
    x, y = bright_dark(64)
    runs = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model("cnn", spec_for("pneumoniamnist", 28))
        res = train_local(
            model, x, y, task="binary-class", epochs=4, batch_size=16, lr=1e-2, amp_dtype=dtype
        )
        probs, loss = predict(model, x, y, "binary-class", amp_dtype=dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        runs[dtype] = (res, probs, loss, model)
    (r32, p32, l32, m32), (r16, p16, l16, _) = runs[None], runs[torch.bfloat16]
    assert math.isfinite(r16.train_loss) and r16.steps == r32.steps
    assert l16 < 0.3 and l32 < 0.3  # both learned the separable problem
    assert (p16.argmax(1) == y.numpy()).mean() == (p32.argmax(1) == y.numpy()).mean() == 1.0
    # the same float32 weights evaluated in bf16: close to the float32 probabilities
    p_mixed, _ = predict(m32, x, y, "binary-class", amp_dtype=torch.bfloat16)
    assert np.abs(p_mixed - p32).max() < 0.05
