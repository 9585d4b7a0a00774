"""What a model computes on a batch, in elements, from its spec and the batch's shapes
alone: no tensor is made (an expression's nodes take their shapes from ``Node.shape``, the
rule the model itself checks its activation limit with).

For each request the walk finds what the forward pass holds at its peak, what backward
starts from (every tensor some derivative saved, summed over nodes and layers, and the
outputs), the gradients in flight at its busiest node, and the outputs' shape; and, from
the specs, every parameter's shape and the optimizer state's size. ``engine.budget`` turns
them into bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.engine import layers, specs
from service.engine.expression import Expression, Node, parsed
from service.engine.limits import Limits
from service.errors import GradsvcError

Shape = tuple[int, ...]

BACKWARD_BUFFERS = {
    "pow": 4,
    "div": 4,
    "cos": 4,
    "sin": 3,
    "sqrt": 3,
    "abs": 3,
    "mul": 3,
    "matmul": 3,
    "layer_norm": 3,
    "batch_norm1d": 3,
    "batch_norm2d": 3,
    "": 2,
}
"""Node-sized tensors alive at once while backward passes a node: its incoming gradient,
and what its derivative makes (``pow``: the power, its product with the exponent and with
the gradient; ``mul`` of broadcast operands: the full-size products before they are
summed back). Fused derivatives (``tanh``, ``relu``, ``linear``...) make one."""


# -- shapes from the wire, without decoding ---------------------------------------------------


def wire_shape(value: Any) -> Shape | None:
    """The shape a tensor's wire form declares (its ``shape``, or nested lists' lengths along
    their first elements), without reading its numbers; None if it has none (decoding will
    say what is wrong)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return ()
    if isinstance(value, dict):
        shape = value.get("shape")
        if isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape):
            return tuple(shape)
        return None
    if not isinstance(value, list):
        return None
    lengths: list[int] = []
    while isinstance(value, list):
        lengths.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(lengths)


def wire_inputs(x: Any, names: Iterable[str]) -> dict[str, Shape] | None:
    """The shapes of a batch's ``x`` for a model with inputs ``names``; None if unknown."""
    names = tuple(names)
    if isinstance(x, dict) and not ({"data", "b64"} & x.keys()):
        shapes = {n: wire_shape(x.get(n)) for n in names}
    elif len(names) == 1:
        shapes = {names[0]: wire_shape(x)}
    else:
        return None
    if any(s is None for s in shapes.values()):
        return None
    return {n: s for n, s in shapes.items() if s is not None}


def count(shape: Iterable[int]) -> int:
    """Elements of a tensor of ``shape``."""
    return math.prod(shape)


# -- what a model is and computes -------------------------------------------------------------

ModelSpec = specs.ExpressionModel | specs.LinearModel | specs.SequentialModel


@dataclass(frozen=True)
class Computed:
    """What a model computes on a batch, in elements."""

    kept: int = 0
    """what the forward pass holds at its peak: an expression every node, summed; a
    sequential model what earlier layers' derivatives saved and one layer's input and
    output"""
    saved: int = 0
    """what backward starts from: every tensor a derivative saved, summed over nodes and
    layers, and the outputs"""
    backward: int = 0
    """the gradients in flight at the busiest node of backward: its incoming gradient and
    the temporaries its derivative makes (``BACKWARD_BUFFERS``), at its size"""
    live: int = 0
    """what a forward without gradients holds at its peak: an expression every node, a
    sequential model one layer's input and output"""
    masks: int = 0
    """elements of dropout's masks (a tensor of the model's dtype on the CPU)"""
    outputs: Shape = ()


def buffer_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """Every buffer's shape (batch-norm's running statistics), from the spec alone; none
    where building it fails (which says what is wrong)."""
    if not isinstance(spec, specs.SequentialModel) or not layers.has_batch_norm(spec):
        return {}
    try:
        return layers.buffer_shapes(spec)
    except GradsvcError:
        return {}


