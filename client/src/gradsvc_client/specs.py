"""Typed builders for every spec of the contract: models, layers, parameters, losses,
optimizers and schedulers.

Each is a frozen dataclass whose ``to_json()`` is exactly the contract's JSON: ``type``
and the fields that were given. A field left at None is not sent, so the service's default
applies (torch's, as the docstrings say). Every client method that takes a spec takes a
builder or the plain dict alike::

    from gradsvc_client.specs import SGD, Expression, SquaredLoss, Value

    model = Expression("w * x + 1", params={"w": Value([1.0])}, dtype="float64")
    model.to_json()
    # {'type': 'expression', 'expression': 'w * x + 1', 'dtype': 'float64',
    #  'params': {'w': {'value': [1.0]}}}

Tensors inside (a ``Value``) stay as given; the client encodes them on the way out (nested
lists, or b64 when large).

Where torch gives None a meaning of its own (``BatchNorm1d(momentum=None)``: a cumulative
average), ``NULL`` sends an explicit JSON ``null``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, TypeAlias

__all__ = [
    "NULL",
    "GELU",
    "GRU",
    "LSTM",
    "MSELoss",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "AvgPool1d",
    "AvgPool2d",
    "BCEWithLogitsLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CrossEntropyLoss",
    "Dropout",
    "Embedding",
    "ExponentialLR",
    "Expression",
    "Flatten",
    "HuberLoss",
    "Init",
    "L1Loss",
    "Last",
    "LayerNorm",
    "Linear",
    "LinearLR",
    "LossSpec",
    "MaxPool1d",
    "MaxPool2d",
    "ModelSpec",
    "MultiStepLR",
    "OneCycleLR",
    "OptimizerSpec",
    "RMSprop",
    "ReLU",
    "SchedulerSpec",
    "Sequential",
    "Sigmoid",
    "SmoothL1Loss",
    "Softmax",
    "Spec",
    "SquaredLoss",
    "StepLR",
    "Tanh",
    "Value",
]

DType = Literal["float32", "float64", "float16", "bfloat16"]
InitName = Literal["zeros", "ones", "normal", "uniform", "xavier_uniform", "kaiming_uniform"]
Reduction = Literal["mean", "sum"]
IntOrPair = int | tuple[int, int]


class _Null:
    """The type of ``NULL``: a field sent as JSON ``null`` rather than left out."""

    _instance: ClassVar[_Null | None] = None

    def __new__(cls) -> _Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()
"""Sends a field as JSON ``null`` where None would leave it out, for torch's own None, e.g.
``BatchNorm1d(8, momentum=NULL)`` is ``{"type": "batch_norm1d", "num_features": 8,
"momentum": null}``: a cumulative average of the running statistics."""


def _plain(value: Any) -> Any:
    """A field's JSON: builders by their ``to_json``, tuples as lists, tensors as they are."""
    if isinstance(value, Spec):
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Spec:
    """What every builder is: ``to_json()`` gives its ``type`` and the fields that were set."""

    TYPE: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """The spec as the contract's JSON.

        Returns:
            ``{"type": ..., field: value, ...}`` without the fields left at None.
        """
        out: dict[str, Any] = {"type": self.TYPE} if self.TYPE else {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is NULL:
                out[f.name] = None
            elif value is not None:
                out[f.name] = _plain(value)
        return out


# -- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value(Spec):
    """A parameter's initial value: ``{"value": T}``.

    Attributes:
        value: A number, nested lists, a numpy array or a torch tensor.
    """

    value: Any


@dataclass(frozen=True)
class Init(Spec):
    """A parameter made by an initialiser: ``{"shape": [...], "init": ...}`` (torch.nn.init's).

    Attributes:
        shape: The parameter's shape.
        init: ``zeros`` (the default), ``ones``, ``normal``, ``uniform``, ``xavier_uniform``
            or ``kaiming_uniform``.
        mean: ``normal``'s mean (0).
        std: ``normal``'s standard deviation (1).
        a: ``uniform``'s lower bound (0); ``kaiming_uniform``'s negative slope.
        b: ``uniform``'s upper bound (1).
        gain: ``xavier_uniform``'s gain (1).
    """

    shape: Sequence[int]
    init: InitName | None = None
    mean: float | None = None
    std: float | None = None
    a: float | None = None
    b: float | None = None
    gain: float | None = None


ParamSpec: TypeAlias = Value | Init | Mapping[str, Any]


# -- layers -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _ModelFields(Spec):
    """The fields every model takes (at the top of a spec only, not inside ``layers``).

    Attributes:
        dtype: ``float32`` (the default), ``float64``, ``float16`` or ``bfloat16``.
        seed: Seeds random initialisation (0).
        params: Initial values by parameter name (``Value`` or ``Init``).
        frozen: Names of parameters that are not trained.
    """

    dtype: DType | None = None
    seed: int | None = None
    params: Mapping[str, ParamSpec] | None = None
    frozen: Sequence[str] | None = None


@dataclass(frozen=True)
class Linear(_ModelFields):
    """``linear``: ``torch.nn.Linear``, parameters ``weight`` and ``bias``; a model or a layer.

    Attributes:
        in_features: Inputs per sample.
        out_features: Outputs per sample.
        bias: Whether it has a bias (true).
    """

    TYPE: ClassVar[str] = "linear"
    in_features: int
    out_features: int
    bias: bool | None = None


@dataclass(frozen=True)
class ReLU(Spec):
    """``relu``: max(0, x)."""

    TYPE: ClassVar[str] = "relu"


@dataclass(frozen=True)
class Tanh(Spec):
    """``tanh``."""

    TYPE: ClassVar[str] = "tanh"


@dataclass(frozen=True)
class Sigmoid(Spec):
    """``sigmoid``."""

    TYPE: ClassVar[str] = "sigmoid"


@dataclass(frozen=True)
class GELU(Spec):
    """``gelu``: ``torch.nn.GELU``.

    Attributes:
        approximate: ``none`` (the default) or ``tanh``.
    """

    TYPE: ClassVar[str] = "gelu"
    approximate: Literal["none", "tanh"] | None = None


@dataclass(frozen=True)
class Softmax(Spec):
    """``softmax``: ``torch.nn.Softmax``.

    Attributes:
        dim: The dimension it normalises (-1).
    """

    TYPE: ClassVar[str] = "softmax"
    dim: int | None = None


@dataclass(frozen=True)
class LayerNorm(Spec):
    """``layer_norm``: ``torch.nn.LayerNorm``, parameters ``weight`` and ``bias``.

    Attributes:
        normalized_shape: The trailing shape it normalises over.
        eps: Added to the variance (1e-5).
        elementwise_affine: Whether it has ``weight`` (true).
        bias: Whether it has ``bias`` (true).
    """

    TYPE: ClassVar[str] = "layer_norm"
    normalized_shape: int | Sequence[int]
    eps: float | None = None
    elementwise_affine: bool | None = None
    bias: bool | None = None


@dataclass(frozen=True)
class Dropout(Spec):
    """``dropout``: ``torch.nn.Dropout`` (off in ``forward``, which runs in eval mode).

    Attributes:
        p: The probability of zeroing an element (0.5).
    """

    TYPE: ClassVar[str] = "dropout"
    p: float | None = None


@dataclass(frozen=True)
class _Conv(Spec):
    in_channels: int
    out_channels: int
    kernel_size: IntOrPair
    stride: IntOrPair | None = None
    padding: IntOrPair | Literal["valid", "same"] | None = None
    dilation: IntOrPair | None = None
    groups: int | None = None
    bias: bool | None = None
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] | None = None


