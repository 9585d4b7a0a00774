"""Model specs to torch modules, from a closed registry: expression, linear, sequential.

Parameters are named as torch names them (``weight``, ``0.bias``, ...). Random
initialisation uses a ``torch.Generator`` seeded from the spec, never the global RNG, so the
same spec always gives the same parameters, whichever thread or process builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from service.engine import hints, layers, specs
from service.engine.expression import Expression, Node, parsed
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.engine.tensors import DTYPES, decode, is_tensor_form
from service.engine.trace import Tracer, elementwise_locals
from service.errors import GradsvcError, InvalidInput, ShapeError, SpecError, TensorError, short

Inputs = dict[str, torch.Tensor]
L = TypeVar("L", bound=nn.Linear)


class ExpressionModule(nn.Module):
    """Evaluates a parsed expression over its parameters and the batch's named inputs."""

    def __init__(
        self, expression: Expression, params: dict[str, torch.Tensor], limits: Limits
    ) -> None:
        super().__init__()
        self.expression = expression
        self.limits = limits
        self.param_names = tuple(params)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, inputs: Inputs, tracer: Tracer | None = None) -> torch.Tensor:
        env = {name: getattr(self, name) for name in self.param_names} | inputs
        dtype = next(iter(env.values())).dtype if env else torch.float32
        cache: dict[str, torch.Tensor] = {}
        out = self._eval(self.expression.root, env, dtype, cache, tracer)
        return out

    def _eval(
        self,
        node: Node,
        env: Inputs,
        dtype: torch.dtype,
        cache: dict[str, torch.Tensor],
        tracer: Tracer | None,
    ) -> torch.Tensor:
        # The same sub-expression twice is one node: it is computed once and traced once.
        if node.text in cache:
            return cache[node.text]
        if node.op == "name":
            value = env[node.text]
            if tracer is not None:
                tracer.leaf(node.text, "param" if node.text in self.param_names else "input", value)
        elif node.op == "const":
            value = torch.tensor(node.constant, dtype=dtype, requires_grad=tracer is not None)
            if tracer is not None:
                tracer.leaf(node.text, "const", value)
        else:
            args = [self._eval(child, env, dtype, cache, tracer) for child in node.children]
            if len(args) > 1:  # broadcasting and matmul can grow: measure before computing
                _check_activation(node.shape(*(a.shape for a in args)), self.limits)
            value = node.apply(*args)
            if tracer is not None:
                names = [child.text for child in node.children]
                if node.elementwise:
                    tracer.spend(value.numel() * len(names))  # before computing them
                local = (
                    elementwise_locals(node.apply, args, names, value.shape)
                    if node.elementwise
                    else None
                )
                tracer.record(node.text, node.op, names, value, local)
        cache[node.text] = value
        return value


class TracedSequential(nn.Sequential):
    """``nn.Sequential`` that can report each layer's output to a tracer."""

    ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU)

    def forward(self, x: torch.Tensor, tracer: Tracer | None = None) -> torch.Tensor:
        previous = "x"
        for name, layer in self.named_children():
            out = layer(x)
            if tracer is not None:
                params = [f"{name}.{p}" for p, _ in layer.named_parameters()]
                for pname, value in layer.named_parameters():
                    tracer.leaf(f"{name}.{pname}", "param", value)
                local = None
                if isinstance(layer, self.ELEMENTWISE):
                    tracer.spend(out.numel())
                    local = elementwise_locals(layer, [x], [previous], out.shape)
                op = _LAYER_OPS.get(type(layer), type(layer).__name__.lower())
                tracer.record(name, op, [previous, *params], out, local)
            x, previous = out, name
        return x


class TracedLinear(nn.Linear):
    def forward(self, x: torch.Tensor, tracer: Tracer | None = None) -> torch.Tensor:
        out = super().forward(x)
        if tracer is not None:
            names = ["x"]
            for pname, value in self.named_parameters():
                tracer.leaf(pname, "param", value)
                names.append(pname)
            tracer.record("linear", "linear", names, out)
        return out


_LAYER_OPS: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.GELU: "gelu",
    nn.Softmax: "softmax",
    nn.LayerNorm: "layer_norm",
    nn.Dropout: "dropout",
    nn.MaxPool1d: "max_pool1d",
    nn.MaxPool2d: "max_pool2d",
    nn.AvgPool1d: "avg_pool1d",
    nn.AvgPool2d: "avg_pool2d",
    nn.BatchNorm1d: "batch_norm1d",
    nn.BatchNorm2d: "batch_norm2d",
}


