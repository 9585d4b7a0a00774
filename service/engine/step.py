"""One computation: forward, loss, backward, optional update; and the wire-level entry point.

``run`` is what a worker executes: a validated request in, a plain JSON-ready dict out.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from service.engine import budget, losses, models, optimizers, quantities, specs, state
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.engine.specs import Kind
from service.engine.tensors import decode, encode
from service.engine.trace import TraceNode, Tracer
from service.errors import GradsvcError, NonFinite, ShapeError

_RNG_LOCK = threading.Lock()


@dataclass
class Result:
    outputs: torch.Tensor
    loss: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] | None = None
    grad_norm: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None
    trace: list[TraceNode] | None = None
    quantities: dict[str, dict[str, torch.Tensor]] | None = None
    untouched: frozenset[str] = frozenset()
    """Trainable parameters the backward did not reach: torch leaves their ``.grad`` None
    (``grads`` holds zeros for them) and its optimizers then leave them alone."""


@contextlib.contextmanager
def seeded(model: models.Model, seed: int) -> Iterator[None]:
    """Dropout draws from the global RNG: give it the spec's seed, and keep it to ourselves."""
    if not model.has_dropout:
        yield
        return
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def buffers_kept(model: models.Model, *, always: bool = True) -> Iterator[None]:
    """The model's buffers (batch-norm's running statistics) as they were before, afterwards
    (``always``) or only when the body raises: a train-mode forward updates them in place,
    and only a step or accumulate that commits may keep what it did."""
    buffers = model.named_buffers()
    if not buffers:
        yield
        return
    before = {n: b.clone() for n, b in buffers.items()}
    try:
        yield
    except BaseException:
        always = True
        raise
    finally:
        if always:
            with torch.no_grad():
                for n, b in buffers.items():
                    b.copy_(before[n])


def forward(model: models.Model, inputs: models.Inputs) -> Result:
    model.module.train(False)  # inference mode: dropout off
    with torch.no_grad():
        outputs = model.forward(inputs)
    _check_finite("outputs", outputs)
    return Result(outputs=outputs)


def gradients(
    model: models.Model,
    loss_spec: specs.LossSpec,
    inputs: models.Inputs,
    y: Any,
    *,
    explain: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Result:
    """Forward, loss and backward; parameters' ``.grad`` hold dL/dθ afterwards."""
    model.module.train()
    tracer = Tracer(budget=limits.explain_elements) if explain else None
    if tracer is not None:
        # Inputs take part in the graph so that the trace can show dL/dx too.
        inputs = {
            k: v.detach().requires_grad_(v.dtype.is_floating_point) for k, v in inputs.items()
        }
    trainable = model.trainable()
    for p in trainable.values():
        p.grad = None
    with torch.enable_grad():
        outputs = model.forward(inputs, tracer)
        y_t = losses.target(loss_spec, y, outputs, limits)
        try:
            loss = losses.loss_fn(loss_spec)(outputs, y_t)
        except (RuntimeError, ValueError, IndexError) as exc:
            detail = str(exc).split("\n", 1)[0][:300]
            raise ShapeError(f"the loss cannot be computed: {detail}", loc=("batch", "y")) from None
        if tracer is not None:
            out_name = tracer.nodes[-1].node
            tracer.leaf("y", "target", y_t)
            tracer.record("loss", loss_spec.type, [out_name, "y"], loss)
            tracer.backward(loss)
        if loss.requires_grad:
            torch.autograd.backward(loss)
    untouched = frozenset(n for n, p in trainable.items() if p.grad is None)
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in trainable.items()
    }
    _check_finite("loss", loss)
    _check_finite("outputs", outputs)
    for name, g in grads.items():
        _check_finite(f"the gradient of {name}", g)
    norm = _total_norm(list(grads.values()), outputs.dtype)
    return Result(
        outputs=outputs.detach(),
        loss=loss.detach(),
        grads=grads,
        grad_norm=norm,
        trace=tracer.nodes if tracer else None,
        untouched=untouched,
    )


def step(
    model: models.Model,
    loss_spec: specs.LossSpec,
    optimizer: torch.optim.Optimizer,
    inputs: models.Inputs,
    y: Any,
    *,
    clip_grad_norm: float | None = None,
    explain: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Result:
    """``gradients``, then one optimizer update. On a non-finite result the parameters and the
    optimizer state are left as they were."""
    with buffers_kept(model, always=False):
        result = gradients(model, loss_spec, inputs, y, explain=explain, limits=limits)
        result.params = update(model, optimizer, clip_grad_norm)
    return result


def update(
    model: models.Model, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None
) -> dict[str, torch.Tensor]:
    """One optimizer update from the gradients in the parameters' ``.grad`` (clipped first
    to ``clip_grad_norm``); the parameters after it. On a non-finite result the parameters
    and the optimizer state are left as they were (NonFinite)."""
    params = model.trainable()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), clip_grad_norm)
    before = {n: p.detach().clone() for n, p in params.items()}
    saved = optimizer.state_dict()
    saved = {
        "state": {k: {sk: _clone(sv) for sk, sv in v.items()} for k, v in saved["state"].items()},
        "param_groups": saved["param_groups"],
    }
    try:
        try:
            optimizer.step()
        except RuntimeError as exc:  # torch refuses a hyper-parameter the dtype cannot hold
            if "overflow" not in str(exc):
                raise
            dtype = next(iter(params.values())).dtype
            raise optimizers.overflow(optimizer, dtype) from None
        after = {n: p.detach() for n, p in model.named_parameters().items()}
        check_update(after, {n: optimizer.state.get(p, {}) for n, p in params.items()})
    except BaseException:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
        optimizer.load_state_dict(saved)
        raise
    return {n: v.clone() for n, v in after.items()}


