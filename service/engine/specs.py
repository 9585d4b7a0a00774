"""The specs a client sends: models, losses, optimizers, batches. Plain pydantic, no HTTP.

Tensors are typed ``Tensor`` (any JSON value, with the three forms in its JSON schema) and
decoded by ``engine.tensors``, so that a large batch is never validated element by element
by pydantic.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

TENSOR_SCHEMA: dict[str, Any] = {
    "title": "Tensor",
    "description": (
        "A JSON number (0-d), nested arrays of numbers (shape inferred; ragged is a 422), "
        '{"dtype", "shape", "data"} with a flat row-major list, or {"dtype", "shape", "b64"} '
        "with base64 of the raw little-endian bytes."
    ),
    "anyOf": [
        {"type": "number"},
        {"type": "array", "items": {}},
        {
            "type": "object",
            "properties": {
                "dtype": {"$ref": "#/components/schemas/DType"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array", "items": {"type": "number"}},
                "b64": {"type": "string", "format": "byte"},
            },
            "required": ["shape"],
            "additionalProperties": False,
        },
    ],
}
Tensor = Annotated[Any, WithJsonSchema(TENSOR_SCHEMA)]

DType = Literal["float32", "float64", "float16", "bfloat16"]
TensorDType = Literal["float32", "float64", "float16", "bfloat16", "int64"]
InitName = Literal["zeros", "ones", "normal", "uniform", "xavier_uniform", "kaiming_uniform"]
Reduction = Literal["mean", "sum"]
LossName = Literal["squared", "mse", "l1", "huber", "smooth_l1", "bce_with_logits", "cross_entropy"]


def _integral(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _clipped(value: Any) -> str:
    """A value the client sent, as JSON and cut short, for a message that shows it back."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tuple(value: Any) -> Any:
    """A JSON array for a tuple field: strict pydantic takes only tuples."""
    return tuple(value) if isinstance(value, list) else value


Integral = BeforeValidator(_integral)
# Bounds a JSON number can carry exactly (RFC 8259 §6); the configured limits are far lower.
Size = Annotated[int, Field(ge=0, lt=2**31), Integral]
PositiveInt = Annotated[int, Field(ge=1, lt=2**31), Integral]
NonNegFloat = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Spec(BaseModel):
    # strict: 0 is not false, false is not 0.0 and "1" is not 1, as the document says.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class ParamSpec(Spec):
    """An initial value (``value``), or a shape and an initialiser (torch.nn.init's)."""

    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["value", "shape"],
                "properties": {
                    "value": {"not": {"type": "null"}},
                    "shape": {"type": "array", "items": {}},
                },
            }
        }
    )

    value: Tensor | None = None
    shape: list[Size] | None = Field(default=None, max_length=8)
    init: InitName = "zeros"
    mean: float = 0.0
    std: NonNegFloat = 1.0
    a: float = Field(default=0.0, description="uniform: lower bound; kaiming_uniform: slope")
    b: float = Field(default=1.0, description="uniform: upper bound")
    gain: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        # A bare value is the commonest first try: say how it is written.
        if isinstance(data, int | float | list) and not isinstance(data, bool):
            # No context: the template is not formatted, so the value shows as it is.
            raise PydanticCustomError(
                "param_form",
                f'a parameter is an object: write {{"value": {_clipped(data)}}} for its initial '
                'value, or {"shape": [...], "init": "zeros"}',
            )
        return data

    @model_validator(mode="after")
    def _value_or_init(self) -> ParamSpec:
        if self.value is not None and self.shape is not None:
            raise ValueError("give either 'value' or 'shape' with 'init', not both")
        return self


class ModelBase(Spec):
    dtype: DType = "float32"
    seed: Annotated[int, Field(ge=0, lt=2**53), Integral] = Field(
        default=0, description="seeds random initialisation"
    )
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    frozen: list[str] = Field(default_factory=list, description="parameters that are not trained")


class ExpressionModel(ModelBase):
    type: Literal["expression"]
    expression: str = Field(description="numbers, names, + - * / ** @, unary -, and functions")


class LinearLayer(Spec):
    type: Literal["linear"]
    in_features: PositiveInt
    out_features: PositiveInt
    bias: bool = True


class LinearModel(LinearLayer, ModelBase):
    pass


class Activation(Spec):
    type: Literal["relu", "tanh", "sigmoid"]


