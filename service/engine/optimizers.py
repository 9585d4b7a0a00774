"""Optimizers: torch.optim's own, from a closed registry, with their names and defaults."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from service.engine import specs
from service.errors import SpecError

_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
_NOT_HYPER = {"type", "clip_grad_norm"}


def hyperparameters(spec: specs.OptimizerBase) -> dict[str, object]:
    return {k: v for k, v in spec.model_dump().items() if k not in _NOT_HYPER}


def build(spec: specs.OptimizerBase, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls = _CLASSES[spec.type]  # type: ignore[attr-defined]
    params = list(params)
    if not params:
        raise SpecError(
            "every parameter is frozen: there is nothing to train", loc=("model", "frozen")
        )
    try:
        return cls(params, **hyperparameters(spec))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SpecError(str(exc), loc=("optimizer",)) from None
