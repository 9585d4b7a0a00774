"""The memory budget: a request's peak bytes, estimated from its specs and shapes alone.

Every limit in ``Limits`` bounds one tensor; this bounds what a request holds at once. The
estimate is made before anything large is allocated (parameter shapes come from the spec,
input shapes from the wire form, the shapes a model computes from its layers or, for an
expression, node by node with ``Node.shape``), and a request over ``Limits.request_bytes``
is refused with ``TooLarge`` saying how much it would need and how to need less.

The model, in elements times the model dtype's size ``d`` (P parameters, T of them
trainable, S optimizer state, B the batch's inputs and target, O the outputs). A request
holds, all along, the parameters (P), the batch (B) and, in a session, the optimizer state
(S: Adam and AdamW keep two moments, three with ``amsgrad``; SGD with momentum one buffer;
RMSprop one to three; Adagrad one). On top of that, its peak is the largest of its phases:

- decoding: the largest input checked for finiteness (``finite``: a copy and three byte
  masks, as ``torch.isfinite`` makes them);
- the forward pass: an expression holds every node it computed (each distinct node once)
  until it returns, SUMMED over the nodes; a sequential model what earlier layers'
  derivatives saved plus one layer's input and output; dropout's masks. Without gradients,
  a sequential model holds only one layer's input and output;
- backward: every tensor some derivative saved, summed over nodes and layers (walked by
  ``engine.footprint``: a node's operands or result, a layer's input or output), and the
  outputs; what the loss keeps and makes (``LOSS_COPIES`` x O); the gradients in flight at
  the busiest node (``BACKWARD_BUFFERS`` x its size, over the nodes that depend on a
  trainable parameter); and the parameters' gradients (T);
- after backward: the outputs, twice; the gradients and their answered copy (2T); the
  largest tensor checked for finiteness; for a step also the parameters kept to undo a
  non-finite update (T), the copy of the optimizer state (S, where there is state: a new
  optimizer's is made here instead), its temporaries (``OPTIMIZER_TEMPORARIES`` x T: the
  multi-tensor kernels make one per parameter at once) and the answered parameters (P).

Outside torch's allocator: the answer (at most ``NUMBER_TEXT`` bytes per number as JSON
text, made from a Python list of ``PYTHON_NUMBER`` bytes per number; 4/3 byte per byte in
b64; held twice while it is sent), and a session step's new state serialized for the store
(P + S, twice while joined). A session's create, restore and view, and a pass over many
steps, are composed from the same parts (``created``, ``restored``, ``in_one_pass``).

``tests/engine/test_budget.py`` holds the estimate to torch's own accounting over random
requests: never under the measured peak, and within 2x of it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from service.engine import layers, specs
from service.engine.expression import parsed
from service.engine.footprint import (
    Computed,
    ModelSpec,
    Shape,
    buffer_shapes,
    computed,
    count,
    optimizer_elements,
    param_shapes,
    wire_inputs,
    wire_shape,
)
from service.engine.limits import Limits
from service.engine.state import MAX_METADATA
from service.errors import GradsvcError, TooLarge

NUMBER_TEXT = 25
"""Bytes of one float as JSON text, at most: '-2.2250738585072014e-308,'."""
PYTHON_NUMBER = 32
"""Bytes of one number while a tensor is a Python list (a float object and its slot)."""
LOSS_COPIES = {
    "squared": 4,
    "l1": 3,
    "cross_entropy": 3,
    "mse": 2,
    "smooth_l1": 2,
    "huber": 2,
    "bce_with_logits": 2,
}
"""Output-sized tensors a loss keeps and makes besides the outputs (differences, their
powers, log-softmax, and the gradient it sends back)."""
OPTIMIZER_TEMPORARIES = 3
"""Parameter-sized temporaries of an optimizer step (negated or decayed gradients, the
square root of the second moment)."""

OVERHEAD = 64 * 1024
"""Bytes every computation allocates whatever its size (scalars, views, small checks)."""

_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


# -- human units ------------------------------------------------------------------------------


def human(nbytes: float) -> str:
    """``1536`` → ``1.5 KiB``: bytes the way an operator reads them."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            if unit == "bytes":
                return f"{int(nbytes)} bytes"
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