@dataclass(frozen=True)
class Conv1d(_Conv):
    """``conv1d``: ``torch.nn.Conv1d``, parameters ``weight`` and ``bias``.

    Attributes:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: The kernel's size.
        stride: 1 by default.
        padding: 0, ``valid`` or ``same``.
        dilation: 1 by default.
        groups: 1 by default.
        bias: true by default.
        padding_mode: ``zeros`` (the default), ``reflect``, ``replicate`` or ``circular``.
    """

    TYPE: ClassVar[str] = "conv1d"


@dataclass(frozen=True)
class Conv2d(_Conv):
    """``conv2d``: ``torch.nn.Conv2d``; its fields are ``Conv1d``'s, sizes an int or a pair."""

    TYPE: ClassVar[str] = "conv2d"


@dataclass(frozen=True)
class _MaxPool(Spec):
    kernel_size: IntOrPair
    stride: IntOrPair | None = None
    padding: IntOrPair | None = None
    dilation: IntOrPair | None = None
    ceil_mode: bool | None = None


@dataclass(frozen=True)
class MaxPool1d(_MaxPool):
    """``max_pool1d``: ``torch.nn.MaxPool1d``.

    Attributes:
        kernel_size: The window's size.
        stride: The window's step (``kernel_size``).
        padding: 0 by default.
        dilation: 1 by default.
        ceil_mode: false by default.
    """

    TYPE: ClassVar[str] = "max_pool1d"


