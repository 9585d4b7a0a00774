"""The shaped layers of a sequential model: convolutions, pools, flatten, embedding,
batch-norm, LSTM, GRU and ``last``, each torch.nn's own module, with torch's arguments and
parameter names.

A layer is first made on the meta device: torch's constructor checks its arguments and
tells its parameters' shapes without allocating them, so the model's size limit is checked
before any memory is taken. The same meta modules propagate a batch's shape through the
model, layer by layer: a batch that does not fit is refused naming the layer and the shape
it expects, and every intermediate tensor's size is known before anything is computed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from service.engine import specs
from service.engine.limits import Limits
from service.errors import ShapeError, SpecError

Shape = tuple[int, ...]

SHAPED = (
    specs.ConvLayer,
    specs.MaxPoolLayer,
    specs.AvgPoolLayer,
    specs.FlattenLayer,
    specs.EmbeddingLayer,
    specs.BatchNormLayer,
    specs.RecurrentLayer,
    specs.LastLayer,
)
"""The layers whose output shape is not the input's with its last dimension changed."""


class LSTM(nn.LSTM):
    """``nn.LSTM`` (batch first) whose output is the whole output sequence, not (h, c)."""

    def forward(self, x: torch.Tensor, hx: Any = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, hx)[0]


class GRU(nn.GRU):
    """``nn.GRU`` (batch first) whose output is the whole output sequence, not h."""

    def forward(self, x: torch.Tensor, hx: Any = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, hx)[0]


class Last(nn.Module):
    """The last time step of a batch-first sequence: ``x[:, -1]`` of ``[N, T, H]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ShapeError(f"last takes a sequence [N, T, features]; it receives {list(x.shape)}")
        return x[..., -1, :]


def is_shaped(spec: specs.SequentialModel) -> bool:
    """Whether the model has a layer of this module's (its shapes are then propagated)."""
    return any(isinstance(layer, SHAPED) for layer in spec.layers)


def _dims(layer: Any) -> int:
    return 2 if layer.type.endswith("2d") else 1


def _sizes(value: Any, layer: Any, name: str, loc: tuple[str | int, ...]) -> Any:
    """An int, or one size per spatial dimension, as torch takes it."""
    if isinstance(value, int | str) or value is None:  # str: padding "same" or "valid"
        return value
    if len(value) != _dims(layer):
        raise SpecError(
            f"{name} of {layer.type} is an int or {_dims(layer)} of them, not {len(value)}",
            loc=(*loc, name),
        )
    return tuple(value)


def make(layer: Any, dtype: torch.dtype, loc: tuple[str | int, ...], device: str) -> nn.Module:
    """The torch module of a shaped layer; SpecError (at ``loc``) if torch refuses its
    arguments."""
    sizes = {
        name: _sizes(getattr(layer, name), layer, name, loc)
        for name in ("kernel_size", "stride", "padding", "dilation")
        if hasattr(layer, name)
    }
    try:
        with warnings.catch_warnings():
            # LSTM's dropout with one layer: torch warns and ignores it, as we do.
            warnings.simplefilter("ignore", UserWarning)
            return _module(layer, sizes, dtype, device)
    except (ValueError, RuntimeError, TypeError, AssertionError) as exc:
        message = str(exc).split("\n", 1)[0][:200] or "arguments that do not fit together"
        raise SpecError(f"{layer.type}: {message}", loc=loc) from None


