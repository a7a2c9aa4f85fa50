"""Packed weights: one flat array per dtype, checked against the model's layout."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from medbloom.federation.wire import Layout


def _state() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("conv.weight", torch.randn(4, 1, 3, 3, generator=g)),
            ("conv.bias", torch.randn(4, generator=g)),
            ("scale", torch.tensor(2.5)),  # a 0-d tensor
            ("head.weight", torch.randn(2, 4, generator=g, dtype=torch.float64)),
            ("steps", torch.tensor([7, 8], dtype=torch.int64)),
        ]
    )


def test_pack_makes_one_array_per_dtype_and_unpack_restores_every_tensor() -> None:
    state = _state()
    layout = Layout.of(state)
    packed = layout.pack(state)
    assert sorted(packed.keys()) == ["float32", "float64", "int64"]
    assert packed["float32"].shape == (4 * 9 + 4 + 1,)
    assert layout.reference() == {"float32": (41,), "float64": (8,), "int64": (2,)}
    back = layout.unpack(packed)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)


def test_unpack_casts_a_server_optimizers_float64_back_to_the_model_dtype() -> None:
    state = OrderedDict([("w", torch.arange(6, dtype=torch.float32).reshape(2, 3))])
    layout = Layout.of(state)
    wide = ArrayRecord({"float32": Array(np.arange(6, dtype=np.float64))})
    back = layout.unpack(wide)
    assert back["w"].dtype == torch.float32 and torch.equal(back["w"], state["w"])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"weights": np.zeros(6, np.float32)}, "do not fit the model"),
        ({"float32": np.zeros(5, np.float32)}, "holds 5 values, the model needs 6"),
        ({"float32": np.zeros(6, np.int32)}, "holds torch.int32 values"),
    ],
)
def test_unpack_refuses_what_does_not_fit(record: dict[str, np.ndarray], message: str) -> None:
    layout = Layout.of(OrderedDict([("w", torch.zeros(2, 3))]))
    arrays = ArrayRecord({k: Array(v) for k, v in record.items()})
    with pytest.raises(ValueError, match=message):
        layout.unpack(arrays)


def test_pack_refuses_a_state_of_another_model() -> None:
    layout = Layout.of(OrderedDict([("w", torch.zeros(2, 3))]))
    with pytest.raises(ValueError, match=r"tensor w is \(3, 2\)"):
        layout.pack({"w": torch.zeros(3, 2)})
    with pytest.raises(KeyError):
        layout.pack({"v": torch.zeros(2, 3)})
