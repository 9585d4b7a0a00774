"""Learning-rate schedulers: torch.optim.lr_scheduler's own, from a closed registry.

A session's scheduler is built from its spec on the session's optimizer, as torch builds it,
and stepped after every optimizer step. What it keeps between steps is saved as JSON beside
the optimizer state (``Saved``): only the counters and the values it writes into the
optimizer's parameter group. Everything else torch's ``state_dict`` holds (``base_lrs``,
milestones, OneCycleLR's phases) follows from the spec and the optimizer's ``lr``, so it is
built again rather than read, and a file can never bring a value the spec did not allow.
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Any

import torch
from pydantic import Field, ValidationError
from torch.optim import lr_scheduler

from service.engine import specs
from service.errors import InvalidInput, NonFinite, SpecError

Scheduler = lr_scheduler.LRScheduler

_CLASSES: dict[str, type[Scheduler]] = {
    "step": lr_scheduler.StepLR,
    "multistep": lr_scheduler.MultiStepLR,
    "exponential": lr_scheduler.ExponentialLR,
    "cosine": lr_scheduler.CosineAnnealingLR,
    "linear": lr_scheduler.LinearLR,
    "onecycle": lr_scheduler.OneCycleLR,
    "cosine_warm_restarts": lr_scheduler.CosineAnnealingWarmRestarts,
}
_BROKEN = (ValueError, TypeError, ZeroDivisionError, OverflowError)
"""What torch raises for arguments its schedule cannot follow (a OneCycleLR phase of no
steps divides by zero)."""

Count = Annotated[int, Field(ge=0, lt=2**62)]


class Saved(specs.Spec):
    """A scheduler's state between steps, as the session state keeps it."""

    last_epoch: Count = Field(description="the scheduler's steps since it was set")
    step_count: Count
    lr: Annotated[float, Field(ge=0)] = Field(description="the lr the next step uses")
    T_i: Annotated[int, Field(ge=1, lt=2**62)] | None = None
    T_cur: Count | None = None
    momentum: Annotated[float, Field(ge=0)] | None = None
    betas: tuple[specs.Beta, specs.Beta] | None = None


def build(spec: specs.SchedulerSpec | None, optimizer: torch.optim.Optimizer) -> Scheduler | None:
    """The scheduler ``spec`` names, on ``optimizer``, at its step 0 (or None for none).

    Raises:
        SpecError: torch refused the arguments (OneCycleLR's cycle_momentum on an optimizer
            without momentum or betas, a schedule with a phase of no steps).
    """
    if spec is None:
        return None
    if (
        isinstance(spec, specs.OneCycleLRSpec)
        and spec.total_steps is None
        and (spec.epochs or 0) * (spec.steps_per_epoch or 0) >= 2**31
    ):  # checked here, not in the spec's validation: the document cannot say a product
        raise SpecError(
            "onecycle's epochs * steps_per_epoch must be below 2**31: give fewer, or total_steps",
            loc=("scheduler",),
        )
    arguments = spec.model_dump(exclude={"type"})
    try:
        return _CLASSES[spec.type](optimizer, **arguments)
    except _BROKEN as exc:
        said = _said(exc)
        if "cycle_momentum" in said:
            said += ': send "cycle_momentum": false, or use sgd, rmsprop, adam or adamw'
        raise SpecError(said, loc=("scheduler",)) from None


def lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer's next step uses (one parameter group)."""
    return float(optimizer.param_groups[0]["lr"])


def check_can_step(scheduler: Scheduler | None) -> None:
    """SpecError if the scheduler cannot follow one more step: torch's OneCycleLR refuses
    to go past its ``total_steps``, and this says so before the step changes anything."""
    if isinstance(scheduler, lr_scheduler.OneCycleLR) and (
        scheduler.last_epoch >= scheduler.total_steps
    ):
        raise SpecError(
            f"the onecycle schedule's {scheduler.total_steps} steps are done: PATCH the "
            'session with a new "scheduler" (it starts at its step 0), or "scheduler": null',
            loc=("scheduler", "total_steps"),
        )


