"""Cross-session batching: one computation for many sessions whose models share a signature.

The sessions' parameters are stacked along a new leading dimension, and forward, loss and
gradients run once, under ``torch.func.vmap``, through the first model's own
``Model.forward`` (``functional_call`` swaps each row's parameters in). A step then clips
each row by its own total norm and updates all rows with one optimizer of the sessions'
class and hyper-parameters over their stacked state, and each row is written back into its
session's own parameters and optimizer state. Every entry ends as ``step.compute`` would
leave it: the same result, or the same error with its parameters and state untouched.

Results agree with the unbatched path to rounding, not bit for bit: a vmapped matmul or
reduction is a batched kernel that may sum in another order. Adam, AdamW, RMSprop and Adagrad
divide each gradient element by its own running scale, so where an element's gradient is
within rounding of zero its step can differ visibly (in float32, parts in 1e5 of a parameter
after a few steps); float64 agrees to 1e-12. ``.grad`` and the training flag are not written:
``compute`` sets both afresh before it reads them, and nothing else does.

``signature`` is None (the caller runs the entry alone) for:
- ``explain``: the trace follows one model's graph;
- dropout: the unbatched path draws each mask from the global RNG, seeded per session;
- float16 and bfloat16: there another summing order shows in the answer's own digits;
- a step whose optimizer has several parameter groups or tensor hyper-parameters, or state
  other than its ``step`` count that is not of its parameter's shape.

Inside a group, an entry whose ``y`` cannot be decoded runs alone (and fails as it fails
alone), and entries that vmap cannot compute together (a shape error, an op without a
batching rule) run alone one by one. A group of one runs alone.
"""

from __future__ import annotations

import base64
import binascii
import math
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from service.engine import losses, models, specs
from service.engine.limits import Limits
from service.engine.specs import Kind
from service.engine.step import Result, _check_finite, check_update, compute
from service.engine.tensors import DTYPE_NAMES, decode
from service.errors import GradsvcError

_EXACT = (torch.float32, torch.float64)
_SHARED = "step"
"""The optimizer state slot that counts updates, one number per parameter rather than a
tensor of its shape: the rows share it, so entries must agree on it."""
_B64_KEYS = frozenset({"dtype", "shape", "b64"})
_UNBATCHABLE = (GradsvcError, RuntimeError, ValueError, IndexError, TypeError)

Params = dict[str, torch.Tensor]


@dataclass
class Entry:
    """One session's share of a group."""

    model: models.Model
    optimizer: torch.optim.Optimizer | None
    """None for forward and gradients."""
    inputs: models.Inputs
    """As ``model.decode_inputs`` gives them."""
    y: Any
    """The wire value of ``batch.y``, as ``compute`` takes it."""


@dataclass(frozen=True)
class _Layout:
    """What a built model brings to a signature, worked out once: its shape never changes."""

    key: Hashable
    names: tuple[str, ...]
    params: list[nn.Parameter]
    trainable: list[nn.Parameter]


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout | None] = weakref.WeakKeyDictionary()
_UNKNOWN = object()