def param_shapes(spec: ModelSpec) -> dict[str, Shape] | None:
    """Every parameter's shape as the built model names them, from the spec alone; None
    where the spec does not say (an expression parameter without ``value`` or ``shape``:
    building it fails first)."""
    if isinstance(spec, specs.ExpressionModel):
        shapes: dict[str, Shape] = {}
        for name, pspec in spec.params.items():
            shape = tuple(pspec.shape) if pspec.shape is not None else wire_shape(pspec.value)
            if shape is None:
                return None
            shapes[name] = shape
        return shapes
    if isinstance(spec, specs.LinearModel):
        return _linear_params(spec, "")
    if layers.is_shaped(spec):
        try:
            return layers.parameter_shapes(spec)
        except GradsvcError:  # building it says what is wrong
            return None
    shapes = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, specs.LinearLayer):
            shapes |= _linear_params(layer, f"{i}.")
        elif isinstance(layer, specs.LayerNormLayer) and layer.elementwise_affine:
            norm = layer.normalized_shape
            shape = (norm,) if isinstance(norm, int) else tuple(norm)
            shapes[f"{i}.weight"] = shape
            if layer.bias:
                shapes[f"{i}.bias"] = shape
    return shapes


def _linear_params(layer: specs.LinearLayer, prefix: str) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {f"{prefix}weight": (layer.out_features, layer.in_features)}
    if layer.bias:
        shapes[f"{prefix}bias"] = (layer.out_features,)
    return shapes


def computed(
    spec: ModelSpec,
    params: Mapping[str, Shape],
    inputs: Mapping[str, Shape],
    limits: Limits,
    *,
    train: bool,
    expression: Expression | None = None,
) -> Computed:
    """What the model computes on inputs of these shapes, up to where the real run would
    stop (a shape that does not fit, a tensor over ``activation_elements``): that much it
    allocates before it fails."""
    trainable = set(params) - set(spec.frozen)
    if isinstance(spec, specs.ExpressionModel):
        if expression is None:
            try:
                expression = parsed(spec.expression, limits)
            except GradsvcError:
                return Computed()
        return _expression(expression, {**params, **inputs}, trainable, limits)
    x = inputs.get("x")
    if x is None:
        return Computed()
    if isinstance(spec, specs.LinearModel):
        return _layers([spec], x, trainable, limits, train, flat=True)
    if layers.is_shaped(spec):
        return _shaped(spec, x, trainable, limits, train)
    return _layers(list(spec.layers), x, trainable, limits, train)


SHAPED_SAVES = {"lstm": 16, "gru": 7}
"""Per time step, row and hidden unit of one layer and direction, the elements an LSTM's
(GRU's) derivative keeps on the CPU: each step's gates (4, 3), their activations, the cell
and hidden states and the products between them, as torch's unfused cell saves them."""


def _shaped(
    spec: specs.SequentialModel, x: Shape, trainable: set[str], limits: Limits, train: bool
) -> Computed:
    """A model with shaped layers, its shapes propagated on the meta device, counted as
    ``_layers`` counts: a tensor that one layer outputs and the next takes in is kept once,
    by whichever derivative saves it (a learning convolution, recurrent or linear layer its
    input; an activation its result; the loss the outputs), besides what a layer keeps of
    its own (a recurrent layer its gates at every time step, a max pool the indices of its
    maxima, an embedding its int64 indices)."""
    dtype = torch.int64 if layers.embedding_first(spec) else getattr(torch, spec.dtype)
    try:
        shapes = layers.propagate(spec, x, dtype, limits)
    except GradsvcError:
        return Computed()  # the real run refuses it before computing anything
    shape, grad = x, False
    kept = saved = backward = live = masks = 0
    for i, (layer, out) in enumerate(zip(spec.layers, shapes, strict=True)):
        before = count(shape) if i else 0  # x itself is the batch's
        numel = count(out)
        learns = any(n.startswith(f"{i}.") for n in trainable)
        if i and learns and isinstance(layer, _SAVES_INPUT_TO_LEARN):
            saved += before
        grad = grad or learns
        extra = _own_saves(layer, shape, numel) if grad else 0
        saved += extra
        if isinstance(layer, specs.DropoutLayer) and train:
            masks += numel
        last = i == len(spec.layers) - 1
        kept = max(kept, saved + before + numel)
        if grad and (layer.type in _SAVES_RESULT or last):
            saved += numel
        if grad:
            buffers = BACKWARD_BUFFERS.get(layer.type, BACKWARD_BUFFERS[""])
            backward = max(backward, buffers * max(numel, before) + extra)
        live = max(live, before + numel + extra)
        shape = out
    return Computed(
        kept=kept, saved=saved, backward=backward, live=live, masks=masks, outputs=shape
    )


_SAVES_INPUT_TO_LEARN = (specs.ConvLayer, specs.RecurrentLayer, specs.LinearLayer)
"""Layers whose weight's gradient is made from their input, which their derivative keeps."""