class GeluLayer(Spec):
    type: Literal["gelu"]
    approximate: Literal["none", "tanh"] = "none"


class SoftmaxLayer(Spec):
    type: Literal["softmax"]
    dim: Annotated[int, Field(ge=-(2**31), lt=2**31), Integral] = -1


class LayerNormLayer(Spec):
    type: Literal["layer_norm"]
    normalized_shape: PositiveInt | list[PositiveInt]
    eps: Annotated[float, Field(gt=0)] = 1e-5
    elementwise_affine: bool = True
    bias: bool = True


class DropoutLayer(Spec):
    type: Literal["dropout"]
    p: Beta = 0.5


# Convolutions, pools, embeddings and recurrent layers: torch.nn's arguments and defaults.
# A size is an int or one per spatial dimension (engine.models checks how many).
Sizes = PositiveInt | Annotated[list[PositiveInt], Field(min_length=1, max_length=2)]
Pads = Size | Annotated[list[Size], Field(min_length=1, max_length=2)]


class ConvLayer(Spec):
    type: Literal["conv1d", "conv2d"]
    in_channels: PositiveInt
    out_channels: PositiveInt
    kernel_size: Sizes
    stride: Sizes = 1
    padding: Pads | Literal["valid", "same"] = 0
    dilation: Sizes = 1
    groups: PositiveInt = 1
    bias: bool = True
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros"


class MaxPoolLayer(Spec):
    type: Literal["max_pool1d", "max_pool2d"]
    kernel_size: Sizes
    stride: Sizes | None = Field(default=None, description="kernel_size when absent")
    padding: Pads = 0
    dilation: Sizes = 1
    ceil_mode: bool = False


class AvgPoolLayer(Spec):
    type: Literal["avg_pool1d", "avg_pool2d"]
    kernel_size: Sizes
    stride: Sizes | None = Field(default=None, description="kernel_size when absent")
    padding: Pads = 0
    ceil_mode: bool = False
    count_include_pad: bool = True


Dim = Annotated[int, Field(ge=-8, le=8), Integral]


class FlattenLayer(Spec):
    type: Literal["flatten"]
    start_dim: Dim = 1
    end_dim: Dim = -1


class EmbeddingLayer(Spec):
    type: Literal["embedding"]
    num_embeddings: PositiveInt
    embedding_dim: PositiveInt
    padding_idx: Annotated[int, Field(ge=-(2**31), lt=2**31), Integral] | None = None


class BatchNormLayer(Spec):
    """torch's BatchNorm1d/2d; its running statistics are buffers kept in the session."""

    type: Literal["batch_norm1d", "batch_norm2d"]
    num_features: PositiveInt
    eps: Annotated[float, Field(gt=0)] = 1e-5
    momentum: Annotated[float, Field(ge=0, le=1)] | None = 0.1
    affine: bool = True
    track_running_stats: bool = True


class RecurrentLayer(Spec):
    type: Literal["lstm", "gru"]
    input_size: PositiveInt
    hidden_size: PositiveInt
    # A ceiling past any --max-layers an operator would set: the model's shape is worked
    # out (on the meta device) before the configured limit is checked, and torch makes one
    # module per stacked layer, so two billion of them would hang that work.
    num_layers: Annotated[int, Field(ge=1, le=1024)] = 1
    bias: bool = True
    batch_first: Literal[True] = Field(
        default=True, description="always true: inputs are [N, T, input_size]"
    )
    dropout: Annotated[float, Field(ge=0, le=1)] = 0.0
    bidirectional: bool = False

    @field_validator("batch_first", mode="before")
    @classmethod
    def _batch_first(cls, value: Any) -> Any:
        if value is False:
            raise PydanticCustomError(
                "batch_first",
                "batch_first is always true here: send x as [N, T, input_size] (batch first) "
                "and leave batch_first out",
            )
        return value


class LastLayer(Spec):
    type: Literal["last"]


Layer = Annotated[
    LinearLayer
    | Activation
    | GeluLayer
    | SoftmaxLayer
    | LayerNormLayer
    | DropoutLayer
    | ConvLayer
    | MaxPoolLayer
    | AvgPoolLayer
    | FlattenLayer
    | EmbeddingLayer
    | BatchNormLayer
    | RecurrentLayer
    | LastLayer,
    Field(discriminator="type"),
]


class SequentialModel(ModelBase):
    type: Literal["sequential"]
    layers: list[Layer] = Field(min_length=1)


