"""Tensors on the wire, both ways (the service's ``engine/tensors.py`` is the other end).

A tensor goes out from a number, nested lists, a numpy array or a torch tensor: as nested
lists up to ``threshold`` elements, beyond that as ``{"dtype", "shape", "b64"}`` (raw
little-endian bytes). Answers come back as numpy arrays or torch tensors. torch is
imported only to make a torch tensor: without it, this module is numpy alone.
"""

from __future__ import annotations

import base64
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

__all__ = ["BatchInput", "TensorLike", "TensorsMode"]

TensorLike: TypeAlias = "float | int | Sequence[Any] | NDArray[Any] | torch.Tensor"
"""Anything that goes out as a tensor: a number, nested lists, a numpy array, a torch tensor,
or a tensor already in the wire's object form."""
BatchInput: TypeAlias = "TensorLike | Mapping[str, TensorLike]"
"""A batch's ``x``: one tensor, or ``{name: tensor}`` for an expression with several inputs."""
TensorsMode: TypeAlias = Literal["torch", "numpy"]

TORCH_MISSING = (
    "tensors='torch' needs torch, which is not installed: "
    "pip install 'gradsvc-client[torch]', or make the client with tensors='numpy'"
)
_WIRE_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8"}


def _torch_or_none() -> Any:
    """torch if the caller has imported it: a value cannot be a torch tensor otherwise."""
    return sys.modules.get("torch")


def _is_torch(value: Any) -> bool:
    torch = _torch_or_none()
    return torch is not None and isinstance(value, torch.Tensor)


def torch_installed() -> bool:
    """Whether ``import torch`` would find it (without importing it, which takes seconds)."""
    if "torch" in sys.modules:  # imported, or blocked with sys.modules["torch"] = None
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def is_wire_form(value: Any) -> bool:
    """A tensor already in the object form: ``{"dtype", "shape", "data" | "b64"}``."""
    return (
        isinstance(value, Mapping)
        and ("data" in value or "b64" in value)
        and set(value) <= {"dtype", "shape", "data", "b64"}
    )


def _b64(dtype: str, shape: list[int], raw: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode("ascii")}


class _Encoder:
    """Tensors of one request to their wire forms, counting the elements it sends."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.elements = 0

    def tensor(self, value: Any) -> Any:
        if is_wire_form(value):
            return dict(value)
        if _is_torch(value):
            return self._torch(value)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | float) or value is None:
            self.elements += 1
            return value
        if isinstance(value, np.ndarray):
            return self._array(value)
        if isinstance(value, list | tuple):
            try:
                array = np.asarray(value) if value else np.zeros(0)
            except (ValueError, OverflowError):
                return value  # ragged: the service says what is wrong with it
            if array.dtype.kind in "biuf":
                return self._array(array)
            return value  # not numbers, or integers out of range: the same
        raise TypeError(f"not a tensor: {type(value).__name__}")

    def _torch(self, value: Any) -> Any:
        torch = _torch_or_none()
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            self.elements += tensor.numel()
            if tensor.numel() <= self.threshold:
                return tensor.tolist()
            raw = tensor.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
            return _b64("bfloat16", list(tensor.shape), raw)
        return self._array(tensor.numpy())

    def _array(self, array: NDArray[Any]) -> Any:
        kind = array.dtype.kind
        if kind in "biu":
            name = "int64"
        elif kind == "f" and array.dtype.itemsize in (2, 4, 8):
            name = f"float{array.dtype.itemsize * 8}"
        elif kind == "f":
            name = "float64"
        else:
            raise TypeError(f"a tensor holds numbers, not {array.dtype}")
        self.elements += array.size
        if array.size <= self.threshold:
            return array.tolist()
        raw = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[name]).tobytes()
        return _b64(name, list(array.shape), raw)

    def batch(self, x: Any, y: Any = None) -> dict[str, Any]:
        wire_x = (
            {str(k): self.tensor(v) for k, v in x.items()}
            if isinstance(x, Mapping) and not is_wire_form(x)
            else self.tensor(x)
        )
        out = {"x": wire_x}
        if y is not None:
            out["y"] = self.tensor(y)
        return out

    def spec(self, value: Any) -> Any:
        """A spec (a dict, or a builder's ``to_json()``): tensors anywhere in it (a ``value``)."""
        to_json = getattr(value, "to_json", None)
        if callable(to_json):
            value = to_json()
        if isinstance(value, Mapping):
            return {
                str(k): self.tensor(v) if k == "value" else self.spec(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.spec(v) for v in value]
        if isinstance(value, np.ndarray) or _is_torch(value):
            return self.tensor(value)
        if isinstance(value, np.generic):
            return value.item()
        return value


def model_elements(model: Mapping[str, Any]) -> int:
    """About how many parameters a model spec has: whether its answers pay for b64.

    A spec this cannot read counts 0: the service, not the client, says what is wrong.
    """
    total = 0
    try:
        for param in (model.get("params") or {}).values():
            if isinstance(param, Mapping) and isinstance(param.get("shape"), list):
                total += math.prod(int(d) for d in param["shape"])
        layers = model.get("layers") if model.get("type") == "sequential" else [model]
        for layer in layers or []:
            if isinstance(layer, Mapping) and layer.get("type") == "linear":
                total += int(layer.get("in_features", 0)) * int(layer.get("out_features", 0))
    except (AttributeError, TypeError, ValueError):
        return 0
    return total


def _to_numpy(value: Any) -> NDArray[Any]:
    if isinstance(value, dict):
        shape = [int(d) for d in value["shape"]]
        dtype = str(value.get("dtype", "float32"))
        if "data" in value:
            return np.asarray(value["data"], dtype=_WIRE_DTYPES.get(dtype)).reshape(shape)
        raw = base64.b64decode(value["b64"])
        if dtype == "bfloat16":  # numpy has none: widen to float32, which is exact
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        wire = np.dtype(_WIRE_DTYPES[dtype])
        # astype: a native-order copy that owns its (writable) memory
        return np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("=")).reshape(shape)
    # JSON loses the dtype: floats read as float64 (exact for every float dtype), ints as int64
    return np.asarray(value)


def _to_torch(value: Any) -> torch.Tensor:
    import torch

    if isinstance(value, dict) and value.get("dtype") == "bfloat16" and "b64" in value:
        bits = np.frombuffer(base64.b64decode(value["b64"]), dtype="<i2").astype(np.int16)
        shape = [int(d) for d in value["shape"]]
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    array = _to_numpy(value)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = array.copy(order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    return torch.from_numpy(array)


def decoder(mode: str) -> Callable[[Any], Any]:
    """The function that reads an answer's tensors, for ``tensors=mode``.

    Args:
        mode: ``"torch"`` or ``"numpy"``.

    Returns:
        A function from a wire form to a torch tensor or a numpy array.

    Raises:
        ImportError: ``"torch"`` where torch is not installed (says what to install).
        ValueError: Another mode.
    """
    if mode == "torch":
        if not torch_installed():
            raise ImportError(TORCH_MISSING, name="torch")
        return _to_torch
    if mode == "numpy":
        return _to_numpy
    raise ValueError(f"tensors must be 'torch' or 'numpy', not {mode!r}")