@dataclass(frozen=True)
class MaxPool2d(_MaxPool):
    """``max_pool2d``: ``torch.nn.MaxPool2d``; its fields are ``MaxPool1d``'s."""

    TYPE: ClassVar[str] = "max_pool2d"


@dataclass(frozen=True)
class _AvgPool(Spec):
    kernel_size: IntOrPair
    stride: IntOrPair | None = None
    padding: IntOrPair | None = None
    ceil_mode: bool | None = None
    count_include_pad: bool | None = None


@dataclass(frozen=True)
class AvgPool1d(_AvgPool):
    """``avg_pool1d``: ``torch.nn.AvgPool1d``.

    Attributes:
        kernel_size: The window's size.
        stride: The window's step (``kernel_size``).
        padding: 0 by default.
        ceil_mode: false by default.
        count_include_pad: true by default.
    """

    TYPE: ClassVar[str] = "avg_pool1d"


@dataclass(frozen=True)
class AvgPool2d(_AvgPool):
    """``avg_pool2d``: ``torch.nn.AvgPool2d``; its fields are ``AvgPool1d``'s."""

    TYPE: ClassVar[str] = "avg_pool2d"


@dataclass(frozen=True)
class Flatten(Spec):
    """``flatten``: ``torch.nn.Flatten``.

    Attributes:
        start_dim: The first dimension flattened (1).
        end_dim: The last (-1).
    """

    TYPE: ClassVar[str] = "flatten"
    start_dim: int | None = None
    end_dim: int | None = None


@dataclass(frozen=True)
class Embedding(Spec):
    """``embedding``: ``torch.nn.Embedding`` (int64 inputs), parameter ``weight``.

    Attributes:
        num_embeddings: The vocabulary's size.
        embedding_dim: Each embedding's size.
        padding_idx: An index whose embedding is not trained.
    """

    TYPE: ClassVar[str] = "embedding"
    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None


@dataclass(frozen=True)
class _BatchNorm(Spec):
    num_features: int
    eps: float | None = None
    momentum: float | _Null | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None


@dataclass(frozen=True)
class BatchNorm1d(_BatchNorm):
    """``batch_norm1d``: ``torch.nn.BatchNorm1d``; running statistics are session buffers.

    Attributes:
        num_features: Channels (or features).
        eps: Added to the variance (1e-5).
        momentum: Of the running statistics (0.1); ``NULL`` for torch's None, a cumulative
            average.
        affine: Whether it has ``weight`` and ``bias`` (true).
        track_running_stats: true by default.
    """

    TYPE: ClassVar[str] = "batch_norm1d"


@dataclass(frozen=True)
class BatchNorm2d(_BatchNorm):
    """``batch_norm2d``: ``torch.nn.BatchNorm2d``; its fields are ``BatchNorm1d``'s."""

    TYPE: ClassVar[str] = "batch_norm2d"


