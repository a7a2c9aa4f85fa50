"""Train the clients of one round together, as one batched computation.

A federated round trains the same small model on many small local data sets. Run one
client after another, each step is a tiny forward and backward pass; here every
client's weights are stacked along a new leading dimension and ``torch.func.vmap``
runs the step of all clients at once (``functional_call`` over the stacked weights),
with Adam or SGD written out functionally, one state per client.

The result equals :func:`medbloom.training.train_local` run for each client in turn,
up to floating-point rounding: the same seed gives the same batch order, and

* clients with more data take more steps: clients are sorted by their number of
  steps, so at any step the clients still training are a prefix of the stack and the
  step runs on that prefix only; a finished client's weights and optimizer state are
  not touched (its update is a no-op, and costs nothing);
* a client's last batch of an epoch may be short: it is padded to the batch size
  and the padded samples get loss weight 0. The loss is divided by the weight of the
  real samples only (``sum w[y_i] * nll_i / sum w[y_i]`` for class-weighted cross
  entropy, exactly as ``nn.CrossEntropyLoss(weight=w)`` reduces), so loss and
  gradient equal the unpadded ones.

Padding is sound only when samples do not interact within a batch: models with
BatchNorm (batch statistics, running buffers) or dropout (a random stream that
vmap cannot reproduce) raise ``NotImplementedError``, and so does augmentation.
The default small CNN uses GroupNorm, which normalises each sample on its own.
Knows nothing of Flower.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from medbloom.errors import ConfigError
from medbloom.metrics import MULTI_LABEL
from medbloom.training import TrainResult

ClientTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_SGD_MOMENTUM = 0.9


def check_batchable(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` if ``model`` cannot be trained batched exactly."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            raise NotImplementedError(
                f"batched training needs per-sample layers; {name or 'the model'} is "
                f"{type(module).__name__} (batch statistics and running buffers)"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise NotImplementedError(
                f"batched training cannot reproduce the random stream of {name} "
                f"({type(module).__name__})"
            )
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise NotImplementedError(f"batched training does not update buffers: {buffers[:3]}")


def train_clients_batched(
    model: nn.Module,
    clients: Sequence[ClientTensors],
    *,
    task: str,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seeds: Sequence[int],
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[OrderedDict[str, torch.Tensor], TrainResult]]:
    """Train one copy of ``model`` per client, all at once; ``model`` is left unchanged.

    ``clients`` holds each client's ``(x, y, weights)`` (``weights``: its loss weights,
    or None), ``seeds`` its seed. Every other argument means what it means for
    :func:`medbloom.training.train_local`, and the result per client, in the order
    given, is the state dict (on the CPU) and the :class:`TrainResult` that
    ``train_local`` would give on a fresh copy of ``model``, up to rounding.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` is added,
    ``w_start`` being ``model``'s weights.
    """
    if augment is not None:
        raise NotImplementedError("batched training does not support augmentation")
    if optimizer not in ("adam", "sgd"):
        raise ConfigError(f"--optimizer {optimizer!r} is unknown: expected adam or sgd")
    if len(seeds) != len(clients):
        raise ValueError(f"{len(clients)} clients but {len(seeds)} seeds")
    check_batchable(model)
    if not clients:
        return []
    device = device or torch.device("cpu")
    model = model.to(device).train()

    sizes = [len(c[0]) for c in clients]
    steps = [epochs * math.ceil(n / batch_size) for n in sizes]
    # Most steps first: the clients still training at step s are then rows [0, k_s).
    order = sorted(range(len(clients)), key=lambda i: -steps[i])
    num_classes = _num_outputs(model, clients, device)

    x_all = torch.cat([clients[i][0] for i in order]).to(device)
    y_all = torch.cat([clients[i][1] for i in order]).to(device)
    loss_w = torch.stack(
        [_loss_weights(clients[i][2], num_classes, x_all.dtype) for i in order]
    ).to(device)
    index, mask = _batch_plan(
        [sizes[i] for i in order], [seeds[i] for i in order], epochs, batch_size
    )
    index, mask = index.to(device), mask.to(device)
    active = [sum(1 for i in order if steps[i] > s) for s in range(index.shape[0])]

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    count = len(clients)
    params = {n: p.unsqueeze(0).repeat(count, *([1] * p.dim())) for n, p in trainable.items()}
    state1 = {n: torch.zeros_like(p) for n, p in params.items()}
    state2 = {n: torch.zeros_like(p) for n, p in params.items()}

    def loss_of(
        p: dict[str, torch.Tensor],
        xb: torch.Tensor,
        yb: torch.Tensor,
        mb: torch.Tensor,
        wb: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, {**p, **frozen}, (xb,))
        loss = _masked_loss(logits, yb, mb, wb, task)
        if proximal_mu > 0:
            every = {**p, **frozen}
            prox = sum(((every[n] - g) ** 2).sum() for n, g in start.items())
            loss = loss + 0.5 * proximal_mu * prox
        return loss, logits

    step_fn = vmap(grad_and_value(loss_of, has_aux=True))
    total_loss = torch.zeros(count, dtype=torch.float64, device=device)
    total_correct = torch.zeros(count, dtype=torch.float64, device=device)
    seen = mask.sum(dim=2).to(torch.float64)

    for s, k in enumerate(active):
        rows = index[s, :k]
        mb = mask[s, :k]
        yb = y_all[rows]
        p_k = {n: p[:k] for n, p in params.items()}
        grads, (loss, logits) = step_fn(p_k, x_all[rows], yb, mb, loss_w[:k])
        with torch.no_grad():
            _update(
                p_k,
                grads,
                {n: m[:k] for n, m in state1.items()},
                {n: v[:k] for n, v in state2.items()},
                optimizer,
                lr,
                weight_decay,
                s + 1,
            )
            total_loss[:k] += loss.detach().to(torch.float64) * seen[s, :k]
            total_correct[:k] += _correct(logits.detach(), yb, mb, task)

    results: list[tuple[OrderedDict[str, torch.Tensor], TrainResult] | None] = [None] * count
    for row, i in enumerate(order):
        seen_i = float(seen[:, row].sum())
        mean_loss = float(total_loss[row]) / max(seen_i, 1.0)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"local training of client {i} diverged (loss {mean_loss}); lower --lr"
            )
        state = OrderedDict(
            (n, (params[n][row] if n in params else v).detach().cpu().clone())
            for n, v in model.state_dict().items()
        )
        acc = float(total_correct[row]) / max(seen_i, 1.0)
        results[i] = (state, TrainResult(mean_loss, acc, sizes[i], steps[i]))
    return [r for r in results if r is not None]


def _num_outputs(model: nn.Module, clients: Sequence[ClientTensors], device: torch.device) -> int:
    x = next((c[0] for c in clients if len(c[0])), None)
    if x is None:
        return 1
    with torch.no_grad():
        return int(model(x[:1].to(device)).shape[1])


def _loss_weights(
    weights: torch.Tensor | None, num_outputs: int, dtype: torch.dtype
) -> torch.Tensor:
    # No weights is weight 1 for every class (or label): the same mean loss.
    if weights is None:
        return torch.ones(num_outputs, dtype=dtype)
    return weights.to(dtype)


def _batch_plan(
    sizes: Sequence[int], seeds: Sequence[int], epochs: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows into the concatenated data, ``[step, client, slot]``, and the mask of real
    samples. Batch orders come from each client's seed exactly as in ``train_local``."""
    plans: list[list[torch.Tensor]] = []
    offset = 0
    for n, seed in zip(sizes, seeds, strict=True):
        gen = torch.Generator().manual_seed(seed)
        batches: list[torch.Tensor] = []
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            batches.extend(perm[b : b + batch_size] + offset for b in range(0, n, batch_size))
        plans.append(batches)
        offset += n
    total_steps = max((len(p) for p in plans), default=0)
    index = torch.zeros(total_steps, len(sizes), batch_size, dtype=torch.long)
    mask = torch.zeros(total_steps, len(sizes), batch_size, dtype=torch.float32)
    for c, batches in enumerate(plans):
        for s, b in enumerate(batches):
            index[s, c, : len(b)] = b
            index[s, c, len(b) :] = b[0]  # any real row: its loss weight is 0
            mask[s, c, : len(b)] = 1.0
    return index, mask


def _masked_loss(
    logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, task: str
) -> torch.Tensor:
    """The loss ``train_local``'s criterion gives on the real samples of a padded batch."""
    if task == MULTI_LABEL:
        # BCEWithLogitsLoss(pos_weight=w): mean over every (sample, label) element.
        per = F.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="none")
        return (per * mask[:, None]).sum() / (mask.sum() * logits.shape[1])
    # CrossEntropyLoss(weight=w): sum_i w[y_i] nll_i / sum_i w[y_i].
    nll = F.cross_entropy(logits, y, reduction="none")
    sample_w = w[y] * mask
    return (sample_w * nll).sum() / sample_w.sum()


def _correct(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, task: str) -> torch.Tensor:
    if task == MULTI_LABEL:
        hit = ((logits > 0).to(y.dtype) == y).to(torch.float64).mean(dim=2)
    else:
        hit = (logits.argmax(dim=2) == y).to(torch.float64)
    return (hit * mask.to(torch.float64)).sum(dim=1)


def _update(
    params: dict[str, torch.Tensor],
    grads: dict[str, Any],
    state1: dict[str, torch.Tensor],
    state2: dict[str, torch.Tensor],
    optimizer: str,
    lr: float,
    weight_decay: float,
    step: int,
) -> None:
    """One optimizer step, in place, on the views of the training clients' rows.

    The arithmetic is that of ``torch.optim.Adam`` and ``torch.optim.SGD`` (momentum
    0.9) in their single-tensor form, so each client follows its own optimizer.
    """
    for name, p in params.items():
        g = grads[name]
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        if optimizer == "sgd":
            buf = state1[name]
            if step == 1:
                buf.copy_(g)
            else:
                buf.mul_(_SGD_MOMENTUM).add_(g)
            p.add_(buf, alpha=-lr)
            continue
        beta1, beta2 = _ADAM_BETAS
        m, v = state1[name], state2[name]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(_ADAM_EPS)
        p.addcdiv_(m, denom, value=-step_size)
