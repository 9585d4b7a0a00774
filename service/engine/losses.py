"""Losses: torch.nn.functional's, plus ``squared``, the notebook's ½(ŷ−y)²."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from service.engine import specs
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.engine.tensors import decode
from service.errors import GradsvcError, InvalidInput, ShapeError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalise(loss: specs.LossName | specs.LossSpec) -> specs.LossSpec:
    return specs.LossSpec(type=loss) if isinstance(loss, str) else loss


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.sum() if reduction == "sum" else values.mean()


def loss_fn(spec: specs.LossSpec) -> LossFn:
    r = spec.reduction
    table: dict[str, LossFn] = {
        # Written as the notebook writes it, so that its float64 numbers come out bit for bit.
        "squared": lambda out, y: _reduce((out - y) ** 2 / 2, r),
        "mse": lambda out, y: F.mse_loss(out, y, reduction=r),
        "l1": lambda out, y: F.l1_loss(out, y, reduction=r),
        "huber": lambda out, y: F.huber_loss(out, y, reduction=r, delta=spec.delta),
        "smooth_l1": lambda out, y: F.smooth_l1_loss(out, y, reduction=r, beta=spec.beta),
        "bce_with_logits": lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction=r),
        "cross_entropy": lambda out, y: F.cross_entropy(
            out, y, reduction=r, label_smoothing=spec.label_smoothing
        ),
    }
    return table[spec.type]


def target(
    spec: specs.LossSpec, y: Any, out: torch.Tensor, limits: Limits = DEFAULT_LIMITS
) -> torch.Tensor:
    """Decode ``y`` and fit it to the model's output ``out`` as the loss expects."""
    if y is None:
        raise ShapeError("this call needs a target: batch.y", loc=("batch", "y"))
    try:
        if spec.type == "cross_entropy":
            classes = _check_classes(_class_or_probs(y, out, limits), out)
            return classes.to(out.device) if out.device.type != "cpu" else classes
        raw = decode(y, out.dtype, limits)
    except GradsvcError as exc:
        raise exc.at("batch", "y") from None
    if raw.shape != out.shape:
        if raw.numel() != out.numel():
            raise ShapeError(
                f"y has shape {list(raw.shape)} but the model's output has shape {list(out.shape)}",
                loc=("batch", "y"),
            )
        raw = raw.reshape(out.shape)
    return raw.to(out.device) if out.device.type != "cpu" else raw


def _class_or_probs(y: Any, out: torch.Tensor, limits: Limits) -> torch.Tensor:
    return decode_target(normalise("cross_entropy"), y, out.dtype, limits)


def decode_target(
    spec: specs.LossSpec, y: Any, dtype: torch.dtype, limits: Limits = DEFAULT_LIMITS
) -> torch.Tensor:
    """``y`` as a tensor, not yet fitted to any output: for cross entropy, class indices when
    they arrive as integers (int64), probabilities of ``dtype`` when as floats."""
    if spec.type != "cross_entropy":
        return decode(y, dtype, limits)
    if isinstance(y, torch.Tensor):
        integral = not y.dtype.is_floating_point
    elif isinstance(y, dict):
        integral = y.get("dtype") == "int64"
    else:
        integral = not _has_float_literal(y)
    return decode(y, torch.int64 if integral else dtype, limits)


def _has_float_literal(y: Any) -> bool:
    if isinstance(y, list):
        return any(_has_float_literal(v) for v in y)
    return isinstance(y, float)


def _check_classes(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch's layout: outputs [C] or [N, C, d1, ...]; class targets [] or [N, d1, ...]."""
    if out.ndim == 0:
        raise ShapeError("cross_entropy needs one output per class; the model gives a number")
    class_dim = 1 if out.ndim >= 2 else 0
    classes = out.shape[class_dim]
    if y.dtype == torch.int64:
        expected = out.shape[:class_dim] + out.shape[class_dim + 1 :]
        if y.shape != expected:
            raise ShapeError(
                f"class targets must have shape {list(expected)} "
                f"for outputs of shape {list(out.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise InvalidInput(f"class targets must lie in [0, {classes})")
        return y
    if y.shape != out.shape:
        raise ShapeError(f"probability targets must have the output's shape {list(out.shape)}")
    return y