def _module(layer: Any, sizes: dict[str, Any], dtype: torch.dtype, device: str) -> nn.Module:
    match layer:
        case specs.ConvLayer():
            conv = nn.Conv2d if layer.type == "conv2d" else nn.Conv1d
            return conv(
                layer.in_channels,
                layer.out_channels,
                groups=layer.groups,
                bias=layer.bias,
                padding_mode=layer.padding_mode,
                dtype=dtype,
                device=device,
                **sizes,
            )
        case specs.MaxPoolLayer():
            pool = nn.MaxPool2d if layer.type == "max_pool2d" else nn.MaxPool1d
            return pool(ceil_mode=layer.ceil_mode, **sizes)
        case specs.AvgPoolLayer():
            avg = nn.AvgPool2d if layer.type == "avg_pool2d" else nn.AvgPool1d
            return avg(
                ceil_mode=layer.ceil_mode, count_include_pad=layer.count_include_pad, **sizes
            )
        case specs.FlattenLayer():
            return nn.Flatten(layer.start_dim, layer.end_dim)
        case specs.EmbeddingLayer():
            return nn.Embedding(
                layer.num_embeddings,
                layer.embedding_dim,
                padding_idx=layer.padding_idx,
                dtype=dtype,
                device=device,
            )
        case specs.BatchNormLayer():
            norm = nn.BatchNorm2d if layer.type == "batch_norm2d" else nn.BatchNorm1d
            return norm(
                layer.num_features,
                eps=layer.eps,
                momentum=layer.momentum,
                affine=layer.affine,
                track_running_stats=layer.track_running_stats,
                dtype=dtype,
                device=device,
            )
        case specs.RecurrentLayer():
            rnn = LSTM if layer.type == "lstm" else GRU
            return rnn(
                layer.input_size,
                layer.hidden_size,
                num_layers=layer.num_layers,
                bias=layer.bias,
                batch_first=True,
                dropout=layer.dropout,
                bidirectional=layer.bidirectional,
                dtype=dtype,
                device=device,
            )
        case specs.LastLayer():
            return Last()
    raise SpecError(f"unknown layer {layer!r}")  # pragma: no cover - the union is closed


def check(layer: Any, limits: Limits, loc: tuple[str | int, ...]) -> None:
    """The limits a shaped layer must pass before it is made (its parameters count toward
    the model's size, which the caller checks)."""
    widths = [
        getattr(layer, name)
        for name in (
            "in_channels",
            "out_channels",
            "embedding_dim",
            "input_size",
            "hidden_size",
            "num_features",
        )
        if hasattr(layer, name)
    ]
    if max(widths, default=0) > limits.layer_width:
        raise SpecError(f"{layer.type} is wider than the limit {limits.layer_width}", loc=loc)
    if isinstance(layer, specs.MaxPoolLayer | specs.AvgPoolLayer):
        kernel, padding = _each(layer.kernel_size, layer), _each(layer.padding, layer)
        if any(2 * p > k for k, p in zip(kernel, padding, strict=False)):
            raise SpecError(
                f"{layer.type}'s padding is at most half its kernel_size (torch's rule)",
                loc=(*loc, "padding"),
            )
    if isinstance(layer, specs.RecurrentLayer) and layer.num_layers > limits.layers:
        raise SpecError(f"num_layers is over the limit {limits.layers}", loc=(*loc, "num_layers"))


def _each(value: int | list[int], layer: Any) -> list[int]:
    return [value] * _dims(layer) if isinstance(value, int) else list(value)


def reset(module: nn.Module, generator: torch.Generator) -> None:
    """torch's own default initialisation of a shaped layer, drawn from ``generator``."""
    with torch.no_grad():
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, generator=generator)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].fill_(0)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()  # ones, zeros and fresh running statistics: no draws
        elif isinstance(module, nn.RNNBase):
            bound = 1 / math.sqrt(module.hidden_size)
            for weight in module.parameters():
                nn.init.uniform_(weight, -bound, bound, generator=generator)


def expects(layer: Any) -> str:
    """The input shape a layer takes, as a message shows it."""
    match layer:
        case specs.ConvLayer():
            space = "H, W" if layer.type == "conv2d" else "L"
            return f"[N, {layer.in_channels}, {space}]"
        case specs.MaxPoolLayer() | specs.AvgPoolLayer():
            return "[N, C, H, W]" if _dims(layer) == 2 else "[N, C, L]"
        case specs.RecurrentLayer():
            return f"[N, T, {layer.input_size}]"
        case specs.BatchNormLayer() if layer.type == "batch_norm2d":
            return f"[N, {layer.num_features}, H, W]"
        case specs.BatchNormLayer():
            return f"[N, {layer.num_features}] or [N, {layer.num_features}, L]"
        case specs.EmbeddingLayer():
            return f"int64 indices in [0, {layer.num_embeddings})"
        case specs.LinearLayer():
            return f"[..., {layer.in_features}]"
        case specs.LayerNormLayer():
            norm = layer.normalized_shape
            return f"[..., {', '.join(map(str, [norm] if isinstance(norm, int) else norm))}]"
        case specs.FlattenLayer():
            ends = (layer.start_dim, layer.end_dim)
            return f"at least {max(d + 1 if d >= 0 else -d for d in ends)} dimensions"
        case specs.LastLayer():
            return "[N, T, features]"
    return "a tensor"