@dataclass
class Model:
    """A built model: its module, and how a batch's ``x`` maps onto its inputs."""

    spec: specs.ExpressionModel | specs.LinearModel | specs.SequentialModel
    module: nn.Module
    dtype: torch.dtype
    inputs: tuple[str, ...]
    in_features: int | None = None
    widest: int = 1
    """The most features any layer computes per row."""
    limits: Limits = DEFAULT_LIMITS
    device: torch.device = torch.device("cpu")
    shaped: bool = False
    """Whether it has convolutions, pools, recurrent layers...: its shapes are propagated."""
    embedding: specs.EmbeddingLayer | None = None
    """The first layer when it is an embedding: x is then int64 indices."""

    @property
    def has_dropout(self) -> bool:
        return any(
            isinstance(m, nn.Dropout) or (isinstance(m, nn.RNNBase) and m.dropout > 0)
            for m in self.module.modules()
        )

    @property
    def batchable(self) -> bool:
        """Whether sessions of this model may share one vmapped call: not with dropout (each
        session draws its own masks), nor with shaped layers (kept out until vmap over them is
        shown exact here)."""
        return not self.has_dropout and not self.shaped

    @property
    def has_batch_norm(self) -> bool:
        """Whether a layer normalises over the batch in train mode (its rows are then not
        separable, and its running statistics are buffers)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules())

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """The state beside the parameters that steps change but gradients do not reach:
        batch-norm's ``running_mean``, ``running_var`` and ``num_batches_tracked``."""
        return dict(self.module.named_buffers())

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def decode_inputs(self, x: Any, limits: Limits = DEFAULT_LIMITS) -> Inputs:
        """The batch's ``x`` (a tensor, or a map of named tensors) as this model's inputs."""
        if isinstance(x, dict) and not is_tensor_form(x):
            unknown = x.keys() - set(self.inputs)
            missing = set(self.inputs) - x.keys()
            if unknown or missing:
                parts = []
                if missing:
                    parts.append(f"missing input(s) {', '.join(sorted(missing))}")
                if unknown:
                    parts.append(f"unknown input(s) {', '.join(sorted(unknown))}")
                if missing and isinstance(self.spec, specs.ExpressionModel):
                    parts.append(hints.unsupplied(sorted(missing)))
                raise ShapeError(
                    f"{'; '.join(parts)}; "
                    f"the model's inputs are {', '.join(self.inputs) or 'none'}",
                    loc=("batch", "x"),
                )
            return self._placed(
                _check_batch(
                    {
                        name: _decode_at(x[name], self.dtype, limits, "batch", "x", name)
                        for name in self.inputs
                    },
                    limits,
                )
            )
        if len(self.inputs) != 1:
            named = f"the model has inputs {', '.join(self.inputs) or '(none)'}"
            if isinstance(self.spec, specs.ExpressionModel) and len(self.inputs) > 1:
                others = [n for n in self.inputs if n != "x"]
                named = f"{hints.unsupplied(others)}; {named}"
            raise ShapeError(f"{named}: give x as an object {{name: tensor}}", loc=("batch", "x"))
        dtype = self.dtype if self.embedding is None else torch.int64
        try:
            decoded = _decode_at(x, dtype, limits, "batch", "x")
        except TensorError as exc:
            if self.embedding is None:
                raise
            raise TensorError(
                f"{exc.detail}; the model's first layer is an embedding: x holds int64 indices "
                f"in [0, {self.embedding.num_embeddings})",
                loc=exc.loc,
            ) from None
        return self._placed(_check_batch({self.inputs[0]: decoded}, limits))

    def _placed(self, inputs: Inputs) -> Inputs:
        if self.device.type == "cpu":
            return inputs
        return {name: t.to(self.device, non_blocking=True) for name, t in inputs.items()}

    def forward(self, inputs: Inputs, tracer: Tracer | None = None) -> torch.Tensor:
        if inputs and all(t.numel() == 0 for t in inputs.values()):
            raise ShapeError("the batch is empty", loc=("batch", "x"))
        if tracer is not None:
            for name, value in inputs.items():
                tracer.leaf(name, "input", value)
        try:
            out = self._forward(inputs, tracer)
        except GradsvcError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ShapeError(
                f"the model cannot compute on this batch: {_first_line(exc)}"
            ) from None
        if out.numel() > self.limits.tensor_elements:  # the answer carries them all
            raise ShapeError(
                f"the model gives {out.numel()} outputs on this batch; an answer may hold "
                f"{self.limits.tensor_elements}: send a smaller batch"
            )
        return out

    def _forward(self, inputs: Inputs, tracer: Tracer | None) -> torch.Tensor:
        if isinstance(self.module, ExpressionModule):
            out = _fit_batch(self.module(inputs, tracer), inputs)
            if tracer is not None:
                tracer.refit(out)
            return out
        x = inputs["x"]
        if self.shaped:
            assert isinstance(self.spec, specs.SequentialModel)
            if self.embedding is not None:
                layers.check_indices(x, self.embedding)
            layers.propagate(self.spec, tuple(x.shape), x.dtype, self.limits)
            return self.module(x, tracer)  # type: ignore[no-any-return]
        if self.in_features is not None:
            x = self._features(x)
        rows = x.numel() // max(1, x.shape[-1]) if x.ndim else 1
        _check_activation((rows, self.widest), self.limits)
        return self.module(x, tracer)  # type: ignore[no-any-return]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features is None:  # no linear layer first: x is taken as it is
            return x
        if self.in_features == 1 and (x.ndim == 0 or x.shape[-1] != 1):
            x = x.unsqueeze(-1)
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"x has {x.shape[-1]} features in its last dimension (shape {list(x.shape)}); "
                f"the model takes {self.in_features}",
                loc=("batch", "x"),
            )
        return x