ModelSpec = Annotated[ExpressionModel | LinearModel | SequentialModel, Field(discriminator="type")]


class LossSpec(Spec):
    type: LossName
    reduction: Reduction = "mean"
    delta: Annotated[float, Field(gt=0)] = Field(default=1.0, description="huber")
    beta: NonNegFloat = Field(default=1.0, description="smooth_l1")
    label_smoothing: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="cross_entropy"
    )


class OptimizerBase(Spec):
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="clip the gradients' total 2-norm to this before the update"
    )
    weight_decay: NonNegFloat = 0.0
    maximize: bool = False


class SGD(OptimizerBase):
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"nesterov": {"const": True}}, "required": ["nesterov"]},
            "then": {
                "properties": {"momentum": {"exclusiveMinimum": 0}, "dampening": {"const": 0}},
                "required": ["momentum"],
            },
        }
    )

    type: Literal["sgd"]
    lr: NonNegFloat = 1e-3
    momentum: NonNegFloat = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov(self) -> SGD:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class Adam(OptimizerBase):
    type: Literal["adam"]
    lr: NonNegFloat = 1e-3
    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_tuple)] = Field(
        (0.9, 0.999),  # "items" too: generators read a list from it, prefixItems they skip
        json_schema_extra={"items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
    )
    eps: NonNegFloat = 1e-8
    amsgrad: bool = False


class AdamW(Adam):
    type: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: NonNegFloat = 1e-2


class RMSprop(OptimizerBase):
    type: Literal["rmsprop"]
    lr: NonNegFloat = 1e-2
    alpha: NonNegFloat = 0.99
    eps: NonNegFloat = 1e-8
    momentum: NonNegFloat = 0.0
    centered: bool = False


class Adagrad(OptimizerBase):
    type: Literal["adagrad"]
    lr: NonNegFloat = 1e-2
    lr_decay: NonNegFloat = 0.0
    initial_accumulator_value: NonNegFloat = 0.0
    eps: NonNegFloat = 1e-10


OptimizerSpec = Annotated[SGD | Adam | AdamW | RMSprop | Adagrad, Field(discriminator="type")]


# Schedulers: torch.optim.lr_scheduler's, with torch's argument names and defaults.
Factor = Annotated[float, Field(ge=0)]


class StepLRSpec(Spec):
    type: Literal["step"]
    step_size: PositiveInt
    gamma: Factor = 0.1


class MultiStepLRSpec(Spec):
    type: Literal["multistep"]
    milestones: list[Size] = Field(min_length=1, max_length=1000)
    gamma: Factor = 0.1


class ExponentialLRSpec(Spec):
    type: Literal["exponential"]
    gamma: Factor


class CosineAnnealingLRSpec(Spec):
    type: Literal["cosine"]
    T_max: PositiveInt
    eta_min: NonNegFloat = 0.0


class LinearLRSpec(Spec):
    type: Literal["linear"]
    start_factor: Annotated[float, Field(gt=0, le=1)] = 1.0 / 3
    end_factor: Annotated[float, Field(ge=0, le=1)] = 1.0
    total_iters: PositiveInt = 5


class OneCycleLRSpec(Spec):
    # Its length is total_steps, or epochs × steps_per_epoch: said in the document as well.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [{"required": ["total_steps"]}, {"required": ["epochs", "steps_per_epoch"]}]
        }
    )

    type: Literal["onecycle"]
    max_lr: Annotated[float, Field(gt=0)]
    total_steps: PositiveInt | None = None
    epochs: PositiveInt | None = None
    steps_per_epoch: PositiveInt | None = None
    pct_start: Annotated[float, Field(ge=0, le=1)] = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: NonNegFloat = 0.85
    max_momentum: NonNegFloat = 0.95
    div_factor: Annotated[float, Field(gt=0)] = 25.0
    final_div_factor: Annotated[float, Field(gt=0)] = 1e4
    three_phase: bool = False

    @model_validator(mode="after")
    def _length(self) -> OneCycleLRSpec:
        if self.total_steps is None and (self.epochs is None or self.steps_per_epoch is None):
            raise ValueError("give total_steps, or epochs and steps_per_epoch")
        return self


class CosineAnnealingWarmRestartsSpec(Spec):
    type: Literal["cosine_warm_restarts"]
    T_0: PositiveInt
    T_mult: PositiveInt = 1
    eta_min: NonNegFloat = 0.0