def _own_saves(layer: Any, shape: Shape, numel: int) -> int:
    """Elements a layer's derivative keeps besides its input and output."""
    if isinstance(layer, specs.RecurrentLayer):
        steps = count(shape[:-1])  # rows × time steps
        directions = 2 if layer.bidirectional else 1
        return SHAPED_SAVES[layer.type] * steps * layer.hidden_size * directions * layer.num_layers
    if isinstance(layer, specs.EmbeddingLayer):
        return 4 * count(shape)  # the int64 indices, as wide as 4 float16 elements
    if isinstance(layer, specs.MaxPoolLayer):
        return 2 * numel  # int64 indices, counted in elements as wide as float32
    if isinstance(layer, specs.BatchNormLayer):
        return count(shape)  # its input, which its derivative reads (and per-channel stats)
    if isinstance(layer, specs.ConvLayer):
        return count(shape)  # its input made contiguous (the batch's own, as the first layer)
    return 0


class _Stop(Exception):
    """The real run stops here (a shape error, a tensor over the limits)."""


def _expression(
    expression: Expression,
    env: Mapping[str, Shape],
    trainable: set[str],
    limits: Limits,
) -> Computed:
    """Node by node in evaluation order, each distinct node once (as ``ExpressionModule``
    computes it): every node's value lives until the forward pass ends, then only what
    some derivative saved (``_SAVES``) and the outputs (the loss keeps them)."""
    seen: dict[str, tuple[Shape, bool]] = {}
    saved: dict[str, int] = {}
    kept = backward = 0

    def visit(node: Node) -> tuple[Shape, bool]:
        nonlocal kept, backward
        if node.text in seen:
            return seen[node.text]
        if node.op == "name":
            if node.text not in env:
                raise _Stop
            shape, grad = env[node.text], node.text in trainable
        elif node.op == "const":
            shape, grad = (), False
            kept += 1
        else:
            args = [visit(child) for child in node.children]
            shapes = [a for a, _ in args]
            try:
                shape = node.shape(*shapes)
            except (RuntimeError, ValueError):  # the real run's ShapeError
                raise _Stop from None
            numel = count(shape)
            if len(args) > 1 and numel > limits.activation_elements:
                raise _Stop
            grads = [g for _, g in args]
            grad = any(grads)
            operands = _matmul_operands(node, shapes)
            kept += numel + operands
            if grad:
                backward = max(backward, _buffers(node, numel, shapes, grads, operands))
                for index in _SAVES.get(node.op, _NOTHING)(grads):
                    child = node if index < 0 else node.children[index]
                    if child.op not in ("name", "const"):
                        saved[child.text] = count(seen[child.text][0] if index >= 0 else shape)
        seen[node.text] = (shape, grad)
        return shape, grad

    try:
        out = visit(expression.root)[0]
    except _Stop:
        out = ()
    if expression.root.op not in ("name", "const"):
        saved[expression.root.text] = count(out)
    return Computed(kept=kept, saved=sum(saved.values()), backward=backward, live=kept, outputs=out)


def _NOTHING(grads: list[bool]) -> Iterable[int]:
    return ()


_SAVES: dict[str, Callable[[list[bool]], Iterable[int]]] = {
    # which tensors a derivative keeps, given which arguments need gradients: argument
    # indices, -1 for the node's own result (torch's derivatives.yaml)
    "mul": lambda g: [1] * g[0] + [0] * g[1],
    "matmul": lambda g: [1] * g[0] + [0] * g[1],
    "div": lambda g: [1] + [0, -1] * g[1],
    "pow": lambda g: [0, 1, -1],
    "exp": lambda g: [-1],
    "tanh": lambda g: [-1],
    "sigmoid": lambda g: [-1],
    "sqrt": lambda g: [-1],
    "relu": lambda g: [-1],
    "log": lambda g: [0],
    "sin": lambda g: [0],
    "cos": lambda g: [0],
    "abs": lambda g: [0],
    "softplus": lambda g: [0],
}