def propagate(
    spec: specs.SequentialModel, x: Shape, dtype: torch.dtype, limits: Limits
) -> list[Shape]:
    """Every layer's output shape on an input of shape ``x``, computed on the meta device.

    Raises:
        ShapeError: a layer cannot take what it receives (naming it and the shape it
            expects), or would compute a tensor over ``limits.activation_elements``.
    """
    meta = meta_module(spec)
    shapes: list[Shape] = []
    value = torch.empty(x, dtype=dtype, device="meta")
    for i, (layer, module) in enumerate(zip(spec.layers, meta, strict=True)):
        try:
            value = module(value)
        except (RuntimeError, ValueError, IndexError, ShapeError) as exc:
            # torch's reason too: a pool's padding over half its window is the layer's fault
            reason = str(exc).split("\n", 1)[0][:160]
            raise ShapeError(
                f"layer {i} ({layer.type}) takes {expects(layer)}; it receives "
                f"{list(value.shape)} (torch: {reason})",
                loc=("batch", "x"),
            ) from None
        if value.numel() > limits.activation_elements:
            raise ShapeError(
                f"layer {i} ({layer.type}) would compute a tensor of {value.numel()} elements "
                f"on this batch; the limit is {limits.activation_elements}: send a smaller batch",
                loc=("batch", "x"),
            )
        shapes.append(tuple(value.shape))
    return shapes


def meta_module(spec: specs.SequentialModel) -> nn.Sequential:
    """The model's layers on the meta device (shapes only), remembered per architecture."""
    key = spec.model_dump_json(include={"dtype", "layers"})
    module = _META.get(key)
    if module is None:
        from service.engine import models  # models builds every layer, and imports this

        dtype = getattr(torch, spec.dtype)
        module = nn.Sequential(
            *(
                models.layer_module(layer, dtype, ("layers", i), "meta")
                for i, layer in enumerate(spec.layers)
            )
        )
        # Eval mode: shapes only, and batch-norm's check of a training batch's size (more
        # than one value per channel) is the real run's to make, in train mode only.
        module.eval()
        if len(_META) >= 256:  # a bound, not a policy: architectures are few
            _META.clear()
        _META[key] = module
    return module


_META: dict[str, nn.Sequential] = {}


def parameter_shapes(spec: specs.SequentialModel) -> dict[str, Shape]:
    """Every parameter's shape, as ``nn.Sequential`` names them."""
    return {name: tuple(p.shape) for name, p in meta_module(spec).named_parameters()}


def buffer_shapes(spec: specs.SequentialModel) -> dict[str, Shape]:
    """Every buffer's shape (batch-norm's running statistics), as ``nn.Sequential`` names
    them."""
    return {name: tuple(b.shape) for name, b in meta_module(spec).named_buffers()}


def has_batch_norm(spec: specs.SequentialModel) -> bool:
    """Whether the model has a batch-norm layer (its train-mode outputs mix the batch's rows)."""
    return any(isinstance(layer, specs.BatchNormLayer) for layer in spec.layers)


def embedding_first(spec: specs.SequentialModel) -> specs.EmbeddingLayer | None:
    """The model's first layer when it is an embedding (its x is then int64 indices)."""
    first = spec.layers[0]
    return first if isinstance(first, specs.EmbeddingLayer) else None


def check_embedding(spec: specs.SequentialModel) -> None:
    """An embedding takes indices, which only the batch can give: it must come first."""
    for i, layer in enumerate(spec.layers[1:], start=1):
        if isinstance(layer, specs.EmbeddingLayer):
            raise SpecError(
                f"layer {i} is an embedding, which takes int64 indices: only the first layer "
                "may be one",
                loc=("layers", i),
            )


def check_indices(x: torch.Tensor, layer: specs.EmbeddingLayer) -> None:
    """Indices of an embedding in range, else a clear 422 (torch would raise IndexError)."""
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= layer.num_embeddings):
        raise ShapeError(
            f"x holds indices from {int(x.min())} to {int(x.max())}; the embedding (layer 0) "
            f"takes int64 indices in [0, {layer.num_embeddings})",
            loc=("batch", "x"),
        )


def widths(layers: Sequence[Any]) -> list[int]:
    """Features per row a shaped layer may compute (for the linear-only width rule)."""
    return [
        getattr(layer, name)
        for layer in layers
        for name in ("embedding_dim", "hidden_size")
        if hasattr(layer, name)
    ]