SchedulerSpec = Annotated[
    StepLRSpec
    | MultiStepLRSpec
    | ExponentialLRSpec
    | CosineAnnealingLRSpec
    | LinearLRSpec
    | OneCycleLRSpec
    | CosineAnnealingWarmRestartsSpec,
    Field(discriminator="type"),
]


class Batch(Spec):
    x: Tensor | dict[str, Tensor] = Field(
        description="the input tensor, or {name: tensor} for an expression with several inputs"
    )
    y: Tensor | None = Field(default=None, description="the target (not used by forward)")


Encoding = Literal["list", "b64"]
Kind = Literal["forward", "gradients", "step"]
ENCODING_DESCRIPTION = (
    'response tensors as nested lists, or all in the {"dtype","shape","b64"} form'
)


class ForwardRequest(Spec):
    model: ModelSpec
    batch: Batch
    encoding: Encoding = Field(default="list", description=ENCODING_DESCRIPTION)


class LossRequest(ForwardRequest):
    """What a gradients and a step request share."""

    loss: LossName | LossSpec
    explain: bool = Field(default=False, description="add the trace: every node, value, dL/dnode")


QuantityName = Literal[
    "per_sample_grads",
    "per_sample_l2",
    "sum_grad_squared",
    "variance",
    "diag_hessian",
    "diag_ggn",
    "hvp",
    "hessian",
    "jacobian",
]


_HVP: dict[str, JsonValue] = {"contains": {"const": "hvp"}}
_VECTOR: dict[str, JsonValue] = {"type": "object"}


class Quantities(Spec):
    """Quantities beyond the gradient (docs/quantities.md), answered beside ``grads``."""

    # hvp needs a vector, and a vector is only for hvp: said in the document as well.
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"quantities": _HVP}, "required": ["quantities"]},
                    "then": {"properties": {"vector": _VECTOR}, "required": ["vector"]},
                },
                {
                    "if": {"properties": {"vector": _VECTOR}, "required": ["vector"]},
                    "then": {"properties": {"quantities": _HVP}, "required": ["quantities"]},
                },
            ]
        }
    )

    quantities: list[QuantityName] = Field(
        default_factory=list,
        max_length=9,
        description=(
            "answered under quantities: {name: {param: tensor}}; hessian under the key "
            '"*" (see docs/quantities.md for each definition)'
        ),
    )
    vector: dict[str, Tensor] | None = Field(
        default=None, description="v of hvp (H·v): a tensor for every trainable parameter"
    )

    @model_validator(mode="after")
    def _vector_for_hvp(self) -> Quantities:
        if "hvp" in self.quantities and self.vector is None:
            raise ValueError('"hvp" needs "vector": {parameter: tensor} (v of H·v)')
        if self.vector is not None and "hvp" not in self.quantities:
            raise ValueError('"vector" is used only by "hvp": add "hvp" to quantities')
        return self

    @property
    def wanted(self) -> tuple[str, ...]:
        """The quantities asked for, each once, in the order asked."""
        return tuple(dict.fromkeys(self.quantities))


class GradientsRequest(LossRequest, Quantities):
    pass


class StepRequest(LossRequest):
    optimizer: OptimizerSpec


Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d{1,2})?)$")]


class SessionSpec(Spec):
    """What a session is: its model, loss and optimizer, and where it runs."""

    model: ModelSpec
    loss: LossName | LossSpec
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None = Field(
        default=None, description="torch.optim.lr_scheduler's, stepped after every step"
    )
    device: Device = Field(default="auto", description="auto, cpu, cuda or cuda:N")


class SessionCreate(SessionSpec):
    name: str | None = Field(default=None, max_length=200)


class SessionBatchRequest(Spec):
    batch: Batch
    encoding: Encoding = Field(default="list", description=ENCODING_DESCRIPTION)


class SessionAccumulateRequest(SessionBatchRequest):
    """``POST /v1/sessions/{id}/accumulate``: a batch whose gradients join the session's
    accumulator."""

    # y or grad_outputs, not both: said in the document as well.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["batch", "grad_outputs"],
                "properties": {
                    "grad_outputs": {"not": {"type": "null"}},
                    "batch": {"required": ["y"], "properties": {"y": {"not": {"type": "null"}}}},
                },
            }
        }
    )

    grad_outputs: Tensor | None = Field(
        default=None,
        description="dL/doutputs computed by the client, instead of batch.y (custom losses)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SessionAccumulateRequest:
        if self.grad_outputs is not None and self.batch.y is not None:
            raise ValueError("send batch.y (the session's loss) or grad_outputs, not both")
        return self


class SessionApplyRequest(Spec):
    """``POST /v1/sessions/{id}/apply``: one optimizer step with the accumulated gradients."""

    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description="the sum of the accumulated gradients is multiplied by it (1/k: their mean)",
    )
    encoding: Encoding = Field(default="list", description=ENCODING_DESCRIPTION)