def from_outputs(model: models.Model, inputs: models.Inputs, grad_outputs: torch.Tensor) -> Result:
    """Forward, then backward from ``grad_outputs`` (dL/doutputs, computed by the client):
    the gradients torch's ``outputs.backward(grad_outputs)`` gives, and no loss."""
    model.module.train()
    trainable = model.trainable()
    for p in trainable.values():
        p.grad = None
    with torch.enable_grad():
        outputs = model.forward(inputs)
        if grad_outputs.shape != outputs.shape:
            raise ShapeError(
                f"grad_outputs has shape {list(grad_outputs.shape)}; the outputs have "
                f"{list(outputs.shape)}, and it must be theirs (dL/doutputs)",
                loc=("grad_outputs",),
            )
        if outputs.requires_grad:
            torch.autograd.backward(outputs, grad_outputs.to(outputs.dtype))
    untouched = frozenset(n for n, p in trainable.items() if p.grad is None)
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in trainable.items()
    }
    _check_finite("outputs", outputs)
    for name, g in grads.items():
        _check_finite(f"the gradient of {name}", g)
    norm = _total_norm(list(grads.values()), outputs.dtype)
    return Result(outputs=outputs.detach(), grads=grads, grad_norm=norm, untouched=untouched)


def accumulated(before: state.Accumulator | None, result: Result) -> state.Accumulator:
    """``before`` with ``result``'s gradients (and loss, if it has one) added, as torch's
    backward adds into ``.grad``: a parameter's first gradient is taken as it is, not added
    to zeros (an apply of one batch is then exactly a step), and one the backward did not
    reach is not added at all (it stays out of the accumulator while no batch reaches it).
    NonFinite if a sum overflows."""
    assert result.grads is not None
    before = before or state.Accumulator()
    grads = dict(before.grads)
    for n, g in result.grads.items():
        if n not in result.untouched:
            grads[n] = before.grads[n] + g if n in before.grads else g.clone()
    for name, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFinite(
                f"the accumulated gradient of {name} is not finite (NaN or Infinity): the sum "
                "overflowed. Apply more often, or scale the inputs or targets down"
            )
    loss_sum, losses = before.loss_sum, before.losses
    if result.loss is not None:
        loss_sum, losses = loss_sum + result.loss.item(), losses + 1
        if not math.isfinite(loss_sum):
            raise NonFinite("the accumulated loss is not finite: apply more often")
    return state.Accumulator(grads, before.count + 1, loss_sum, losses)


def apply(
    model: models.Model,
    optimizer: torch.optim.Optimizer,
    accumulator: state.Accumulator,
    scale: float = 1.0,
    clip_grad_norm: float | None = None,
) -> Result:
    """One optimizer update with ``scale`` times the accumulated gradients (clipped after
    scaling): the result's ``grads`` are those scaled sums (zeros for a parameter no batch
    reached), ``grad_norm`` their norm before clipping, ``loss`` the mean of the accumulated
    losses (None if none), ``params`` after. A parameter no batch reached keeps ``.grad``
    None, so the optimizer leaves it (and its state) alone, as after torch's own backward
    calls. NonFinite (nothing changed) if the scaled sum or the update is not finite."""
    trainable = model.trainable()
    grads = {
        n: accumulator.grads[n].clone() if scale == 1 else accumulator.grads[n] * scale
        for n in trainable
        if n in accumulator.grads
    }
    for name, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFinite(f"scale times the accumulated gradient of {name} is not finite")
    for n, p in trainable.items():
        p.grad = grads[n].clone() if n in grads else None
    dtype = next(iter(trainable.values())).dtype if trainable else torch.float32
    norm = _total_norm(list(grads.values()), dtype)
    params = update(model, optimizer, clip_grad_norm)
    grads = {n: grads[n] if n in grads else torch.zeros_like(p) for n, p in trainable.items()}
    loss = None
    if accumulator.losses:
        loss = torch.tensor(accumulator.loss_sum / accumulator.losses, dtype=torch.float64)
    outputs = torch.zeros(0)
    return Result(outputs=outputs, loss=loss, grads=grads, grad_norm=norm, params=params)