def step(scheduler: Scheduler | None, optimizer: torch.optim.Optimizer) -> float:
    """Step the scheduler after an optimizer step; the lr the next step will use (torch's
    ``get_last_lr()``; the optimizer's own lr without a scheduler).

    Raises:
        NonFinite: the schedule's next lr is not finite (an exponential gamma above 1 for
            long enough); the caller drops the step.
        SpecError: torch's schedule could not go on.
    """
    if scheduler is not None:
        try:
            with warnings.catch_warnings():
                # A batched step updates a stacked copy of the optimizer (engine.batching),
                # so torch cannot see that this optimizer stepped: it did.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                scheduler.step()
        except _BROKEN as exc:
            raise SpecError(_said(exc), loc=("scheduler",)) from None
    value = lr(optimizer)
    if not math.isfinite(value):
        raise NonFinite(
            "the scheduler's next learning rate is not finite: use a smaller gamma, or "
            'PATCH a new "scheduler"'
        )
    return value


def save(scheduler: Scheduler, optimizer: torch.optim.Optimizer) -> str:
    """The scheduler's state as JSON (``Saved``)."""
    group = optimizer.param_groups[0]
    saved = Saved(
        last_epoch=scheduler.last_epoch,
        step_count=scheduler._step_count,
        lr=lr(optimizer),
        T_i=getattr(scheduler, "T_i", None),
        T_cur=getattr(scheduler, "T_cur", None),
        momentum=group["momentum"] if _cycles(scheduler, "momentum") else None,
        betas=tuple(group["betas"]) if _cycles(scheduler, "betas") else None,
    )
    return saved.model_dump_json(exclude_none=True)


def load(scheduler: Scheduler, optimizer: torch.optim.Optimizer, text: str) -> None:
    """``save``'s JSON into a scheduler freshly built from the session's spec, and the
    values it writes into the optimizer's group.

    Raises:
        InvalidInput: the JSON is not this scheduler's state.
    """
    try:
        saved = Saved.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise InvalidInput(
            f"the file's scheduler state is not valid: {where}: {first['msg']}",
            loc=("scheduler",),
        ) from None
    restarts = isinstance(scheduler, lr_scheduler.CosineAnnealingWarmRestarts)
    wanted = {
        "T_i": restarts,
        "T_cur": restarts,
        "momentum": _cycles(scheduler, "momentum"),
        "betas": _cycles(scheduler, "betas"),
    }
    for name, needed in wanted.items():
        if (getattr(saved, name) is not None) != needed:
            raise InvalidInput(
                f"the file's scheduler state {'lacks' if needed else 'has'} {name}: it is "
                f"not the state of this session's {type(scheduler).__name__}",
                loc=("scheduler", name),
            )
    if restarts:
        assert saved.T_i is not None and saved.T_cur is not None
        if saved.T_cur >= saved.T_i or saved.T_i < scheduler.T_0:  # type: ignore[attr-defined]
            raise InvalidInput(
                "the file's scheduler state has T_cur past T_i, or T_i below T_0",
                loc=("scheduler", "T_cur"),
            )
    if isinstance(scheduler, lr_scheduler.OneCycleLR) and saved.last_epoch > scheduler.total_steps:
        raise InvalidInput(
            f"the file's scheduler state is at step {saved.last_epoch}, past the onecycle "
            f"schedule's {scheduler.total_steps}",
            loc=("scheduler", "last_epoch"),
        )
    state: dict[str, Any] = {
        "last_epoch": saved.last_epoch,
        "_step_count": saved.step_count,
        "_last_lr": [saved.lr],
    }
    if restarts:
        state |= {"T_i": saved.T_i, "T_cur": saved.T_cur}
    scheduler.load_state_dict(state)
    group = optimizer.param_groups[0]
    group["lr"] = saved.lr
    if saved.momentum is not None:
        group["momentum"] = saved.momentum
    if saved.betas is not None:
        group["betas"] = saved.betas


def _cycles(scheduler: Scheduler, name: str) -> bool:
    """Whether OneCycleLR cycles the optimizer's ``momentum`` (or beta1 of its ``betas``)."""
    if not isinstance(scheduler, lr_scheduler.OneCycleLR) or not scheduler.cycle_momentum:
        return False
    return scheduler.use_beta1 == (name == "betas")


def _said(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ZeroDivisionError):
        text = "a phase of the schedule has no steps: use more total_steps"
    return text[:300]