@dataclass(frozen=True)
class _Recurrent(Spec):
    input_size: int
    hidden_size: int
    num_layers: int | None = None
    bias: bool | None = None
    dropout: float | None = None
    bidirectional: bool | None = None


@dataclass(frozen=True)
class LSTM(_Recurrent):
    """``lstm``: ``torch.nn.LSTM`` with ``batch_first``; the output is the whole sequence.

    Attributes:
        input_size: Features per time step.
        hidden_size: The hidden state's size.
        num_layers: 1 by default.
        bias: true by default.
        dropout: Between layers (0).
        bidirectional: false by default.
    """

    TYPE: ClassVar[str] = "lstm"


@dataclass(frozen=True)
class GRU(_Recurrent):
    """``gru``: ``torch.nn.GRU`` with ``batch_first``; its fields are ``LSTM``'s."""

    TYPE: ClassVar[str] = "gru"


@dataclass(frozen=True)
class Last(Spec):
    """``last``: the last time step of a sequence (after ``lstm`` or ``gru``)."""

    TYPE: ClassVar[str] = "last"


LayerSpec: TypeAlias = (
    Linear
    | ReLU
    | Tanh
    | Sigmoid
    | GELU
    | Softmax
    | LayerNorm
    | Dropout
    | Conv1d
    | Conv2d
    | MaxPool1d
    | MaxPool2d
    | AvgPool1d
    | AvgPool2d
    | Flatten
    | Embedding
    | BatchNorm1d
    | BatchNorm2d
    | LSTM
    | GRU
    | Last
    | Mapping[str, Any]
)


# -- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression(_ModelFields):
    """``expression``: a formula over parameters (names in ``params``) and inputs (the rest).

    Attributes:
        expression: Numbers, names, ``+ - * / ** @``, unary ``-``, parentheses, and
            ``exp log sqrt abs sin cos tanh sigmoid relu softplus sum mean``.
    """

    TYPE: ClassVar[str] = "expression"
    expression: str


@dataclass(frozen=True)
class Sequential(_ModelFields):
    """``sequential``: layers in order; parameters named as torch.nn.Sequential names them.

    Attributes:
        layers: The layers (``0.weight``, ``0.bias``, ... are the first one's parameters).
    """

    TYPE: ClassVar[str] = "sequential"
    layers: Sequence[LayerSpec]


ModelSpec: TypeAlias = Expression | Linear | Sequential | Mapping[str, Any]
"""A model: a builder or the contract's dict."""


# -- losses -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Loss(Spec):
    reduction: Reduction | None = None


@dataclass(frozen=True, kw_only=True)
class SquaredLoss(_Loss):
    """``squared``: ½(ŷ−y)², the notebook's loss.

    Attributes:
        reduction: ``mean`` over the batch (the default) or ``sum``.
    """

    TYPE: ClassVar[str] = "squared"


@dataclass(frozen=True, kw_only=True)
class MSELoss(_Loss):
    """``mse``: ``torch.nn.MSELoss``; ``reduction`` ``mean`` or ``sum``."""

    TYPE: ClassVar[str] = "mse"


@dataclass(frozen=True, kw_only=True)
class L1Loss(_Loss):
    """``l1``: ``torch.nn.L1Loss``; ``reduction`` ``mean`` or ``sum``."""

    TYPE: ClassVar[str] = "l1"


@dataclass(frozen=True, kw_only=True)
class HuberLoss(_Loss):
    """``huber``: ``torch.nn.HuberLoss``.

    Attributes:
        delta: Where it turns from quadratic to linear (1).
        reduction: ``mean`` or ``sum``.
    """

    TYPE: ClassVar[str] = "huber"
    delta: float | None = None