# -- answers ----------------------------------------------------------------------------------


def tensor_text(shape: Shape, dtype: str, b64: bool) -> int:
    """Bytes of one tensor in an answer, at most: nested lists, or the b64 object."""
    numel = count(shape)
    if b64:
        return 4 * math.ceil(numel * itemsize(dtype) / 3) + 48 + 12 * len(shape)
    lists = sum(count(shape[:k]) for k in range(len(shape)))
    return numel * NUMBER_TEXT + 3 * lists + 1


def _named_text(shapes: Mapping[str, Shape], dtype: str, b64: bool) -> int:
    return sum(len(n) + 4 + tensor_text(s, dtype, b64) for n, s in shapes.items()) + 2


@dataclass(frozen=True)
class Answer:
    """An answer's size: its text, and the numbers Python holds while making it."""

    text: int = 0
    numbers: int = 0

    def __add__(self, other: Answer) -> Answer:
        return Answer(self.text + other.text, self.numbers + other.numbers)

    @property
    def memory(self) -> int:
        """Bytes while it is made (the lists and the text) and sent (a copy of the text)."""
        return self.numbers * PYTHON_NUMBER + 2 * self.text


def answer(
    kind: specs.Kind,
    params: Mapping[str, Shape],
    trainable: Mapping[str, Shape],
    outputs: Shape,
    dtype: str,
    *,
    b64: bool,
    include: Iterable[str] = ("loss", "grads", "params", "outputs"),
) -> Answer:
    """What a forward, gradients or step answers: outputs; loss, grad_norm and grads;
    params (only those named in ``include``)."""
    wanted = set(include)
    text, numbers = 64, 0  # the loss, grad_norm, step and the braces
    if "outputs" in wanted:
        text += tensor_text(outputs, dtype, b64)
        numbers += 0 if b64 else count(outputs)
    if kind != "forward" and "grads" in wanted:
        text += _named_text(trainable, dtype, b64)
        numbers += 0 if b64 else sum(count(s) for s in trainable.values())
    if kind == "step" and "params" in wanted:
        text += _named_text(params, dtype, b64)
        numbers += 0 if b64 else sum(count(s) for s in params.values())
    return Answer(text, numbers)


def view(params: Mapping[str, Shape], dtype: str, spec_text: int = 0) -> Answer:
    """A session's view (its parameters as nested lists, and its specs)."""
    numbers = sum(count(s) for s in params.values())
    return Answer(512 + spec_text + _named_text(params, dtype, False), numbers)


# -- the estimate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A request's peak memory, in bytes, and its main parts."""

    tensors: int
    """the peak of what torch holds at once"""
    host: int
    """what lives outside torch meanwhile: the answer's text, a serialized state"""
    parts: dict[str, int] = field(default_factory=dict)
    """the parts worth naming: parameters, optimizer state, activations, batch, answer"""
    answer: int = 0
    """bytes of the answer's text, at most"""

    @property
    def total(self) -> int:
        return self.tensors + self.host


@dataclass(frozen=True)
class Work:
    """One computation on a model, described by shapes only."""

    kind: specs.Kind
    params: Mapping[str, Shape]
    trainable: Mapping[str, Shape]
    dtype: str
    computed: Computed
    inputs: int = 0
    """elements of the batch's inputs"""
    largest_input: int = 0
    """elements of its largest input or target"""
    target: int = 0
    """bytes of its target"""
    optimizer: int = 0
    """elements of the optimizer's state"""
    state_copied: bool = True
    """whether a step copies existing optimizer state (a fresh optimizer has none yet)"""
    explain: bool = False
    loss: str = ""
    """the loss's name (what it keeps differs)"""
    answer: Answer = Answer()
    quantities: tuple[str, ...] = ()
    """quantities beyond the gradient asked for (``engine.quantities``)"""
    samples: int = 1
    """rows of the batch, at most (its first dimension)"""
    row_wise: bool = True
    """whether per-sample gradients run each sample alone (else one backward per sample)"""


