"""The three wire forms of a tensor, both ways.

- a JSON number (0-d) or nested arrays of numbers, shape inferred (ragged is an error);
- ``{"dtype", "shape", "data"}``: a flat, row-major list;
- ``{"dtype", "shape", "b64"}``: base64 of the raw little-endian bytes, decoded with
  ``torch.frombuffer`` so that large batches never become Python lists.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import torch

from service.engine.limits import DEFAULT_LIMITS, Limits
from service.errors import TensorError, short

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_FORM_KEYS = {"dtype", "shape", "data", "b64"}


def dtype_of(name: object) -> torch.dtype:
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise TensorError(f"unknown dtype {short(name)}; expected one of {', '.join(DTYPES)}")


def is_tensor_form(value: object) -> bool:
    """True for the object forms (``data`` or ``b64``), as opposed to a map of named tensors."""
    return (
        isinstance(value, dict)
        and ("data" in value or "b64" in value)
        and value.keys() <= _FORM_KEYS
    )


def decode(
    value: Any, dtype: torch.dtype = torch.float32, limits: Limits = DEFAULT_LIMITS
) -> torch.Tensor:
    """Any wire form to a tensor of ``dtype`` (the form's own ``dtype`` says how to read it).
    A tensor already decoded (a training job's slice of its dataset) is only converted."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == dtype else value.to(dtype)
    if isinstance(value, dict):
        tensor = _decode_object(value, limits)
    else:
        tensor = _from_numbers(value, limits)
    return _convert(tensor, dtype)


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise TensorError("tensor holds NaN or Infinity; only finite numbers are accepted")
    if dtype == torch.int64 and tensor.dtype.is_floating_point:
        if not bool((tensor == tensor.round()).all()):
            raise TensorError("int64 tensor holds non-integral values")
        if tensor.numel() and float(tensor.abs().max()) >= 2.0**63:
            raise TensorError("integer out of range for int64")
    if tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    if dtype.is_floating_point and not bool(torch.isfinite(converted).all()):
        raise TensorError(f"values overflow {DTYPE_NAMES[dtype]}")
    return converted


def _from_numbers(value: Any, limits: Limits) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise TensorError(
            "expected a number, nested arrays of numbers, or a {dtype, shape, data|b64} object"
        )
    if isinstance(value, float | int):
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise TensorError("integer out of range")
        if isinstance(value, float) and not math.isfinite(value):
            raise TensorError("tensor holds NaN or Infinity; only finite numbers are accepted")
        return torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:
        raise TensorError(f"ragged or malformed nested arrays: {_short(exc)}") from None
    if array.dtype.kind == "O":
        raise TensorError(
            "ragged nested arrays, values that are not numbers, or integers out of range"
        )
    if array.dtype.kind not in "fiu":
        raise TensorError("nested arrays must hold numbers only")
    _check_size(array.shape, limits)
    if array.dtype.kind == "u":
        raise TensorError("integer out of range")
    return torch.from_numpy(np.ascontiguousarray(array))


def _decode_object(value: dict[str, Any], limits: Limits) -> torch.Tensor:
    extra = value.keys() - _FORM_KEYS
    if extra:
        raise TensorError(f"unknown tensor field(s): {', '.join(sorted(extra))}")
    if ("data" in value) == ("b64" in value):
        raise TensorError("a tensor object has exactly one of 'data' or 'b64'")
    dtype = dtype_of(value.get("dtype", "float32")) if "dtype" in value else None
    shape = _shape(value.get("shape"), limits)
    numel = math.prod(shape)
    if "data" in value:
        data = value["data"]
        if not isinstance(data, list):
            raise TensorError("'data' must be a flat list of numbers")
        flat = _from_numbers(data, limits)
        if flat.ndim != 1 or flat.numel() != numel:
            raise TensorError(f"'data' must be a flat list of {numel} numbers for shape {shape}")
        out = flat.reshape(shape)
        return out if dtype is None else _convert(out, dtype)
    wire = dtype if dtype is not None else torch.float32
    return _from_b64(value["b64"], wire, shape)


def _from_b64(text: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not isinstance(text, str):
        raise TensorError("'b64' must be a base64 string")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if len(text) != 4 * math.ceil(nbytes / 3):
        raise TensorError(
            f"'b64' must encode {nbytes} bytes for shape {shape} and {DTYPE_NAMES[dtype]}"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TensorError("'b64' is not valid base64") from None
    if len(raw) != nbytes:
        raise TensorError(
            f"'b64' must encode {nbytes} bytes for shape {shape} and {DTYPE_NAMES[dtype]}"
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: frombuffer wants a writable buffer, and the tensor must own its memory.
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _shape(shape: Any, limits: Limits) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError("'shape' must be a list of non-negative integers")
    _check_size(tuple(shape), limits)
    return shape


def _check_size(shape: tuple[int, ...], limits: Limits) -> None:
    if len(shape) > limits.tensor_dims:
        raise TensorError(f"tensor has {len(shape)} dimensions; the limit is {limits.tensor_dims}")
    numel = math.prod(shape)
    if numel > limits.tensor_elements:
        raise TensorError(f"tensor has {numel} elements; the limit is {limits.tensor_elements}")


def _short(exc: Exception) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:200]


def encode(tensor: torch.Tensor, b64: bool = False) -> Any:
    """A tensor to its wire form: nested lists (numbers for 0-d), or the b64 object."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not b64:
        return tensor.tolist()
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        raw = tensor.view(torch.int16).numpy().tobytes()
    else:
        raw = tensor.numpy().tobytes()
    return {
        "dtype": DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)),
        "shape": list(tensor.shape),
        "b64": base64.b64encode(raw).decode("ascii"),
    }
