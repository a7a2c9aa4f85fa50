"""How model weights travel between the server and the hospitals: packed.

Flower 1.42 (as 1.41) sends every array of an ``ArrayRecord`` as objects of their own (the
array and its chunks), each pushed and pulled with a request of its own, and in a
deployment each request is checked and stored by the SuperLink. A model of 14
tensors makes a message of some 33 objects; ten hospitals make about a thousand
requests a round, on the same cores the hospitals train on.

medbloom therefore sends the weights as one flat array per dtype (``float32`` for
every model here), in the order of the model's state dict. Server and hospitals
build the same model from the same experiment config, so both know the layout;
:class:`Layout` checks that a packed record fits it before anything is loaded.
Flower's strategies work on the packed record unchanged: FedAvg, FedProx, the
server optimizers (FedAdam, FedYogi, FedAdagrad, FedAvgM) and the robust
aggregators are element-wise, or treat the update as one vector, and so give the
same result on one flat array as on the separate tensors.

Checkpoints keep the ordinary state dict (``Layout.unpack``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_bytes(content: RecordDict) -> int:
    """The bytes a message's records carry: array data, byte strings, strings as UTF-8,
    8 for each number or flag (what travels, without Flower's framing)."""
    n = 0
    for arrays in content.array_records.values():
        for array in arrays.values():
            n += len(array.data)
    values: list[Any] = []
    for config in content.config_records.values():
        values.extend(config.values())
    for metrics in content.metric_records.values():
        values.extend(metrics.values())
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            n += len(v) if isinstance(v, bytes) else len(v.encode()) if isinstance(v, str) else 8
    return n


def flat_values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """A packed record's arrays, deserialised: array name -> values."""
    return {key: array.numpy() for key, array in arrays.items()}


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the tensors that travel, in state-dict order."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of a state dict (as made by ``training.state_arrays``)."""
        return cls(tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()))

    def sizes(self) -> dict[str, int]:
        """Packed array name (a dtype) -> number of values it must hold."""
        out: dict[str, int] = {}
        for _, shape, dtype in self.entries:
            key = _dtype_name(dtype)
            out[key] = out.get(key, 0) + math.prod(shape)
        return out

    def reference(self) -> dict[str, tuple[int, ...]]:
        """What a packed record must hold: array name -> shape."""
        return {name: (n,) for name, n in self.sizes().items()}

    def pack(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        """One flat array per dtype, tensors in layout order."""
        groups: dict[str, list[torch.Tensor]] = {}
        for name, shape, dtype in self.entries:
            t = state[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"tensor {name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
                )
            groups.setdefault(_dtype_name(dtype), []).append(t.detach().reshape(-1))
        return ArrayRecord({k: Array(torch.cat(ts).cpu().numpy()) for k, ts in groups.items()})

    def unpack(self, arrays: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
        """The state dict a packed record holds; ValueError if it does not fit."""
        return self.unflatten(flat_values(arrays))

    def unflatten(self, flat_arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
        """:meth:`unpack` for a packed record already deserialised (array name ->
        values); the tensors are views of those values where the dtypes agree."""
        sizes = self.sizes()
        if set(flat_arrays) != set(sizes):
            raise ValueError(
                f"packed arrays {sorted(flat_arrays)} do not fit the model "
                f"(expected {sorted(sizes)}): server and hospitals must run the same "
                "medbloom version and model"
            )
        dtypes = {_dtype_name(dtype): dtype for _, _, dtype in self.entries}
        flat = {}
        for key, n in sizes.items():
            values = torch.from_numpy(flat_arrays[key]).reshape(-1)
            if values.numel() != n:
                raise ValueError(
                    f"packed array {key} holds {values.numel()} values, the model needs {n}"
                )
            if values.dtype != dtypes[key]:
                # Server optimizers (FedAdam...) may hand back float64: cast, as
                # load_state_dict would; an integer array in a float slot is an error.
                if not (values.is_floating_point() and dtypes[key].is_floating_point):
                    raise ValueError(f"packed array {key} holds {values.dtype} values")
                values = values.to(dtypes[key])
            flat[key] = values
        offsets = dict.fromkeys(sizes, 0)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, shape, dtype in self.entries:
            key = _dtype_name(dtype)
            n = math.prod(shape)
            start = offsets[key]
            out[name] = flat[key][start : start + n].view(shape)
            offsets[key] = start + n
        return out