def estimate(work: Work, limits: Limits) -> Estimate:
    """The peak bytes of one computation (see the module's docstring for the model)."""
    d = itemsize(work.dtype)
    p = sum(count(s) for s in work.params.values()) * d
    t = sum(count(s) for s in work.trainable.values()) * d
    s = work.optimizer * d
    c = work.computed
    batch = work.inputs * d + work.target
    out = count(c.outputs)
    largest = max([count(x) for x in work.params.values()] + [out, work.largest_input])
    resident = p + batch + (s if work.state_copied else 0)
    phases = [resident + finite(work.largest_input, d)]  # decoding checks the batch
    if work.kind == "forward":
        activations = c.live * d
        phases += [resident + activations, resident + out * d + finite(out, d)]
        gradients = 0
    else:
        trace = 4 * limits.explain_elements * d if work.explain else 0
        loss = LOSS_COPIES.get(work.loss, max(LOSS_COPIES.values())) * out * d
        computed = (c.kept + c.masks) * d + trace
        kept = (c.saved + c.backward + c.masks) * d + loss + trace
        phases += [resident + computed, resident + kept + t]
        activations = max(computed, kept)
        # the outputs, and one more of their size the loss leaves; the gradients and their
        # answered copy; the finiteness check of the largest
        after = resident + 2 * out * d + 2 * t + finite(largest, d)
        phases.append(after)
        if work.kind == "step":  # s: the copy of the state held, or the new state made
            phases.append(after + t + s + OPTIMIZER_TEMPORARIES * t + p)
        gradients = 2 * t
    extra = quantities_bytes(work, (c.saved + c.backward + c.masks) * d, out, d)
    if extra:
        phases.append(resident + 2 * out * d + 2 * t + extra)
    host = work.answer.memory
    tensors = OVERHEAD + max(phases)
    parts = {
        "parameters": p,
        "optimizer state": s,
        "gradients": gradients,
        "activations": activations,
        "batch": batch,
        "answer": host,
    }
    if extra:
        parts["quantities"] = extra
    # what a step copies to undo a non-finite update, the optimizer's temporaries, checks
    parts["copies and temporaries"] = max(0, tensors + host - sum(parts.values()))
    return Estimate(tensors, host, parts, work.answer.text)


def finite(elements: int, d: int) -> int:
    """What ``torch.isfinite`` makes of a tensor: ``(t == t) * (t.abs() != inf)``, a copy
    and three byte masks. Tensors are checked one at a time."""
    return elements * (d + 3)


QUANTITY_CHUNK = 64
"""Basis vectors or samples a quantity pushes through at once (``quantities.CHUNK``)."""


def quantities_bytes(work: Work, kept: int, outputs: int, d: int) -> int:
    """What the quantities beyond the gradient hold at once, on top of the gradients (T
    trainable elements, N samples, O outputs, ``kept`` bytes a backward starts from, C
    vectors at a time): per-sample gradients N x T twice (the gradients and what is derived
    from them) and their computation (a backward of the batch when samples run alone, else
    min(N, C) backwards at once); a Hessian's rows C x T, C backwards of the gradient's graph
    (two of the batch's) and the whole T x T, twice while it is joined; the GGN's C forward
    tangents and output curvatures; the Jacobian O x T twice, min(O, C) backwards at once."""
    wanted = set(work.quantities)
    t = sum(count(s) for s in work.trainable.values())
    n, chunk = max(1, work.samples), QUANTITY_CHUNK
    held = 0
    if wanted & {"per_sample_grads", "per_sample_l2", "sum_grad_squared", "variance"}:
        backwards = 2 * kept if work.row_wise else min(n, chunk) * kept
        held = max(held, 2 * n * t * d + backwards)
    basis = min(t, chunk)
    if wanted & {"diag_hessian", "hessian"}:
        whole = 2 * t * t * d if "hessian" in wanted else t * d
        held = max(held, 2 * kept + basis * (2 * t * d + kept) + whole)
    if "diag_ggn" in wanted:
        held = max(held, 2 * kept + basis * (t * d + kept + 2 * outputs * d) + t * d)
    if "hvp" in wanted:
        held = max(held, 4 * kept + 3 * t * d)
    if "jacobian" in wanted:
        held = max(held, 2 * outputs * t * d + min(outputs, chunk) * (kept + outputs * d))
    return held