def _check_batch(inputs: Inputs, limits: Limits) -> Inputs:
    total = sum(t.numel() for t in inputs.values())
    if total > limits.batch_elements:
        raise ShapeError(
            f"the batch's inputs hold {total} elements; the limit is {limits.batch_elements}",
            loc=("batch", "x"),
        )
    return inputs


def _check_activation(shape: tuple[int, ...] | torch.Size, limits: Limits) -> None:
    numel = math.prod(shape)
    if numel > limits.activation_elements:
        raise ShapeError(
            f"the model would compute a tensor of {numel} elements on this batch; "
            f"the limit is {limits.activation_elements}"
        )


def _fit_batch(out: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Drop leading size-1 dimensions that come from parameters alone (w of shape [1] times a
    0-d x is one number, not a list of one), so the output has the batch's shape."""
    batch_ndim = max((t.ndim for t in inputs.values()), default=0)
    extra = out.ndim - batch_ndim
    if extra > 0 and all(d == 1 for d in out.shape[:extra]):
        return out.reshape(out.shape[extra:])
    return out


def build(
    spec: specs.ExpressionModel | specs.LinearModel | specs.SequentialModel,
    limits: Limits = DEFAULT_LIMITS,
    device: str = "cpu",
) -> Model:
    """A fresh model from its spec, its parameters on ``device``; SpecError (with ``loc`` under
    ``model``) if it cannot be built. Initial values are drawn on the CPU, so a seed gives the
    same model on every device."""
    try:
        model = _BUILDERS[spec.type](spec, limits)
    except GradsvcError as exc:
        raise exc.at("model") from None
    model.limits = limits
    names = model.named_parameters()
    for name in spec.frozen:
        if name not in names:
            raise SpecError(
                f"frozen names unknown parameter {short(name)}", loc=("model", "frozen")
            )
        names[name].requires_grad_(False)
    if device != "cpu":
        model.device = torch.device(device)
        model.module.to(model.device)
    return model


def _build_expression(spec: specs.ExpressionModel, limits: Limits) -> Model:
    try:
        expression = parsed(spec.expression, limits)
    except GradsvcError as exc:
        raise exc.at("expression") from None
    dtype = DTYPES[spec.dtype]
    unused = [name for name in spec.params if name not in expression.names]
    if unused:
        raise SpecError(
            f"parameter(s) not used by the expression: {', '.join(map(short, unused[:5]))}",
            loc=("params",),
        )
    generator = torch.Generator().manual_seed(spec.seed)
    params: dict[str, torch.Tensor] = {}
    total = 0
    for name, pspec in spec.params.items():
        if pspec.value is None and pspec.shape is None:
            raise SpecError(
                "an expression parameter needs 'value', or 'shape' and 'init'", loc=("params", name)
            )
        if pspec.shape is not None:  # before allocating it
            _check_model_size(total + math.prod(pspec.shape), limits)
        params[name] = _initial(pspec, pspec.shape, dtype, generator, limits, name)
        total += params[name].numel()
        _check_model_size(total, limits)
    inputs = tuple(n for n in expression.names if n not in params)
    return Model(spec, ExpressionModule(expression, params, limits), dtype, inputs)


def _build_linear(spec: specs.LinearModel, limits: Limits) -> Model:
    _check_width(spec.in_features, spec.out_features, limits, ())
    _check_model_size(_linear_size(spec), limits)
    dtype = DTYPES[spec.dtype]
    module = TracedLinear(
        spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype, device="meta"
    ).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(spec.seed)
    _reset(module, generator)
    _apply_params(module, spec.params, dtype, generator, limits)
    widest = max(spec.in_features, spec.out_features)
    return Model(spec, module, dtype, ("x",), in_features=spec.in_features, widest=widest)


def _build_sequential(spec: specs.SequentialModel, limits: Limits) -> Model:
    if len(spec.layers) > limits.layers:
        raise SpecError(f"{len(spec.layers)} layers; the limit is {limits.layers}", loc=("layers",))
    dtype = DTYPES[spec.dtype]
    layers.check_embedding(spec)
    total, width, modules = 0, None, []
    in_features = None
    opaque = False  # a shaped layer came before: the first linear's width is not x's
    for i, layer in enumerate(spec.layers):
        loc = ("layers", i)
        if isinstance(layer, layers.SHAPED):
            layers.check(layer, limits, loc)
            meta = layers.make(layer, dtype, loc, "meta")
            total += sum(p.numel() for p in meta.parameters())
            _check_model_size(total, limits)  # before allocating it
            width = _shaped_width(layer, width, loc)
            opaque = True
            modules.append(meta.to_empty(device="cpu"))
            continue
        if isinstance(layer, specs.LinearLayer):
            _check_width(layer.in_features, layer.out_features, limits, loc)
            if width is not None and layer.in_features != width:
                raise SpecError(
                    f"layer {i} takes {layer.in_features} features but receives {width}",
                    loc=(*loc, "in_features"),
                )
            if in_features is None and width is None and not opaque:
                in_features = layer.in_features
            width = layer.out_features
            total += _linear_size(layer)
        elif isinstance(layer, specs.LayerNormLayer):
            shape = (
                [layer.normalized_shape]
                if isinstance(layer.normalized_shape, int)
                else layer.normalized_shape
            )
            if math.prod(shape) > limits.layer_width or len(shape) > limits.tensor_dims:
                raise SpecError(
                    f"normalized_shape is larger than the limit {limits.layer_width}", loc=loc
                )
            if width is not None and shape[-1] != width:
                raise SpecError(
                    f"layer {i} normalises {shape[-1]} features but receives {width}", loc=loc
                )
            total += 2 * math.prod(shape)
        _check_model_size(total, limits)
        modules.append(layer_module(layer, dtype, loc))
    module = TracedSequential(*modules)
    generator = torch.Generator().manual_seed(spec.seed)
    for child in module.children():
        _reset(child, generator)
        layers.reset(child, generator)
    _apply_params(module, spec.params, dtype, generator, limits)
    widths = [w for layer in spec.layers for w in _widths(layer)]
    return Model(
        spec,
        module,
        dtype,
        ("x",),
        in_features=in_features,
        widest=max(widths, default=1),
        shaped=layers.is_shaped(spec),
        embedding=layers.embedding_first(spec),
    )


def _shaped_width(layer: Any, width: int | None, loc: tuple[str | int, ...]) -> int | None:
    """The features per time step after a shaped layer (None: not known from the specs)."""
    if isinstance(layer, specs.RecurrentLayer):
        if width is not None and layer.input_size != width:
            raise SpecError(
                f"layer {loc[-1]} takes {layer.input_size} features but receives {width}",
                loc=(*loc, "input_size"),
            )
        return layer.hidden_size * (2 if layer.bidirectional else 1)
    if isinstance(layer, specs.EmbeddingLayer):
        return layer.embedding_dim
    if isinstance(layer, specs.LastLayer):
        return width
    return None


def _uninitialised(cls: type[L], spec: specs.LinearLayer, dtype: torch.dtype) -> L:
    """A linear layer with memory but no values yet: ``_reset`` draws them from the seed."""
    layer = cls(spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype, device="meta")
    return layer.to_empty(device="cpu")


def layer_module(
    layer: Any, dtype: torch.dtype, loc: tuple[str | int, ...] = (), device: str = "cpu"
) -> nn.Module:
    """A layer's torch module, on ``device`` ("meta": shapes only), its values not yet drawn.

    Raises:
        SpecError: torch refuses the layer's arguments (at ``loc``).
    """
    if isinstance(layer, layers.SHAPED):
        module = layers.make(layer, dtype, loc, "meta")
        return module if device == "meta" else module.to_empty(device=device)
    match layer:
        case specs.LinearLayer() if device == "meta":
            return nn.Linear(layer.in_features, layer.out_features, layer.bias, "meta", dtype)
        case specs.LinearLayer():
            return _uninitialised(nn.Linear, layer, dtype)
        case specs.Activation(type="relu"):
            return nn.ReLU()
        case specs.Activation(type="tanh"):
            return nn.Tanh()
        case specs.Activation(type="sigmoid"):
            return nn.Sigmoid()
        case specs.GeluLayer():
            return nn.GELU(approximate=layer.approximate)
        case specs.SoftmaxLayer():
            return nn.Softmax(dim=layer.dim)
        case specs.LayerNormLayer():
            return nn.LayerNorm(
                layer.normalized_shape,
                eps=layer.eps,
                elementwise_affine=layer.elementwise_affine,
                bias=layer.bias,
                dtype=dtype,
                device=device,
            )
        case specs.DropoutLayer():
            return nn.Dropout(layer.p)
    raise SpecError(f"unknown layer {layer!r}")  # pragma: no cover - the spec union is closed


def _reset(module: nn.Module, generator: torch.Generator) -> None:
    """torch's own default initialisation, drawn from ``generator``."""
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _apply_params(
    module: nn.Module,
    overrides: dict[str, specs.ParamSpec],
    dtype: torch.dtype,
    generator: torch.Generator,
    limits: Limits,
) -> None:
    params = dict(module.named_parameters())
    for name, pspec in overrides.items():
        if name not in params:
            raise SpecError(
                f"unknown parameter {short(name)}; the model has {', '.join(params) or 'none'}",
                loc=("params", name),
            )
        target = params[name]
        if pspec.shape is not None and list(pspec.shape) != list(target.shape):
            raise SpecError(
                f"{name} has shape {list(target.shape)}, not {pspec.shape}",
                loc=("params", name, "shape"),
            )
        value = _initial(pspec, list(target.shape), dtype, generator, limits, name)
        if value.shape != target.shape:
            raise SpecError(
                f"value for {name} has shape {list(value.shape)}; "
                f"the parameter's shape is {list(target.shape)}",
                loc=("params", name, "value"),
            )
        with torch.no_grad():
            target.copy_(value)


def _initial(
    pspec: specs.ParamSpec,
    shape: list[int] | None,
    dtype: torch.dtype,
    generator: torch.Generator,
    limits: Limits,
    name: str,
) -> torch.Tensor:
    if pspec.value is not None:
        try:
            return decode(pspec.value, dtype, limits)
        except GradsvcError as exc:
            raise exc.at("params", name, "value") from None
    assert shape is not None
    tensor = torch.empty(shape, dtype=dtype)
    try:
        _INITS[pspec.init](tensor, pspec, generator)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise SpecError(
            f"cannot initialise {name} with {pspec.init}: {_first_line(exc)}", loc=("params", name)
        ) from None
    return tensor


_INITS: dict[str, Callable[[torch.Tensor, specs.ParamSpec, torch.Generator], object]] = {
    "zeros": lambda t, p, g: nn.init.zeros_(t),
    "ones": lambda t, p, g: nn.init.ones_(t),
    "normal": lambda t, p, g: nn.init.normal_(t, p.mean, p.std, generator=g),
    "uniform": lambda t, p, g: nn.init.uniform_(t, p.a, p.b, generator=g),
    "xavier_uniform": lambda t, p, g: nn.init.xavier_uniform_(t, p.gain, generator=g),
    "kaiming_uniform": lambda t, p, g: nn.init.kaiming_uniform_(t, p.a, generator=g),
}


def _widths(layer: Any) -> list[int]:
    if isinstance(layer, specs.LinearLayer):
        return [layer.in_features, layer.out_features]
    return []


def _linear_size(layer: specs.LinearLayer) -> int:
    return layer.in_features * layer.out_features + (layer.out_features if layer.bias else 0)


def _check_width(n_in: int, n_out: int, limits: Limits, loc: tuple[str | int, ...]) -> None:
    if max(n_in, n_out) > limits.layer_width:
        raise SpecError(f"a linear layer is wider than the limit {limits.layer_width}", loc=loc)


def _check_model_size(total: int, limits: Limits) -> None:
    if total > limits.model_elements:
        raise SpecError(f"the model has more than {limits.model_elements} parameters")


def _decode_at(value: Any, dtype: torch.dtype, limits: Limits, *loc: str) -> torch.Tensor:
    try:
        return decode(value, dtype, limits)
    except TensorError as exc:
        raise exc.at(*loc) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:300]


_BUILDERS: dict[str, Callable[[Any, Limits], Model]] = {
    "expression": _build_expression,
    "linear": _build_linear,
    "sequential": _build_sequential,
}

__all__ = ["Model", "build", "InvalidInput"]