def check_update(
    params: Mapping[str, torch.Tensor], slots: Mapping[str, Mapping[str, Any]]
) -> None:
    """NonFinite for the first updated parameter, then optimizer state (``slots``: each
    parameter's, by name), that an update made NaN or infinite. The state counts: a square
    that overflowed (Adam's ``exp_avg_sq``, Adagrad's ``sum``) leaves the parameter finite
    but every later update of it zero, and a state that a restore refuses."""
    for name, value in params.items():
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise NonFinite(
                f"the updated {name} is not finite (NaN or Infinity): JSON cannot carry it. "
                "The update overflowed: a smaller learning rate (lr) usually fixes it"
            )
    for name, slot in slots.items():
        for key, value in slot.items():
            if key == optimizers.COUNT or not isinstance(value, torch.Tensor):
                continue
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise NonFinite(
                    f"the update made the optimizer's {key} of {name} not finite (NaN or "
                    f"Infinity): the gradient is too large for {_name(value.dtype)} once "
                    "squared or summed. Scale the inputs or targets down, or use float64"
                )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _total_norm(grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=dtype)
    norm: torch.Tensor = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    )
    return norm


def _check_finite(what: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise NonFinite(f"{what} is not finite (NaN or Infinity): JSON cannot carry it")


def compute(
    kind: Kind,
    model: models.Model,
    inputs: models.Inputs,
    y: Any,
    *,
    loss: specs.LossName | specs.LossSpec | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    clip_grad_norm: float | None = None,
    explain: bool = False,
    seed: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    wanted: specs.Quantities | None = None,
) -> Result:
    """One forward, gradients or step on a built model, dropout seeded with ``seed``; for
    gradients also the quantities ``wanted`` names (``engine.quantities``)."""
    with seeded(model, seed):
        if kind == "forward":
            if y is not None:  # unused, but a tensor the request must still get right
                try:
                    decode(y, torch.float32, limits)
                except GradsvcError as exc:
                    raise exc.at("batch", "y") from None
            return forward(model, inputs)
        assert loss is not None
        loss_spec = losses.normalise(loss)
        if kind == "gradients":
            with buffers_kept(model):  # gradients commit nothing, running statistics neither
                if wanted is None or not wanted.wanted:
                    return gradients(model, loss_spec, inputs, y, explain=explain, limits=limits)
                vector = quantities.check(model, wanted.wanted, wanted.vector, limits)
                result = gradients(model, loss_spec, inputs, y, explain=explain, limits=limits)
                target = losses.target(loss_spec, y, result.outputs, limits)
                problem = quantities.Problem(model, loss_spec, inputs, target, result.outputs, seed)
                result.quantities = quantities.compute(problem, wanted.wanted, vector)
                return result
        assert optimizer is not None
        return step(
            model,
            loss_spec,
            optimizer,
            inputs,
            y,
            clip_grad_norm=clip_grad_norm,
            explain=explain,
            limits=limits,
        )


def run(
    kind: Kind, request: specs.ForwardRequest, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """A whole stateless request: budgeted, built, computed, encoded. Fresh optimizer state
    every time."""
    if (estimate := budget.stateless(kind, request, limits)) is not None:
        budget.check(estimate, limits)  # before anything large is allocated
    model = models.build(request.model, limits)
    inputs = model.decode_inputs(request.batch.x, limits)
    optimizer, clip = None, None
    if isinstance(request, specs.StepRequest):
        optimizer = optimizers.build(request.optimizer, model.trainable().values())
        clip = request.optimizer.clip_grad_norm
    result = compute(
        kind,
        model,
        inputs,
        request.batch.y,
        loss=getattr(request, "loss", None),
        optimizer=optimizer,
        clip_grad_norm=clip,
        explain=getattr(request, "explain", False),
        seed=request.model.seed,
        limits=limits,
        wanted=request if isinstance(request, specs.Quantities) else None,
    )
    return encode_result(result, request.encoding == "b64")


ALL = frozenset({"loss", "grads", "params", "outputs"})


def encode_result(result: Result, b64: bool, include: frozenset[str] = ALL) -> dict[str, Any]:
    """The answer's fields; ``include`` names those wanted ("loss" brings grad_norm)."""
    body: dict[str, Any] = {}
    if result.loss is not None and "loss" in include:
        body["loss"] = result.loss.item()
    if result.grads is not None and "grads" in include:
        body["grads"] = {n: encode(g, b64) for n, g in result.grads.items()}
    if result.grad_norm is not None and "loss" in include:
        body["grad_norm"] = result.grad_norm.item()
    if result.params is not None and "params" in include:
        body["params"] = {n: encode(p, b64) for n, p in result.params.items()}
    if "outputs" in include:
        body["outputs"] = encode(result.outputs, b64)
    if result.trace is not None:
        body["trace"] = [encode_node(node, b64) for node in result.trace]
    if result.quantities is not None:
        body["quantities"] = {
            name: {p: encode(t, b64) for p, t in values.items()}
            for name, values in result.quantities.items()
        }
    return body


def encode_node(node: TraceNode, b64: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node": node.node,
        "op": node.op,
        "inputs": node.inputs,
        "value": encode(node.value, b64),
    }
    out["grad"] = encode(node.grad, b64) if node.grad is not None else None
    if node.local is not None:
        out["local"] = {k: encode(v, b64) for k, v in node.local.items()}
    return out