def quantities_answer(work: Work, outputs: Shape, b64: bool) -> Answer:
    """The quantities' part of an answer: each named tensor, by its shape."""
    n = max(1, work.samples)
    shapes: dict[str, dict[str, Shape]] = {
        "per_sample_grads": {k: (n, *s) for k, s in work.trainable.items()},
        "per_sample_l2": dict.fromkeys(work.trainable, (n,)),
        "jacobian": {k: (*outputs, *s) for k, s in work.trainable.items()},
    }
    t = sum(count(s) for s in work.trainable.values())
    text = numbers = 0
    for name in dict.fromkeys(work.quantities):
        named = shapes.get(name, dict(work.trainable))
        if name == "hessian":
            named = {"*": (t, t)}
        text += len(name) + 4 + _named_text(named, work.dtype, b64)
        numbers += 0 if b64 else sum(count(s) for s in named.values())
    return Answer(text, numbers)


def check_hessian(trainable: Mapping[str, Shape], limits: Limits) -> None:
    """TooLarge if a ``hessian`` would span more than ``limits.hessian_params``."""
    t = sum(count(s) for s in trainable.values())
    if t > limits.hessian_params:
        raise TooLarge(
            f"the hessian of {t} parameters would be {t}x{t}; the limit is "
            f"{limits.hessian_params} parameters (--max-hessian-params): ask for "
            '"diag_hessian", or "hvp" with a vector, instead',
            loc=("quantities",),
        )


def check(
    estimate: Estimate, limits: Limits, what: str = "this request", hint: str | None = None
) -> None:
    """TooLarge if ``estimate`` is over ``limits.request_bytes``, saying how much it would
    need, of what, and what to change (``hint``, else what suits its largest part)."""
    if estimate.total <= limits.request_bytes:
        return
    named = sorted(((size, name) for name, size in estimate.parts.items() if size), reverse=True)
    shares = ", ".join(f"{name} {human(size)}" for size, name in named[:4])
    biggest = named[0][1] if named else "activations"
    raise TooLarge(
        f"{what} would need about {human(estimate.total)} of memory at its peak ({shares}); "
        f"the limit is {human(limits.request_bytes)} (--max-request-bytes): "
        f"{hint or _HINTS.get(biggest, _HINTS['activations'])}"
    )


_HINTS = {
    "activations": "send a smaller batch (fewer rows), or use a smaller model",
    "batch": "send a smaller batch (fewer rows)",
    "answer": 'ask for "encoding": "b64", or for less in the answer',
    "parameters": "use a model with fewer parameters",
    "optimizer state": "use a model with fewer parameters, or an optimizer with less state",
    "gradients": "use a model with fewer parameters",
    "copies and temporaries": "use a model with fewer parameters",
    "staged states": "send fewer items per request, or items for fewer sessions",
    "quantities": "send a smaller batch, or ask for fewer quantities beyond the gradient",
}


def check_answer(nbytes: int, limits: Limits, hint: str, *, at_most: bool = False) -> None:
    """TooLarge if an answer of ``nbytes`` (``at_most``: of up to ``nbytes``, an estimate
    made before it is computed) is over ``limits.answer_bytes``."""
    if nbytes > limits.answer_bytes:
        size = f"up to {human(nbytes)}" if at_most else human(nbytes)
        raise TooLarge(
            f"the answer would be {size} of JSON; the limit is {human(limits.answer_bytes)} "
            f"(--max-answer-bytes): {hint}"
        )


# -- requests ---------------------------------------------------------------------------------