class SessionGradientsRequest(SessionBatchRequest):
    explain: bool = Field(default=False, description="add the trace: every node, value, dL/dnode")


class SessionQuantitiesRequest(SessionGradientsRequest, Quantities):
    """``POST /v1/sessions/{id}/gradients``: a step's body, and quantities beyond the
    gradient."""


Included = Literal["loss", "params", "grads", "outputs"]
MAX_ITEMS = 4096


_FORM_KEYS = frozenset({"dtype", "shape", "data", "b64"})
_DTYPES = frozenset(TensorDType.__args__)  # type: ignore[attr-defined]


def form_error(value: Any) -> str | None:
    """What is wrong with a tensor's form as the document declares it (number, array, or
    object), without reading its elements; None if nothing. Elements are the worker's job."""
    if isinstance(value, bool) or not isinstance(value, int | float | list | dict):
        return "a tensor is a number, an array or an object"
    if not isinstance(value, dict):
        return None
    if "shape" not in value or not set(value) <= _FORM_KEYS:
        return 'a tensor object has "shape", and "dtype", "data" or "b64", nothing else'
    shape = value["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(n, int | float) and not isinstance(n, bool) and n >= 0 and n == int(n)
        for n in shape
    ):
        return "shape is an array of sizes"
    if "dtype" in value and (not isinstance(value["dtype"], str) or value["dtype"] not in _DTYPES):
        return f"dtype is one of {', '.join(sorted(_DTYPES))}"
    data = value.get("data", [])
    if not isinstance(data, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in data
    ):
        return "data is a flat array of numbers"
    if "b64" in value and not isinstance(value["b64"], str):
        return "b64 is a base64 string"
    return None


class SessionsStepItem(Spec):
    session: str = Field(min_length=1, max_length=64, description="the session's id")
    batch: Batch
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        description="this item's own Idempotency-Key: a retry with it is applied once",
    )

    @model_validator(mode="after")
    def _forms(self) -> SessionsStepItem:
        # Items answer one by one, so the request as a whole must at least be well formed.
        x, y = self.batch.x, self.batch.y
        error = form_error(x)
        if error is not None and isinstance(x, dict):  # then a map of named inputs?
            error = next((e for e in map(form_error, x.values()) if e is not None), None)
        if error is not None:
            raise ValueError(f"batch.x: {error}")
        if y is not None and (error := form_error(y)) is not None:
            raise ValueError(f"batch.y: {error}")
        return self


class SessionsStepRequest(Spec):
    items: list[SessionsStepItem] = Field(min_length=1, max_length=MAX_ITEMS)
    include: list[Included] = Field(
        default=["loss", "params", "grads", "outputs"],
        description=(
            "what each item's answer carries besides session, status and step "
            '("loss" brings grad_norm along)'
        ),
    )
    encoding: Encoding = Field(default="list", description=ENCODING_DESCRIPTION)


class Dataset(Spec):
    x: Tensor | dict[str, Tensor] = Field(description="inputs, one row per example (dim 0)")
    y: Tensor = Field(description="targets, one row per example")


class TrainRequest(Spec):
    dataset: Dataset
    epochs: PositiveInt = Field(description="passes over the dataset")
    batch_size: PositiveInt = Field(description="rows per step; the last batch may be smaller")
    shuffle: bool = Field(default=True, description="a new order of the rows every epoch")
    seed: Size = Field(default=0, description="seeds the shuffling")


class SessionPatch(Spec):
    name: str | None = Field(default=None, max_length=200)
    optimizer: dict[str, Any] | None = Field(
        default=None, description='hyper-parameters to change, e.g. {"lr": 0.01}; not the type'
    )
    params: dict[str, Tensor] | None = Field(default=None, description="new parameter values")
    scheduler: SchedulerSpec | None = Field(
        default=None, description="a new scheduler, from its step 0 (null: none)"
    )