def _layout(model: models.Model) -> _Layout | None:
    known = _LAYOUTS.get(model.module, _UNKNOWN)
    if known is not _UNKNOWN:
        return cast(_Layout | None, known)
    layout = None
    if model.batchable and model.dtype in _EXACT:
        named = model.named_parameters()
        layout = _Layout(
            key=(
                model.spec.model_dump_json(exclude={"seed", "params"}),
                model.limits,
                tuple((n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in named.items()),
            ),
            names=tuple(named),
            params=list(named.values()),
            trainable=[p for p in named.values() if p.requires_grad],
        )
    _LAYOUTS[model.module] = layout
    return layout


def signature(kind: Kind, spec: specs.SessionSpec, entry: Entry, explain: bool) -> Hashable | None:
    """The key under which entries may share one vmapped call; None: run this one alone."""
    layout = _layout(entry.model)
    if explain or layout is None:
        return None
    key: tuple[Hashable, ...] = (
        kind,
        layout.key,
        tuple((n, t.shape, t.dtype, t.device) for n, t in entry.inputs.items()),
    )
    if kind == "forward":
        return key
    key += (_wire_shape(entry.y), losses.normalise(spec.loss))
    if kind != "step":
        return key
    optimizer = entry.optimizer
    if optimizer is None or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(layout.trainable) or any(
        a is not b for a, b in zip(group["params"], layout.trainable, strict=True)
    ):
        return None
    hyper = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
    if any(isinstance(v, torch.Tensor | list | dict) for _, v in hyper):
        return None
    state = tuple(_state_key(optimizer.state.get(p, {}), p) for p in layout.trainable)
    if None in state:
        return None
    return (*key, type(optimizer), hyper, spec.optimizer.clip_grad_norm, state)


def run_group(
    kind: Kind, spec: specs.SessionSpec, entries: list[Entry], limits: Limits
) -> list[Result | GradsvcError]:
    """Per entry, in order, what ``compute`` would return or raise. The entries are distinct
    sessions that share a signature; ``spec`` is any one of theirs."""
    if len(entries) <= 1:
        return [_alone(kind, spec, e, limits) for e in entries]
    loss_spec = None if kind == "forward" else losses.normalise(spec.loss)
    like = None
    if loss_spec is not None:
        try:  # the outputs' shape, which targets are fitted to; its shape errors are everyone's
            with torch.no_grad():
                like = entries[0].model.forward(entries[0].inputs)
        except GradsvcError:
            return [_alone(kind, spec, e, limits) for e in entries]
    results: list[Result | GradsvcError | None] = [None] * len(entries)
    targets: list[torch.Tensor | None] = []
    parts: dict[Hashable, list[int]] = {}
    together = _targets_at_once(loss_spec, entries, like, limits)
    for i, entry in enumerate(entries if together is None else ()):
        try:
            target = _target(loss_spec, entry.y, like, limits)
        except GradsvcError:
            results[i] = _alone(kind, spec, entry, limits)  # to fail exactly as it fails there
            target = None
        else:  # the signature's cheap look at y can miss an int/float or a reshape
            parts.setdefault(None if target is None else (target.shape, target.dtype), []).append(i)
        targets.append(target)
    if together is not None:
        parts = {None: list(range(len(entries)))}
    for indices in parts.values():
        group = [entries[i] for i in indices]
        outcomes: list[Result | GradsvcError] | None = None
        if len(group) > 1:
            y = together
            if loss_spec is not None and y is None:
                y = torch.stack([cast(Any, targets[i]) for i in indices])
            try:
                outcomes = _vectorised(kind, loss_spec, spec.optimizer.clip_grad_norm, group, y)
            except _UNBATCHABLE:  # raised before anything was written
                outcomes = None
        if outcomes is None:
            outcomes = [_alone(kind, spec, e, limits) for e in group]
        for i, outcome in zip(indices, outcomes, strict=True):
            results[i] = outcome
    return [r if r is not None else GradsvcError("not computed") for r in results]


def _alone(
    kind: Kind, spec: specs.SessionSpec, entry: Entry, limits: Limits
) -> Result | GradsvcError:
    try:
        return compute(
            kind,
            entry.model,
            entry.inputs,
            entry.y,
            loss=spec.loss,
            optimizer=entry.optimizer,
            clip_grad_norm=spec.optimizer.clip_grad_norm,
            seed=spec.model.seed,  # only dropout reads it, and dropout is never grouped
            limits=limits,
        )
    except GradsvcError as exc:
        return exc


def _target(
    loss_spec: specs.LossSpec | None, y: Any, like: torch.Tensor | None, limits: Limits
) -> torch.Tensor | None:
    if loss_spec is None:  # forward does not use y, but compute() still checks it
        if y is not None:
            decode(y, torch.float32, limits)
        return None
    assert like is not None
    return losses.target(loss_spec, y, like, limits)


def _targets_at_once(
    loss_spec: specs.LossSpec | None,
    entries: list[Entry],
    like: torch.Tensor | None,
    limits: Limits,
) -> torch.Tensor | None:
    """Every entry's target, stacked, decoded as one array where each ``y`` is a b64 object of
    the outputs' own dtype and shape (what a client that sends b64 sends): the same bytes as
    ``losses.target`` reads one by one, with one finiteness check for all. None for anything
    else, or any doubt, and then each target is decoded on its own, to fail as it fails alone.
    """
    if loss_spec is None or like is None or loss_spec.type == "cross_entropy":
        return None
    dtype, shape = DTYPE_NAMES[like.dtype], list(like.shape)
    if len(shape) > limits.tensor_dims or like.numel() > limits.tensor_elements:
        return None
    nbytes = like.numel() * like.element_size()
    if not nbytes:
        return None
    length = 4 * math.ceil(nbytes / 3)
    raws: list[bytes] = []
    for entry in entries:
        y = entry.y
        if (
            type(y) is not dict
            or "b64" not in y
            or not y.keys() <= _B64_KEYS
            or y.get("dtype", "float32") != dtype
            or type(y.get("shape")) is not list
            or not all(type(d) is int for d in y["shape"])  # [True] == [1]: the types first
            or y["shape"] != shape
            or type(y["b64"]) is not str
            or len(y["b64"]) != length
        ):
            return None
        try:
            raw = base64.b64decode(y["b64"], validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) != nbytes:
            return None
        raws.append(raw)
    # bytearray: frombuffer wants a writable buffer, and the tensor must own its memory.
    stacked = torch.frombuffer(bytearray(b"".join(raws)), dtype=like.dtype)
    if not bool(torch.isfinite(stacked).all()):
        return None
    stacked = stacked.reshape(len(entries), *shape)
    return stacked.to(like.device) if like.device.type != "cpu" else stacked


class _Forward(nn.Module):
    """``Model.forward`` as a module, so that ``functional_call`` swaps a row's parameters in
    for all of it: input checks, feature fitting and limits are the unbatched path's own."""

    def __init__(self, model: models.Model) -> None:
        super().__init__()
        self.inner = model.module
        self.model = model

    def forward(self, inputs: models.Inputs) -> torch.Tensor:
        return self.model.forward(inputs)


def _vectorised(
    kind: Kind,
    loss_spec: specs.LossSpec | None,
    clip: float | None,
    entries: list[Entry],
    y: torch.Tensor | None,
) -> list[Result | GradsvcError]:
    count = len(entries)
    first = entries[0].model
    layout = _layout(first)
    assert layout is not None
    names = layout.names
    trainable = [n for n, p in zip(names, layout.params, strict=True) if p.requires_grad]
    frozen = [n for n, p in zip(names, layout.params, strict=True) if not p.requires_grad]
    layouts = [cast(_Layout, _layout(e.model)) for e in entries]
    with torch.no_grad():
        stacked = {n: torch.stack([lay.params[j] for lay in layouts]) for j, n in enumerate(names)}
        inputs = {n: torch.stack([e.inputs[n] for e in entries]) for n in first.inputs}
    call = _Forward(first)

    def run(tr: Params, fr: Params, x: models.Inputs) -> torch.Tensor:
        both = {f"inner.{n}": t for n, t in (tr | fr).items()}
        out: torch.Tensor = functional_call(call, both, (x,), strict=True)
        return out

    if loss_spec is None or y is None:
        with torch.no_grad():
            outputs: torch.Tensor = vmap(run, in_dims=(None, 0, 0))({}, stacked, inputs)
        bad = set(_false(_finite_rows(outputs)))
        return [
            _failure([("outputs", out)]) if i in bad else Result(outputs=out)
            for i, out in enumerate(outputs.unbind(0))
        ]

    fn = losses.loss_fn(loss_spec)

    def loss_and_outputs(
        tr: Params, fr: Params, x: models.Inputs, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = run(tr, fr, x)
        return fn(out, y), out

    grads: Params
    grads, (loss, outputs) = vmap(grad_and_value(loss_and_outputs, has_aux=True))(
        {n: stacked[n] for n in trainable}, {n: stacked[n] for n in frozen}, inputs, y
    )
    finite = _finite_rows(loss) & _finite_rows(outputs)
    for g in grads.values():
        finite &= _finite_rows(g)
    norms = [torch.linalg.vector_norm(_flat(g), dim=1) for g in grads.values()]
    total = (
        torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
        if norms
        else torch.zeros(count, dtype=outputs.dtype, device=outputs.device)
    )
    errors: dict[int, GradsvcError] = {}
    for i in _false(finite):  # checked in compute()'s order: its first complaint is the answer
        errors[i] = _failure(
            [("loss", loss[i]), ("outputs", outputs[i])]
            + [(f"the gradient of {n}", g[i]) for n, g in grads.items()]
        )
    param_rows: dict[str, tuple[torch.Tensor, ...]] | None = None
    if kind == "step":
        leaves = [stacked[n] for n in trainable]
        owners = [
            _Owner(cast(torch.optim.Optimizer, e.optimizer), lay.trainable)
            for e, lay in zip(entries, layouts, strict=True)
        ]
        optimizer, existed = _stacked_optimizer(
            owners, leaves, [grads[n] for n in trainable], total, clip
        )
        optimizer.step()
        updated = _finite_rows(stacked[names[0]])
        for n in names[1:]:
            updated &= _finite_rows(stacked[n])
        slots = {n: optimizer.state.get(x, {}) for n, x in zip(trainable, leaves, strict=True)}
        for state in slots.values():  # a square that overflowed: compute() refuses it too
            for key, value in state.items():
                if _stacks(key, value) and value.dtype.is_floating_point:
                    updated &= _finite_rows(value)
        for i in _false(updated):
            errors.setdefault(i, _update_failure(i, stacked, slots))
        kept = [i for i in range(count) if i not in errors]
        splits = _write_back([owners[i] for i in kept], kept, leaves, optimizer, existed)
        # The stepped rows write_back read are the answer's too: views are not free (256 each).
        rows = dict(zip(trainable, splits, strict=True))
        param_rows = {n: rows[n] if n in rows else stacked[n].unbind(0) for n in names}
    loss_rows, out_rows, norm_rows = loss.unbind(0), outputs.unbind(0), total.unbind(0)
    grad_rows = {n: g.unbind(0) for n, g in grads.items()}
    return [
        errors[i]
        if i in errors
        else Result(
            outputs=out_rows[i],
            loss=loss_rows[i],
            grads={n: r[i] for n, r in grad_rows.items()},
            grad_norm=norm_rows[i],
            params=None if param_rows is None else {n: r[i] for n, r in param_rows.items()},
        )
        for i in range(count)
    ]


@dataclass(frozen=True)
class _Owner:
    """An entry's optimizer and its trainable parameters, in the optimizer's order."""

    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


def _stacked_optimizer(
    owners: list[_Owner],
    leaves: list[torch.Tensor],
    grads: list[torch.Tensor],
    total: torch.Tensor,
    clip: float | None,
) -> tuple[torch.optim.Optimizer, set[tuple[int, str]]]:
    """An optimizer like the entries' own over the stacked parameters, its state their stacked
    states, each row's gradients clipped by that row's own total norm; and the (parameter,
    slot) pairs whose state tensors already exist in every entry."""
    if clip is not None:  # as clip_grad_norm_ scales, leaving grads (the answer's) alone
        coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        grads = [g * coef.reshape(-1, *[1] * (g.ndim - 1)) for g in grads]
    for leaf, g in zip(leaves, grads, strict=True):
        leaf.grad = g
    template = owners[0].optimizer
    hyper = {k: v for k, v in template.param_groups[0].items() if k != "params"}
    # The group's values override the class's defaults, as in every torch optimizer.
    optimizer: torch.optim.Optimizer = cast(Any, type(template))([{"params": leaves, **hyper}])
    existed: set[tuple[int, str]] = set()
    for j, leaf in enumerate(leaves):
        # .get: an optimizer that keeps no state (SGD without momentum) must not gain any
        state = template.state.get(owners[0].params[j])
        if not state:  # never stepped: the optimizer starts the stack as it would start theirs
            continue
        states = [o.optimizer.state[o.params[j]] for o in owners]  # no call per entry: 256
        optimizer.state[leaf] = {
            key: torch.stack([s[key] for s in states]) if _stacks(key, value) else _copy(value)
            for key, value in state.items()
        }
        existed |= {(j, k) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return optimizer, existed


def _write_back(
    owners: list[_Owner],
    rows: list[int],
    leaves: list[torch.Tensor],
    stacked: torch.optim.Optimizer,
    existed: set[tuple[int, str]],
) -> list[tuple[torch.Tensor, ...]]:
    """Rows ``rows`` of the stepped parameters and state into the entries' own tensors: in place
    where they exist (one foreach copy), as copies where this step made them, so that no
    session keeps a whole stack alive. Returns each leaf's rows, all of them, as views."""
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    splits: list[tuple[torch.Tensor, ...]] = []
    for j, leaf in enumerate(leaves):
        targets += [o.params[j] for o in owners]
        splits.append(leaf.unbind(0))
        sources += [splits[-1][i] for i in rows]
        new = stacked.state[leaf]
        states = [o.optimizer.state[o.params[j]] for o in owners] if new else []
        for key, value in new.items():
            if _stacks(key, value):
                split = value.unbind(0)
                values = [split[i] for i in rows]
            else:
                values = [value] * len(rows)
            if (j, key) in existed:
                targets += [s[key] for s in states]
                sources += values
            else:
                for s, v in zip(states, values, strict=True):
                    s[key] = _copy(v)
    with torch.no_grad():
        torch._foreach_copy_(targets, sources)
    return splits


def _stacks(key: str, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and key != _SHARED


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _state_key(state: dict[str, Any], param: torch.Tensor) -> Hashable | None:
    """What entries must agree on in one parameter's optimizer state, or None if it cannot be
    stacked: its slots and their kinds, and the value of the shared count."""
    key: list[Hashable] = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            if name == _SHARED and value.numel() == 1:
                key.append((name, value.dtype, value.item()))
            elif name != _SHARED and value.shape == param.shape:
                key.append((name, value.dtype))
            else:
                return None
        elif value is None or isinstance(value, int | float):
            key.append((name, value))
        else:
            return None
    return frozenset(key)  # a restored state lists its slots in another order than a fresh one


def _wire_shape(y: Any) -> Hashable:
    """A cheap look at y's shape, so that a group rarely splits by its decoded targets."""
    if isinstance(y, dict):
        shape, dtype = y.get("shape"), y.get("dtype")
        dims = (
            tuple(shape)
            if isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int for d in shape)
            else None
        )
        return ("object", dtype if isinstance(dtype, str) else None, dims)
    lengths: list[int] = []
    while isinstance(y, list):
        lengths.append(len(y))
        y = y[0] if y else None
    return ("numbers", tuple(lengths), type(y).__name__)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1) if t.ndim > 1 else t.unsqueeze(1)


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    # A finite sum proves every element finite (NaN and ±Infinity survive any addition), in
    # one pass and no mask; a sum that overflowed only sends us to the exact check.
    if bool(torch.isfinite(t.sum())):
        return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    return torch.isfinite(_flat(t)).all(dim=1)


def _false(rows: torch.Tensor) -> list[int]:
    return [] if bool(rows.all()) else [i for i, ok in enumerate(rows.tolist()) if not ok]


def _update_failure(
    row: int, stacked: dict[str, torch.Tensor], slots: dict[str, dict[str, Any]]
) -> GradsvcError:
    """The error compute() raises for this row's update: check_update's on its values."""
    try:
        check_update(
            {n: t[row] for n, t in stacked.items()},
            {n: {k: v[row] for k, v in s.items() if _stacks(k, v)} for n, s in slots.items()},
        )
    except GradsvcError as exc:
        return exc
    return GradsvcError("a value was not finite, then was")  # pragma: no cover


def _failure(checks: Iterable[tuple[str, torch.Tensor]]) -> GradsvcError:
    """The error compute() raises for these values: its first check that fails."""
    for what, value in checks:
        try:
            _check_finite(what, value)
        except GradsvcError as exc:
            return exc
    return GradsvcError("a value was not finite, then was")  # pragma: no cover