def work(
    kind: specs.Kind,
    spec: ModelSpec,
    batch: specs.Batch,
    limits: Limits,
    *,
    loss: specs.LossName | specs.LossSpec | None = None,
    optimizer: specs.OptimizerBase | None = None,
    fresh: bool = True,
    b64: bool = False,
    include: Iterable[str] = ("loss", "grads", "params", "outputs"),
    explain: bool = False,
    quantities: tuple[str, ...] = (),
) -> Work | None:
    """One forward, gradients or step of ``spec`` on ``batch``, by shapes; None when the
    shapes are not known before decoding (decoding then says what is wrong). TooLarge for a
    ``hessian`` over ``limits.hessian_params``, before anything else."""
    params = param_shapes(spec)
    if params is None:
        return None
    if "hessian" in quantities:
        check_hessian({n: s for n, s in params.items() if n not in spec.frozen}, limits)
    expression = None
    if isinstance(spec, specs.ExpressionModel):
        try:
            expression = parsed(spec.expression, limits)
        except GradsvcError:
            return None
        names: tuple[str, ...] = tuple(n for n in expression.names if n not in params)
    else:
        names = ("x",)
    inputs = wire_inputs(batch.x, names)
    y = wire_shape(batch.y) if batch.y is not None else ()
    if inputs is None or y is None or not _checked_first(spec, params, inputs, y, limits):
        return None
    trainable = {n: s for n, s in params.items() if n not in spec.frozen}
    train = kind != "forward"
    seen = computed(spec, params, inputs, limits, train=train, expression=expression)
    target = target_elements = 0
    name = loss if isinstance(loss, str) else getattr(loss, "type", "")
    if batch.y is not None:
        integral = name == "cross_entropy" and _integral(batch.y)
        target_elements = count(y)
        target = target_elements * (8 if integral else itemsize(spec.dtype))
    state = optimizer_elements(optimizer, trainable) if optimizer is not None else 0
    copied = not fresh or isinstance(optimizer, specs.Adagrad)  # Adagrad's state is eager
    described = Work(
        kind,
        params,
        trainable,
        spec.dtype,
        seen,
        inputs=sum(count(s) for s in inputs.values()),
        largest_input=max([count(s) for s in inputs.values()] + [target_elements]),
        target=target,
        optimizer=state,
        state_copied=copied,
        explain=explain,
        loss=name,
        answer=answer(kind, params, trainable, seen.outputs, spec.dtype, b64=b64, include=include),
    )
    if not quantities:
        return described
    rows = max((s[0] for s in inputs.values() if len(s) >= 1), default=1)
    row_wise = not isinstance(spec, specs.ExpressionModel) and not any(
        isinstance(layer, (specs.DropoutLayer, *layers.SHAPED))
        for layer in getattr(spec, "layers", ())
    )
    described = replace(described, quantities=quantities, samples=rows, row_wise=row_wise)
    extra = quantities_answer(described, seen.outputs, b64)
    return replace(described, answer=described.answer + extra)


def _checked_first(
    spec: ModelSpec,
    params: Mapping[str, Shape],
    inputs: Mapping[str, Shape],
    y: Shape,
    limits: Limits,
) -> bool:
    """Whether the request passes the limits that building and decoding check before they
    allocate anything: if not, they refuse it with their own, more precise, problem."""
    tensors = [*inputs.values(), y]
    if any(len(s) > limits.tensor_dims or count(s) > limits.tensor_elements for s in tensors):
        return False
    if sum(map(count, inputs.values())) > limits.batch_elements:
        return False
    return _buildable(spec, params, limits)


def _buildable(spec: ModelSpec, params: Mapping[str, Shape], limits: Limits) -> bool:
    """Whether the model passes the limits its builder checks before it allocates."""
    if any(len(s) > limits.tensor_dims for s in params.values()):
        return False
    if sum(map(count, params.values())) > limits.model_elements:
        return False
    if isinstance(spec, specs.SequentialModel) and len(spec.layers) > limits.layers:
        return False
    layers = spec.layers if isinstance(spec, specs.SequentialModel) else [spec]
    return all(
        max(layer.in_features, layer.out_features) <= limits.layer_width
        for layer in layers
        if isinstance(layer, specs.LinearLayer)
    )


def _integral(y: Any) -> bool:
    if isinstance(y, dict):
        return y.get("dtype") == "int64"
    if isinstance(y, torch.Tensor):
        return not y.dtype.is_floating_point
    while isinstance(y, list) and y:
        y = y[0]
    return isinstance(y, int)