@dataclass(frozen=True, kw_only=True)
class SmoothL1Loss(_Loss):
    """``smooth_l1``: ``torch.nn.SmoothL1Loss``.

    Attributes:
        beta: Where it turns from quadratic to linear (1).
        reduction: ``mean`` or ``sum``.
    """

    TYPE: ClassVar[str] = "smooth_l1"
    beta: float | None = None


@dataclass(frozen=True, kw_only=True)
class BCEWithLogitsLoss(_Loss):
    """``bce_with_logits``: ``torch.nn.BCEWithLogitsLoss``; ``reduction`` ``mean`` or ``sum``."""

    TYPE: ClassVar[str] = "bce_with_logits"


@dataclass(frozen=True, kw_only=True)
class CrossEntropyLoss(_Loss):
    """``cross_entropy``: ``torch.nn.CrossEntropyLoss`` (int64 class targets, or probabilities).

    Attributes:
        label_smoothing: 0 to 1 (0).
        reduction: ``mean`` or ``sum``.
    """

    TYPE: ClassVar[str] = "cross_entropy"
    label_smoothing: float | None = None


LossSpec: TypeAlias = (
    SquaredLoss
    | MSELoss
    | L1Loss
    | HuberLoss
    | SmoothL1Loss
    | BCEWithLogitsLoss
    | CrossEntropyLoss
    | str
    | Mapping[str, Any]
)
"""A loss: a builder, a name (``"squared"``), or the contract's dict."""


# -- optimizers -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Optimizer(Spec):
    """What every optimizer takes besides its own hyper-parameters.

    Attributes:
        clip_grad_norm: Clip the gradients' total 2-norm to this before the update.
        weight_decay: L2 penalty (0; ``adamw``: 0.01, decoupled).
        maximize: Maximise the loss instead (false).
    """

    clip_grad_norm: float | None = None
    weight_decay: float | None = None
    maximize: bool | None = None


@dataclass(frozen=True)
class SGD(_Optimizer):
    """``sgd``: ``torch.optim.SGD``.

    Attributes:
        lr: The learning rate (1e-3).
        momentum: 0 by default.
        dampening: 0 by default.
        nesterov: false by default (true needs momentum > 0 and dampening 0).
    """

    TYPE: ClassVar[str] = "sgd"
    lr: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None


@dataclass(frozen=True)
class Adam(_Optimizer):
    """``adam``: ``torch.optim.Adam``.

    Attributes:
        lr: The learning rate (1e-3).
        betas: The moments' decay rates ((0.9, 0.999)).
        eps: Added to the denominator (1e-8).
        amsgrad: false by default.
    """

    TYPE: ClassVar[str] = "adam"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    amsgrad: bool | None = None


@dataclass(frozen=True)
class AdamW(Adam):
    """``adamw``: ``torch.optim.AdamW``; ``Adam``'s fields, ``weight_decay`` 0.01."""

    TYPE: ClassVar[str] = "adamw"


@dataclass(frozen=True)
class RMSprop(_Optimizer):
    """``rmsprop``: ``torch.optim.RMSprop``.

    Attributes:
        lr: The learning rate (1e-2).
        alpha: The smoothing constant (0.99).
        eps: Added to the denominator (1e-8).
        momentum: 0 by default.
        centered: false by default.
    """

    TYPE: ClassVar[str] = "rmsprop"
    lr: float | None = None
    alpha: float | None = None
    eps: float | None = None
    momentum: float | None = None
    centered: bool | None = None


@dataclass(frozen=True)
class Adagrad(_Optimizer):
    """``adagrad``: ``torch.optim.Adagrad``.

    Attributes:
        lr: The learning rate (1e-2).
        lr_decay: 0 by default.
        initial_accumulator_value: 0 by default.
        eps: Added to the denominator (1e-10).
    """

    TYPE: ClassVar[str] = "adagrad"
    lr: float | None = None
    lr_decay: float | None = None
    initial_accumulator_value: float | None = None
    eps: float | None = None


OptimizerSpec: TypeAlias = SGD | Adam | AdamW | RMSprop | Adagrad | Mapping[str, Any]
"""An optimizer: a builder or the contract's dict."""


