"""Optimizers: torch.optim's own, from a closed registry, with their names and defaults."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from service.engine import specs
from service.errors import NonFinite, SpecError

_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
_NOT_HYPER = {"type", "clip_grad_norm"}

COUNT, MOMENT, SQUARE = "step", "moment", "square"
"""The kinds of per-parameter state: the count of updates (a scalar holding a whole number,
``step``, which is also its slot's name), a running average or buffer of gradients, and a
running average or sum of squares (never negative)."""
_ADAM = {COUNT: COUNT, "exp_avg": MOMENT, "exp_avg_sq": SQUARE, "max_exp_avg_sq": SQUARE}
_SLOTS: dict[str, dict[str, str]] = {
    "sgd": {"momentum_buffer": MOMENT},
    "adam": _ADAM,
    "adamw": _ADAM,
    "rmsprop": {COUNT: COUNT, "square_avg": SQUARE, "momentum_buffer": MOMENT, "grad_avg": MOMENT},
    "adagrad": {COUNT: COUNT, "sum": SQUARE},
}


@dataclass(frozen=True)
class Slots:
    """The state an optimizer keeps per parameter, as torch's own implementation does."""

    kinds: Mapping[str, str]
    """every slot it may keep, and its kind"""
    needed: frozenset[str]
    """the slots its next step reads from a parameter that has any state"""


def slots(optimizer: torch.optim.Optimizer) -> Slots:
    name = next(n for n, cls in _CLASSES.items() if type(optimizer) is cls)
    group = optimizer.param_groups[0]
    needed: set[str] = set()  # sgd: a missing momentum buffer starts from the gradient
    if name in ("adam", "adamw"):
        needed = {COUNT, "exp_avg", "exp_avg_sq"}
        needed |= {"max_exp_avg_sq"} if group["amsgrad"] else set()
    elif name == "rmsprop":
        needed = {COUNT, "square_avg"}
        needed |= {"momentum_buffer"} if group["momentum"] > 0 else set()
        needed |= {"grad_avg"} if group["centered"] else set()
    elif name == "adagrad":
        needed = {COUNT, "sum"}
    return Slots(_SLOTS[name], frozenset(needed))


def hyperparameters(spec: specs.OptimizerBase) -> dict[str, object]:
    return {k: v for k, v in spec.model_dump().items() if k not in _NOT_HYPER}


def build(spec: specs.OptimizerBase, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls = _CLASSES[spec.type]  # type: ignore[attr-defined]
    params = list(params)
    if not params:
        raise SpecError(
            "every parameter is frozen: there is nothing to train", loc=("model", "frozen")
        )
    hyper = hyperparameters(spec)
    try:
        return cls(params, **hyper)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SpecError(str(exc), loc=("optimizer",)) from None
    except RuntimeError as exc:  # Adagrad fills its state with initial_accumulator_value
        if "overflow" not in str(exc):
            raise
        dtype = params[0].dtype
        raise SpecError(
            f"{_beyond([hyper], dtype) or 'a hyper-parameter'}: use a smaller value",
            loc=("optimizer",),
        ) from None


def overflow(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> NonFinite:
    """The error for an update that torch refused because a value would overflow ``dtype``,
    naming the hyper-parameters beyond its range (most often a learning rate)."""
    cause = _beyond(optimizer.param_groups, dtype)
    kind = str(dtype).removeprefix("torch.")
    return NonFinite(
        "the optimizer step overflowed: "
        f"{cause or f'a hyper-parameter times the gradient is beyond what {kind} can hold'}. "
        "Use a smaller learning rate (lr), or float64"
    )


def _beyond(groups: Iterable[Mapping[str, object]], dtype: torch.dtype) -> str:
    """ "lr=1e+308 is beyond what float32 can hold (...)" for the numbers of ``groups`` past
    ``dtype``'s range, or "" if none is."""
    largest = torch.finfo(dtype).max
    too_big: dict[str, None] = {}  # ordered, without repeats
    for group in groups:
        for name, value in group.items():
            numbers = value if isinstance(value, tuple) else (value,)  # betas
            if any(_number(n) and abs(n) > largest for n in numbers):
                too_big[f"{name}={value!r}"] = None
    if not too_big:
        return ""
    kind = str(dtype).removeprefix("torch.")
    return f"{', '.join(too_big)} is beyond what {kind} can hold (at most {largest:.3g})"


def _number(value: object) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool)