def stateless(kind: specs.Kind, request: specs.ForwardRequest, limits: Limits) -> Estimate | None:
    """``POST /v1/forward``, ``/gradients`` or ``/step``: a fresh model and optimizer."""
    described = work(
        kind,
        request.model,
        request.batch,
        limits,
        loss=getattr(request, "loss", None),
        optimizer=getattr(request, "optimizer", None),
        b64=request.encoding == "b64",
        explain=getattr(request, "explain", False),
        quantities=request.wanted if isinstance(request, specs.Quantities) else (),
    )
    return None if described is None else estimate(described, limits)


def session(
    kind: specs.Kind,
    spec: specs.SessionSpec,
    batch: specs.Batch,
    limits: Limits,
    *,
    b64: bool = False,
    include: Iterable[str] = ("loss", "grads", "params", "outputs"),
    explain: bool = False,
    quantities: tuple[str, ...] = (),
) -> Estimate | None:
    """A forward, gradients or step on a session: its parameters and optimizer state are
    held already (and copied by a step), and a step's new state is serialized for the store
    (P + S, twice while its pieces are joined)."""
    described = work(
        kind,
        spec.model,
        batch,
        limits,
        loss=spec.loss,
        optimizer=spec.optimizer,
        fresh=False,
        b64=b64,
        include=include,
        explain=explain,
        quantities=quantities,
    )
    if described is None:
        return None
    found = estimate(described, limits)
    if kind != "step":
        return found
    staged = state_bytes(spec)
    parts = {**found.parts, "staged states": 2 * staged}
    return Estimate(found.tensors, found.host + 2 * staged, parts, found.answer)


def session_of(
    kind: specs.Kind,
    spec_text: str,
    batch: specs.Batch,
    limits: Limits,
    *,
    b64: bool = False,
    include: Iterable[str] = ("loss", "grads", "params", "outputs"),
    explain: bool = False,
    quantities: tuple[str, ...] = (),
) -> Estimate | None:
    """``session`` for the session whose spec is the JSON ``spec_text``, remembered: the
    estimate reads of the batch only its tensors' shapes (and whether the target is
    integral), so many steps of one spec on batches of one shape cost one estimate. The
    estimate returned is shared: read it, never change it.

    Args:
        kind: what the request computes.
        spec_text: the session's spec as the store keeps it.
        batch: the request's batch.
        limits: the limits in force.
        b64: whether the answer is in b64.
        include: what the answer holds.
        explain: whether the answer explains the computation.
        quantities: quantities beyond the gradient asked for.

    Returns:
        The estimate, or None when the shapes are not known before decoding.

    Raises:
        TooLarge: for a ``hessian`` over ``limits.hessian_params``.
    """
    x = batch.x
    named = isinstance(x, dict) and not ({"data", "b64"} & x.keys())
    xs = tuple((n, _wired(v)) for n, v in x.items()) if named else _wired(x)
    ys = None if batch.y is None else _wired(batch.y)
    return _session_by_shapes(
        kind, spec_text, named, xs, ys, limits, b64, frozenset(include), explain, quantities
    )


_Wired = tuple[Shape | None, bool]


def _wired(value: Any) -> _Wired:
    """All ``work`` reads of a tensor's wire form: its shape and whether it is integral."""
    return wire_shape(value), _integral(value)


def _stand_in(wired: _Wired) -> dict[str, Any]:
    """A wire form with that shape and integrality, and no numbers."""
    shape, integral = wired
    dtype = "int64" if integral else "float32"
    return {"dtype": dtype, "shape": None if shape is None else list(shape), "b64": ""}


@functools.lru_cache(maxsize=1024)
def _session_by_shapes(
    kind: specs.Kind,
    spec_text: str,
    named: bool,
    xs: Any,
    ys: _Wired | None,
    limits: Limits,
    b64: bool,
    include: frozenset[str],
    explain: bool,
    quantities: tuple[str, ...],
) -> Estimate | None:
    x = {n: _stand_in(w) for n, w in xs} if named else _stand_in(xs)
    y = None if ys is None else _stand_in(ys)
    batch = specs.Batch.model_construct(x=x, y=y)
    spec = specs.SessionSpec.model_validate_json(spec_text)
    return session(
        kind,
        spec,
        batch,
        limits,
        b64=b64,
        include=include,
        explain=explain,
        quantities=quantities,
    )


