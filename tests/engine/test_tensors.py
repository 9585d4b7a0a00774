"""The three tensor forms decode to the same tensor, and encode back both ways."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import torch

from service.engine.limits import Limits
from service.engine.tensors import DTYPES, decode, encode, is_tensor_form
from service.errors import TensorError

VALUES = [[1.5, -2.0, 3.25], [4.0, 0.0, -6.5]]


def _forms(values: list[Any], dtype: str) -> list[Any]:
    array = np.asarray(values, dtype="float64")
    t = torch.tensor(array).to(DTYPES[dtype])
    raw = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy().tobytes()
    shape = list(array.shape)
    return [
        values,
        {"dtype": dtype, "shape": shape, "data": array.reshape(-1).tolist()},
        {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode()},
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_three_forms_decode_identically(dtype: str) -> None:
    target = DTYPES[dtype]
    decoded = [decode(form, target) for form in _forms(VALUES, dtype)]
    for t in decoded:
        assert t.dtype == target
        assert t.shape == (2, 3)
        assert torch.equal(t, decoded[0])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64"])
def test_encode_round_trips(dtype: str) -> None:
    t = torch.arange(-3, 9).reshape(3, 4).to(DTYPES[dtype])
    for b64 in (False, True):
        wire = encode(t, b64)
        assert is_tensor_form(wire) == b64
        back = decode(wire, DTYPES[dtype])
        assert torch.equal(back, t)


def test_zero_d_is_a_number() -> None:
    assert encode(torch.tensor(2.0, dtype=torch.float64)) == 2.0
    assert decode(3, torch.float64).shape == ()


def test_float64_survives_exactly() -> None:
    x = 0.1 + 0.2
    assert decode([x], torch.float64).item() == x
    assert encode(decode([x], torch.float64)) == [x]


def test_b64_decodes_without_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The b64 form goes bytes → frombuffer: Python lists never appear."""
    payload = torch.arange(1000, dtype=torch.float32)
    wire = encode(payload, b64=True)
    import service.engine.tensors as tensors

    def no_lists(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("b64 decoding went through numbers")

    monkeypatch.setattr(tensors, "_from_numbers", no_lists)
    assert torch.equal(decode(wire, torch.float32), payload)


@pytest.mark.parametrize(
    "value, message",
    [
        ([[1, 2], [3]], "ragged"),
        ([1, "a"], "numbers"),
        ([True, False], "numbers"),
        ("1.0", "expected a number"),
        (None, "expected a number"),
        ([1, None], "ragged"),
        ([2**70], "range"),
        ({"shape": [2], "data": [1, 2, 3]}, "flat list of 2"),
        ({"shape": [2], "data": [[1], [2]]}, "flat list"),
        ({"shape": [2]}, "exactly one"),
        ({"shape": [1], "data": [1], "b64": "AAAA"}, "exactly one"),
        ({"shape": [2], "data": [1, 2], "extra": 1}, "unknown tensor field"),
        ({"shape": [-1], "data": []}, "non-negative"),
        ({"shape": "2", "data": [1, 2]}, "non-negative"),
        ({"dtype": "complex64", "shape": [1], "data": [1]}, "unknown dtype"),
        ({"dtype": "float32", "shape": [2], "b64": "AAAA"}, "encode 8 bytes"),
        ({"dtype": "float32", "shape": [1], "b64": "AA*AAAAA"}, "not valid base64"),
        ({"dtype": "float32", "shape": [100_000_000], "b64": "AAAA"}, "elements"),
        ([float("nan")], "NaN"),
        ([float("inf")], "NaN"),
        ([1e300], "overflow"),
    ],
)
def test_bad_tensors_are_refused(value: Any, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        decode(value, torch.float32)


def test_element_and_dimension_limits() -> None:
    limits = Limits(tensor_elements=10, tensor_dims=2)
    decode([0.0] * 10, limits=limits)
    with pytest.raises(TensorError, match="11 elements"):
        decode([0.0] * 11, limits=limits)
    with pytest.raises(TensorError, match="dimensions"):
        decode([[[1.0]]], limits=limits)


def test_int64_targets_must_be_integral() -> None:
    assert decode([0, 2, 1], torch.int64).tolist() == [0, 2, 1]
    with pytest.raises(TensorError, match="non-integral"):
        decode([0.5], torch.int64)