def _buffers(node: Node, numel: int, shapes: list[Shape], grads: list[bool], operands: int) -> int:
    """Elements alive while backward passes ``node``: its incoming gradient, and what its
    derivative makes for each argument that needs one (full-size before a broadcast
    argument's gradient is summed back to its shape)."""
    wanted = sum(grads)
    match node.op:
        case "mean":
            return count(shapes[0])  # the incoming number spread over the input
        case "sum":
            return 0  # an expanded view; its consumer makes the full-size product
        case "mul":
            return numel * (1 + wanted)
        case "matmul":
            sizes = [count(s) for s in shapes]
            return numel + sum(n for n, g in zip(sizes, grads, strict=True) if g) + operands
        case "div":
            return numel * (1 + grads[0] + 3 * grads[1])
        case "pow":
            return 4 * numel
    return BACKWARD_BUFFERS.get(node.op, BACKWARD_BUFFERS[""]) * numel


def _matmul_operands(node: Node, shapes: list[Shape]) -> int:
    """Elements of the operands a batched matmul expands and copies (0 for others)."""
    if node.op != "matmul" or len(shapes) != 2 or min(len(s) for s in shapes) < 1:
        return 0
    a, b = shapes
    if len(a) < 3 and len(b) < 3:
        return 0
    batch = count(np.broadcast_shapes(a[:-2], b[:-2]))
    return batch * (count(a[-2:]) + count(b[-2:]))


def _layers(
    layers: list[Any],
    x: Shape,
    trainable: set[str],
    limits: Limits,
    train: bool,
    flat: bool = False,
) -> Computed:
    """Layer by layer (``flat``: one linear model, its parameters unprefixed)."""
    first = next((layer for layer in layers if isinstance(layer, specs.LinearLayer)), None)
    if first is not None and first.in_features == 1 and (not x or x[-1] != 1):
        x = (*x, 1)  # as Model._features fits a batch of numbers to one feature
    if first is not None and (not x or x[-1] != first.in_features):
        return Computed()
    rows = count(x) // max(1, x[-1]) if x else 1
    widths = [
        w
        for layer in layers
        if isinstance(layer, specs.LinearLayer)
        for w in (layer.in_features, layer.out_features)
    ]
    if rows * max(widths, default=1) > limits.activation_elements:
        return Computed()  # refused before anything is computed
    shape, grad = x, False
    kept = saved = backward = live = masks = 0
    for i, layer in enumerate(layers):
        before = count(shape) if i else 0  # x itself is the batch's
        prefix = "" if flat else f"{i}."
        learns = any(n.startswith(prefix) for n in trainable)
        if i and _saves_input(layer, grad, learns):
            saved += before  # the previous output, kept by this layer's derivative
        grad = grad or learns
        if isinstance(layer, specs.LinearLayer):
            shape = (*shape[:-1], layer.out_features)
        numel = count(shape)
        stats = 2 * rows if isinstance(layer, specs.LayerNormLayer) else 0
        saved += stats  # layer norm's mean and reciprocal deviation per row
        if isinstance(layer, specs.DropoutLayer) and train:
            masks += numel
        last = i == len(layers) - 1
        # while it computes: what earlier derivatives saved, its input and its output
        kept = max(kept, saved + before + numel)
        if grad and (layer.type in _SAVES_RESULT or last):
            saved += numel  # the loss keeps the outputs
        if grad:
            buffers = BACKWARD_BUFFERS.get(layer.type, BACKWARD_BUFFERS[""])
            backward = max(backward, buffers * numel)
        live = max(live, before + numel + stats)
    return Computed(
        kept=kept, saved=saved, backward=backward, live=live, masks=masks, outputs=shape
    )


_SAVES_RESULT = frozenset({"relu", "tanh", "sigmoid", "softmax"})


def _saves_input(layer: Any, grad: bool, learns: bool) -> bool:
    """Whether this layer's derivative keeps its input: a linear layer to make its weight's
    gradient, GELU and layer norm to make their input's."""
    if isinstance(layer, specs.LinearLayer):
        return learns
    return layer.type in ("gelu", "layer_norm") and (grad or learns)


def optimizer_elements(spec: specs.OptimizerBase, trainable: Mapping[str, Shape]) -> int:
    """Elements of the optimizer's state once it has stepped (its ``step`` counts aside)."""
    t = sum(count(s) for s in trainable.values())
    match spec:
        case specs.SGD():
            return t if spec.momentum > 0 else 0
        case specs.Adam():  # and AdamW
            return (3 if spec.amsgrad else 2) * t
        case specs.RMSprop():
            return t * (1 + (spec.momentum > 0) + spec.centered)
        case specs.Adagrad():
            return t
    return 2 * t  # pragma: no cover - the union is closed
