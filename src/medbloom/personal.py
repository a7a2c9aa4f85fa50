"""Personalised federated learning: which parameters stay at a hospital, and the file
where a hospital keeps them from round to round. Knows nothing of Flower.

- ``local``: the whole model is the hospital's own; nothing is aggregated.
- ``fedper``: the classifier head (the model's ``head`` prefixes) stays at the hospital
  (Arivazhagan et al., 2019).
- ``fedbn``: BatchNorm layers (weights, biases and running statistics) stay at the
  hospital (Li et al., 2021).
- ``ditto``: a whole personal model beside the global one, trained with a pull of
  ``lambda/2 ||v - w_global||^2`` towards the global model received (Li et al., 2021).
- ``fedavg-ft``: nothing kept; the global model received is fine-tuned locally before
  the hospital scores it (FLamby's FedAvg+FT).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medbloom.errors import ConfigError, MedbloomError

log = logging.getLogger("medbloom")

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# the strategies whose hospitals keep parameters from round to round (a PersonalStore)
KEEPS_STATE = ("local", "fedper", "fedbn", "ditto")

# A hospital whose local validation split holds fewer images than this says too little
# about its model (one image is 5 points of ACC): it is counted in ``small_sites`` and
# left out of the personal mean, median and worst, not silently averaged in.
MIN_SITE_IMAGES = 20


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, BATCH_NORMS) for m in model.modules())


def private_keys(strategy: str, model: nn.Module, keys: list[str]) -> list[str]:
    """The entries of the model's exchanged arrays (``keys``, in order) that stay at the
    hospital under ``strategy``: never averaged, never sent in the clear.

    ``ditto`` keeps a second, whole model instead, and ``fedavg-ft`` keeps nothing:
    both send the global model's arrays, so neither has private entries here."""
    if strategy == "local":
        return list(keys)
    if strategy == "fedper":
        head = getattr(model, "head", None)
        if not head:
            raise ConfigError(
                f"--strategy fedper: model {type(model).__name__} does not say which layers "
                "are its classifier head"
            )
        private = [k for k in keys if k.startswith(tuple(head))]
        if private == list(keys):
            raise ConfigError(
                f"--strategy fedper: every trained layer of {type(model).__name__} is its "
                "classifier head, so nothing would be shared; that is --strategy local"
            )
        return private
    if strategy == "fedbn":
        names = [name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
        if not names:
            raise ConfigError(
                "--strategy fedbn keeps BatchNorm layers at each hospital, and this model "
                "has none: use --model resnet18 or resnet50, or another strategy"
            )
        prefixes = tuple(f"{n}." for n in names)
        return [k for k in keys if k.startswith(prefixes)]
    return []


class PersonalStore:
    """A hospital's personal parameters in one run, in a file at the hospital.

    Entries are kept by the round that produced them, the newest two: a round is
    trained from the newest entry of an *earlier* round, so a round that is run again
    after a resume (the run died before the server recorded it) starts from the same
    state as the first time, and the resumed run equals an uninterrupted one.
    ``run`` names the run (its settings that shape the model); a file of another run is
    set aside, never mixed in.
    """

    def __init__(self, path: Path, run: str) -> None:
        self.path = path
        self.run = run
        self.entries: dict[int, dict[str, torch.Tensor]] = {}
        if path.is_file():
            from medbloom.runs import load_checkpoint

            try:
                data = load_checkpoint(path, keys=("run", "entries"))
            except MedbloomError as exc:
                raise MedbloomError(
                    f"the personal model file {path} cannot be used ({exc}); move it away "
                    "to start this hospital's personal model afresh"
                ) from None
            if data.get("run") == run:
                self.entries = {int(r): dict(a) for r, a in data["entries"].items()}
            else:
                log.warning("%s belongs to another run: this hospital starts afresh", path)

    def before(self, server_round: int) -> dict[str, torch.Tensor] | None:
        """The newest personal state from a round before ``server_round``; None: none yet."""
        earlier = [r for r in self.entries if r < server_round]
        return self.entries[max(earlier)] if earlier else None

    def save(self, server_round: int, arrays: Mapping[str, torch.Tensor]) -> None:
        from medbloom.runs import atomic_torch_save

        base = max((r for r in self.entries if r < server_round), default=None)
        kept = {r: a for r, a in self.entries.items() if base is not None and r == base}
        kept[server_round] = {k: v.detach().cpu().clone() for k, v in arrays.items()}
        self.entries = kept
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.path, {"run": self.run, "entries": self.entries})