def state_bytes(spec: specs.SessionSpec) -> int:
    """Bytes of a session's state as the store keeps it: parameters, buffers (a count of
    batches is 8 bytes, however narrow the dtype) and optimizer state."""
    params = param_shapes(spec.model) or {}
    buffers = buffer_shapes(spec.model)
    trainable = {n: s for n, s in params.items() if n not in spec.model.frozen}
    elements = sum(map(count, params.values())) + optimizer_elements(spec.optimizer, trainable)
    elements += sum(map(count, buffers.values()))
    return elements * itemsize(spec.model.dtype) + 8 * len(buffers)


def in_one_pass(chains: Iterable[tuple[list[Estimate], int, int]]) -> Estimate:
    """A pass over several sessions' chains of steps, each given as its links' estimates,
    its state's bytes and how many of its states the pass keeps staged at once. A round
    computes one link of every chain (perhaps as one vmapped call): each chain's largest
    link, summed over the chains; every answer is kept until the pass ends; and the staged
    states."""
    tensors = host = text = 0
    parts: dict[str, int] = {}
    for links, state, staged in chains:
        largest = max(links, key=lambda e: e.tensors)
        tensors += largest.tensors
        answers = sum(e.parts.get("answer", 0) for e in links)
        host += answers + (staged + 2) * state
        text += sum(e.answer for e in links)
        for name, size in largest.parts.items():
            parts[name] = parts.get(name, 0) + size
        parts["answer"] = parts.get("answer", 0) - largest.parts.get("answer", 0) + answers
        parts["staged states"] = parts.get("staged states", 0) + staged * state
    return Estimate(tensors, host, parts, text)


def created(spec: specs.SessionSpec, limits: Limits) -> Estimate | None:
    """A new session: its model built (the largest parameter drawn twice), its state
    serialized, and its view (the state read back, its parameters as JSON)."""
    params = param_shapes(spec.model)
    if params is None or not _buildable(spec.model, params, limits):
        return None
    d = itemsize(spec.model.dtype)
    p = sum(map(count, params.values())) * d
    trainable = {n: s for n, s in params.items() if n not in spec.model.frozen}
    eager = optimizer_elements(spec.optimizer, trainable) if _eager(spec.optimizer) else 0
    s = eager * d
    largest = max(map(count, params.values()), default=0) * d
    shown = view({**params, **buffer_shapes(spec.model)}, spec.model.dtype)
    tensors = OVERHEAD + p + s + max(largest, p + s)
    host = 2 * (p + s) + shown.memory
    parts = {"parameters": p, "optimizer state": s, "answer": shown.memory}
    return Estimate(tensors, host, parts, shown.text)


def restored(spec: specs.SessionSpec, data: bytes, limits: Limits) -> Estimate | None:
    """A session from a checkpoint of ``len(data)`` bytes: its tensors read (once to check
    them, once into the model, once for the view), the model and optimizer built, the state
    serialized again, and the view."""
    stored = _tensor_bytes(data)
    params = param_shapes(spec.model)
    if stored is None or params is None or not _buildable(spec.model, params, limits):
        return None
    shown = view({**params, **buffer_shapes(spec.model)}, spec.model.dtype)
    tensors = OVERHEAD + 2 * stored
    host = len(data) + 2 * stored + shown.memory
    parts = {"parameters and optimizer state": stored, "answer": shown.memory}
    return Estimate(tensors, host, parts, shown.text)


def _eager(spec: specs.OptimizerBase) -> bool:
    """Whether the optimizer makes its state when it is built (Adagrad) or at its first
    step (the rest)."""
    return isinstance(spec, specs.Adagrad)


def _tensor_bytes(data: bytes) -> int | None:
    """Bytes of the tensors a safetensors file holds, from its header alone."""
    if len(data) < 8:
        return None
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size]) if size <= MAX_METADATA else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    total = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name == "__metadata__" or not isinstance(offsets, list) or len(offsets) != 2:
            continue
        if all(type(o) is int for o in offsets):
            total += max(0, offsets[1] - offsets[0])
    return total