# -- schedulers (torch.optim.lr_scheduler's, stepped after every optimizer step) --------------


@dataclass(frozen=True)
class StepLR(Spec):
    """``step``: ``StepLR``: lr times ``gamma`` every ``step_size`` steps.

    Attributes:
        step_size: Steps between decays.
        gamma: The factor (0.1).
    """

    TYPE: ClassVar[str] = "step"
    step_size: int
    gamma: float | None = None


@dataclass(frozen=True)
class MultiStepLR(Spec):
    """``multistep``: ``MultiStepLR``: lr times ``gamma`` at each milestone.

    Attributes:
        milestones: The steps at which it decays.
        gamma: The factor (0.1).
    """

    TYPE: ClassVar[str] = "multistep"
    milestones: Sequence[int]
    gamma: float | None = None


@dataclass(frozen=True)
class ExponentialLR(Spec):
    """``exponential``: ``ExponentialLR``: lr times ``gamma`` every step.

    Attributes:
        gamma: The factor.
    """

    TYPE: ClassVar[str] = "exponential"
    gamma: float


@dataclass(frozen=True)
class CosineAnnealingLR(Spec):
    """``cosine``: ``CosineAnnealingLR``.

    Attributes:
        T_max: Steps of a half cosine.
        eta_min: The lowest lr (0).
    """

    TYPE: ClassVar[str] = "cosine"
    T_max: int
    eta_min: float | None = None


@dataclass(frozen=True)
class LinearLR(Spec):
    """``linear``: ``LinearLR``: lr times a factor going linearly from start to end.

    Attributes:
        start_factor: 1/3 by default.
        end_factor: 1 by default.
        total_iters: Steps to go from one to the other (5).
    """

    TYPE: ClassVar[str] = "linear"
    start_factor: float | None = None
    end_factor: float | None = None
    total_iters: int | None = None


@dataclass(frozen=True)
class OneCycleLR(Spec):
    """``onecycle``: ``OneCycleLR``.

    Attributes:
        max_lr: The peak learning rate.
        total_steps: The cycle's steps (or give ``epochs`` and ``steps_per_epoch``).
        epochs: With ``steps_per_epoch``, instead of ``total_steps``.
        steps_per_epoch: With ``epochs``.
        pct_start: The rising share of the cycle (0.3).
        anneal_strategy: ``cos`` (the default) or ``linear``.
        div_factor: Initial lr = max_lr / div_factor (25).
        final_div_factor: Final lr = initial lr / final_div_factor (1e4).
        three_phase: false by default.
        cycle_momentum: true by default (needs an optimizer with momentum or betas).
        base_momentum: 0.85 by default.
        max_momentum: 0.95 by default.
    """

    TYPE: ClassVar[str] = "onecycle"
    max_lr: float
    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float | None = None
    anneal_strategy: Literal["cos", "linear"] | None = None
    div_factor: float | None = None
    final_div_factor: float | None = None
    three_phase: bool | None = None
    cycle_momentum: bool | None = None
    base_momentum: float | None = None
    max_momentum: float | None = None


@dataclass(frozen=True)
class CosineAnnealingWarmRestarts(Spec):
    """``cosine_warm_restarts``: ``CosineAnnealingWarmRestarts``.

    Attributes:
        T_0: Steps before the first restart.
        T_mult: Each period's factor over the last (1).
        eta_min: The lowest lr (0).
    """

    TYPE: ClassVar[str] = "cosine_warm_restarts"
    T_0: int
    T_mult: int | None = None
    eta_min: float | None = None


SchedulerSpec: TypeAlias = (
    StepLR
    | MultiStepLR
    | ExponentialLR
    | CosineAnnealingLR
    | LinearLR
    | OneCycleLR
    | CosineAnnealingWarmRestarts
    | Mapping[str, Any]
)
"""A learning-rate scheduler: a builder or the contract's dict."""
