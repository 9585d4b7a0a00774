"""The engine against an independent torch computation, over every model × loss × optimizer.

For each combination and both float dtypes the engine's model is stepped several times with
one optimizer object (so momentum, Adam's moments, RMSprop's averages and Adagrad's sums
accumulate), and a reference built here from plain ``torch.nn`` modules (or a Python
function for expressions), ``torch.nn.functional`` losses and ``torch.optim`` optimizers,
starting from the same initial values, is stepped alongside it. Loss, outputs, gradients,
the gradient norm and every parameter must agree after every step: to 1e-12 in float64 and
1e-6 in float32. The wire-level ``run`` is checked the same way for a single step.

``torch.autograd.gradcheck`` then checks, in float64, the derivatives of expression and
sequential models (through the engine's own forward) and of the engine's losses on them.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from torch import nn

from service.engine import losses, models, optimizers, specs
from service.engine import step as engine

MODEL_SPEC = TypeAdapter(specs.ModelSpec)
OPTIMIZER_SPEC = TypeAdapter(specs.OptimizerSpec)
LOSS_SPEC = TypeAdapter(specs.LossName | specs.LossSpec)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
CLASSES = 3
"""Every model below maps a batch to outputs of shape [N, CLASSES]."""
BATCH_SIZES = (5, 3, 7)
"""One batch per step, each of another size, drawn afresh."""

Params = dict[str, torch.Tensor]
Inputs = dict[str, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: one intra-op thread is much faster than several fighting
    over two cores (and the engine and the reference then run alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Models: the engine's spec, and an independent torch construction of the same function.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    id: str
    spec: dict[str, Any]
    inputs: dict[str, int]
    """Input name -> features in the last dimension; several names: x is sent as an object."""
    reference: Callable[[torch.dtype], nn.Module | Callable[[Params, Inputs], torch.Tensor]]
    """An ``nn.Module`` taking ``x``, or a function of (parameters, inputs) for expressions."""
    frozen: tuple[str, ...] = ()

    def spec_for(self, dtype: str) -> dict[str, Any]:
        return {**self.spec, "dtype": dtype, "frozen": list(self.frozen)}


def _expr(fn: Callable[[Params, Inputs], torch.Tensor]) -> Callable[[torch.dtype], Any]:
    return lambda dtype: fn


MODELS = [
    ModelCase(
        "expr-affine",
        {
            "type": "expression",
            "expression": "w * x + b",
            "seed": 3,
            "params": {
                "w": {"shape": [CLASSES], "init": "normal", "std": 0.5},
                "b": {"value": [0.1, -0.2, 0.3]},
            },
        },
        {"x": CLASSES},
        _expr(lambda p, i: p["w"] * i["x"] + p["b"]),
    ),
    ModelCase(
        "expr-functions",
        {
            "type": "expression",
            "expression": "tanh(w * x) + softplus(v) * x + b",
            "seed": 4,
            "params": {
                "w": {"shape": [CLASSES], "init": "uniform", "a": -1.0, "b": 1.0},
                "v": {"shape": [CLASSES], "init": "normal"},
                "b": {"value": [0.5, 0.0, -0.5]},
            },
        },
        {"x": CLASSES},
        _expr(lambda p, i: torch.tanh(p["w"] * i["x"]) + F.softplus(p["v"]) * i["x"] + p["b"]),
        frozen=("b",),
    ),
    ModelCase(
        "expr-matmul",
        {
            "type": "expression",
            "expression": "x @ w + b",
            "seed": 5,
            "params": {
                "w": {"shape": [4, CLASSES], "init": "xavier_uniform"},
                "b": {"shape": [CLASSES], "init": "uniform", "a": -0.5, "b": 0.5},
            },
        },
        {"x": 4},
        _expr(lambda p, i: i["x"] @ p["w"] + p["b"]),
    ),
    ModelCase(
        "expr-two-inputs",
        {
            "type": "expression",
            "expression": "a * w + exp(-z) * v + sigmoid(c) / 2",
            "seed": 6,
            "params": {
                "w": {"shape": [CLASSES], "init": "normal", "std": 0.3},
                "v": {"shape": [CLASSES], "init": "uniform", "a": -1.0, "b": 1.0},
                "c": {"shape": [CLASSES], "init": "ones"},
            },
        },
        {"a": CLASSES, "z": CLASSES},
        _expr(
            lambda p, i: i["a"] * p["w"] + torch.exp(-i["z"]) * p["v"] + torch.sigmoid(p["c"]) / 2
        ),
    ),
    ModelCase(
        "linear",
        {"type": "linear", "in_features": 4, "out_features": CLASSES, "seed": 7},
        {"x": 4},
        lambda dtype: nn.Linear(4, CLASSES, dtype=dtype),
    ),
    ModelCase(
        "seq-relu",
        {
            "type": "sequential",
            "seed": 9,
            "layers": [
                {"type": "linear", "in_features": 4, "out_features": 8},
                {"type": "relu"},
                {"type": "linear", "in_features": 8, "out_features": CLASSES},
            ],
        },
        {"x": 4},
        lambda dtype: nn.Sequential(
            nn.Linear(4, 8, dtype=dtype), nn.ReLU(), nn.Linear(8, CLASSES, dtype=dtype)
        ),
    ),
    ModelCase(
        "seq-mixed",
        {
            "type": "sequential",
            "seed": 10,
            "layers": [
                {"type": "linear", "in_features": 4, "out_features": 6},
                {"type": "tanh"},
                {"type": "layer_norm", "normalized_shape": 6},
                {"type": "gelu"},
                {"type": "linear", "in_features": 6, "out_features": 5},
                {"type": "sigmoid"},
                {"type": "linear", "in_features": 5, "out_features": 4},
                {"type": "softmax", "dim": -1},
                {"type": "linear", "in_features": 4, "out_features": CLASSES},
            ],
        },
        {"x": 4},
        lambda dtype: nn.Sequential(
            nn.Linear(4, 6, dtype=dtype),
            nn.Tanh(),
            nn.LayerNorm(6, dtype=dtype),
            nn.GELU(),
            nn.Linear(6, 5, dtype=dtype),
            nn.Sigmoid(),
            nn.Linear(5, 4, dtype=dtype),
            nn.Softmax(dim=-1),
            nn.Linear(4, CLASSES, dtype=dtype),
        ),
        frozen=("2.weight", "4.bias"),
    ),
    ModelCase(
        "seq-gelu-tanh-layernorm",
        {
            "type": "sequential",
            "seed": 11,
            "layers": [
                {"type": "linear", "in_features": 3, "out_features": 5},
                {"type": "gelu", "approximate": "tanh"},
                {"type": "layer_norm", "normalized_shape": [5], "eps": 1e-3, "bias": False},
                {"type": "linear", "in_features": 5, "out_features": CLASSES, "bias": False},
            ],
        },
        {"x": 3},
        lambda dtype: nn.Sequential(
            nn.Linear(3, 5, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.LayerNorm(5, eps=1e-3, bias=False, dtype=dtype),
            nn.Linear(5, CLASSES, bias=False, dtype=dtype),
        ),
    ),
]


# --------------------------------------------------------------------------------------------
# Losses: what the client sends, and the reference written with torch.nn.functional.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCase:
    id: str
    wire: str | dict[str, Any]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: str = "real"
    """``real`` (any number), ``prob`` (in [0, 1]) or ``class`` (int64 indices)."""


LOSSES = [
    LossCase("squared", "squared", lambda out, y: ((out - y) ** 2 / 2).mean()),
    LossCase("mse", "mse", lambda out, y: F.mse_loss(out, y)),
    LossCase(
        "l1-sum",
        {"type": "l1", "reduction": "sum"},
        lambda out, y: F.l1_loss(out, y, reduction="sum"),
    ),
    LossCase(
        "huber",
        {"type": "huber", "delta": 0.5},
        lambda out, y: F.huber_loss(out, y, delta=0.5),
    ),
    LossCase(
        "smooth-l1-sum",
        {"type": "smooth_l1", "beta": 0.3, "reduction": "sum"},
        lambda out, y: F.smooth_l1_loss(out, y, beta=0.3, reduction="sum"),
    ),
    LossCase(
        "bce-with-logits",
        "bce_with_logits",
        lambda out, y: F.binary_cross_entropy_with_logits(out, y),
        target="prob",
    ),
    LossCase("cross-entropy", "cross_entropy", lambda out, y: F.cross_entropy(out, y), "class"),
    LossCase(
        "cross-entropy-smoothed-sum",
        {"type": "cross_entropy", "reduction": "sum", "label_smoothing": 0.1},
        lambda out, y: F.cross_entropy(out, y, reduction="sum", label_smoothing=0.1),
        target="class",
    ),
]


# --------------------------------------------------------------------------------------------
# Optimizers: the spec, and torch.optim's class with the same hyper-parameters written out
# (or left to torch's own defaults where the spec leaves them to the service's).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerCase:
    id: str
    wire: dict[str, Any]
    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    clip: float | None = None


OPTIMIZERS = [
    OptimizerCase("sgd", {"type": "sgd", "lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    OptimizerCase(
        "sgd-momentum-dampening",
        {"type": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.2},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.2},
    ),
    OptimizerCase(
        "sgd-nesterov-weight-decay-clip",
        {
            "type": "sgd",
            "lr": 0.05,
            "momentum": 0.8,
            "nesterov": True,
            "weight_decay": 0.01,
            "clip_grad_norm": 0.1,
        },
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
        clip=0.1,
    ),
    OptimizerCase("adam-defaults", {"type": "adam"}, torch.optim.Adam),
    OptimizerCase(
        "adam-amsgrad-weight-decay",
        {
            "type": "adam",
            "lr": 0.02,
            "betas": [0.8, 0.95],
            "eps": 1e-6,
            "weight_decay": 0.05,
            "amsgrad": True,
        },
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True},
    ),
    OptimizerCase(
        # AdamW's weight_decay left to the defaults (1e-2 in both), unlike Adam's (0).
        "adamw-amsgrad-clip",
        {"type": "adamw", "lr": 0.03, "amsgrad": True, "clip_grad_norm": 0.5},
        torch.optim.AdamW,
        {"lr": 0.03, "amsgrad": True},
        clip=0.5,
    ),
    OptimizerCase("rmsprop-defaults", {"type": "rmsprop"}, torch.optim.RMSprop),
    OptimizerCase(
        "rmsprop-centered-momentum",
        {
            "type": "rmsprop",
            "lr": 0.01,
            "alpha": 0.9,
            "eps": 1e-6,
            "momentum": 0.5,
            "centered": True,
            "weight_decay": 0.01,
        },
        torch.optim.RMSprop,
        {
            "lr": 0.01,
            "alpha": 0.9,
            "eps": 1e-6,
            "momentum": 0.5,
            "centered": True,
            "weight_decay": 0.01,
        },
    ),
    OptimizerCase("adagrad-defaults", {"type": "adagrad"}, torch.optim.Adagrad),
    OptimizerCase(
        "adagrad-decay-maximize",
        {
            "type": "adagrad",
            "lr": 0.1,
            "lr_decay": 0.01,
            "initial_accumulator_value": 0.1,
            "weight_decay": 0.01,
            "maximize": True,
        },
        torch.optim.Adagrad,
        {
            "lr": 0.1,
            "lr_decay": 0.01,
            "initial_accumulator_value": 0.1,
            "weight_decay": 0.01,
            "maximize": True,
        },
    ),
]


# --------------------------------------------------------------------------------------------
# Batches, in the three wire forms.
# --------------------------------------------------------------------------------------------


def _wire(tensor: torch.Tensor, form: int) -> Any:
    """Form 0: nested lists; 1: {dtype, shape, data}; 2: {dtype, shape, b64}."""
    name = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}[tensor.dtype]
    if form == 0:
        return tensor.tolist()
    if form == 1:
        return {"dtype": name, "shape": list(tensor.shape), "data": tensor.flatten().tolist()}
    raw = tensor.contiguous().numpy().tobytes()
    return {"dtype": name, "shape": list(tensor.shape), "b64": base64.b64encode(raw).decode()}


@dataclass
class BatchCase:
    x: Inputs
    y: torch.Tensor
    x_wire: Any
    y_wire: Any


def make_batch(model: ModelCase, loss: LossCase, dtype: torch.dtype, index: int) -> BatchCase:
    g = torch.Generator().manual_seed(1000 + index)
    n = BATCH_SIZES[index]
    x = {name: torch.randn(n, k, generator=g, dtype=dtype) for name, k in model.inputs.items()}
    if loss.target == "class":
        y = torch.randint(0, CLASSES, (n,), generator=g)
    elif loss.target == "prob":
        y = torch.rand(n, CLASSES, generator=g, dtype=dtype)
    else:
        y = torch.randn(n, CLASSES, generator=g, dtype=dtype)
    form = index % 3
    x_wire = (
        _wire(x["x"], form) if list(x) == ["x"] else {name: _wire(t, form) for name, t in x.items()}
    )
    return BatchCase(x, y, x_wire, _wire(y, form))


# --------------------------------------------------------------------------------------------
# The reference: plain torch, starting from the engine model's initial parameter values.
# --------------------------------------------------------------------------------------------


class Reference:
    def __init__(
        self,
        case: ModelCase,
        loss: LossCase,
        opt: OptimizerCase,
        dtype: torch.dtype,
        initial: Params,
    ) -> None:
        built = case.reference(dtype)
        if isinstance(built, nn.Module):
            built.load_state_dict(initial)  # strict: the engine names parameters as torch does
            self.module: nn.Module | None = built
            self.params = dict(built.named_parameters())
            self.fn: Callable[[Params, Inputs], torch.Tensor] | None = None
        else:
            self.module = None
            self.params = {n: v.detach().clone().requires_grad_(True) for n, v in initial.items()}
            self.fn = built
        for name in case.frozen:
            self.params[name].requires_grad_(False)
        self.trainable = {n: p for n, p in self.params.items() if n not in case.frozen}
        self.optimizer = opt.cls(list(self.trainable.values()), **opt.kwargs)
        self.loss = loss.reference
        self.clip = opt.clip

    def forward(self, x: Inputs) -> torch.Tensor:
        if self.module is not None:
            return self.module(x["x"])  # type: ignore[no-any-return]
        assert self.fn is not None
        return self.fn(self.params, x)

    def step(self, batch: BatchCase) -> dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward(batch.x)
        loss = self.loss(out, batch.y)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in self.trainable.items()}  # type: ignore[union-attr]
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))  # type: ignore[arg-type]
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.clip)
        self.optimizer.step()
        return {
            "outputs": out.detach(),
            "loss": loss.detach(),
            "grads": grads,
            "grad_norm": norm.detach(),
            "params": {n: p.detach().clone() for n, p in self.params.items()},
        }


def assert_close(actual: Any, expected: torch.Tensor, what: str) -> None:
    tol = TOLERANCE[expected.dtype]
    if not isinstance(actual, torch.Tensor):
        actual = torch.tensor(actual, dtype=expected.dtype)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, not {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, not {expected.shape}"
    # allclose is one cheap op; assert_close only runs to explain a failure.
    if not torch.allclose(actual, expected, rtol=tol, atol=tol):
        torch.testing.assert_close(
            actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
        )
        raise AssertionError(f"{what}: not close")  # pragma: no cover - assert_close raised


def assert_same_result(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """The engine's ``actual`` (tensors, or the wire's lists and floats) against the reference."""
    assert_close(actual["outputs"], expected["outputs"], f"{where}: outputs")
    assert_close(actual["loss"], expected["loss"], f"{where}: loss")
    assert set(actual["grads"]) == set(expected["grads"]), f"{where}: grads' names"
    for name, g in expected["grads"].items():
        assert_close(actual["grads"][name], g, f"{where}: grad of {name}")
    assert_close(actual["grad_norm"], expected["grad_norm"], f"{where}: grad_norm")
    if "params" in actual:
        assert set(actual["params"]) == set(expected["params"]), f"{where}: params' names"
        for name, p in expected["params"].items():
            assert_close(actual["params"][name], p, f"{where}: {name}")


def _as_dict(result: engine.Result) -> dict[str, Any]:
    return {
        "outputs": result.outputs,
        "loss": result.loss,
        "grads": result.grads,
        "grad_norm": result.grad_norm,
        "params": result.params,
    }


COMBINATIONS = [
    pytest.param(m, lo, o, d, id=f"{m.id}-{lo.id}-{o.id}-{d}")
    for m, lo, o, d in itertools.product(MODELS, LOSSES, OPTIMIZERS, DTYPES)
]


@pytest.mark.parametrize(("case", "loss", "opt", "dtype_name"), COMBINATIONS)
def test_steps_equal_an_independent_torch_computation(
    case: ModelCase, loss: LossCase, opt: OptimizerCase, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    model = models.build(MODEL_SPEC.validate_python(case.spec_for(dtype_name)))
    loss_spec = losses.normalise(LOSS_SPEC.validate_python(loss.wire))
    opt_spec = OPTIMIZER_SPEC.validate_python(opt.wire)
    optimizer = optimizers.build(opt_spec, model.trainable().values())
    initial = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    assert all(p.dtype == dtype for p in initial.values())
    assert set(model.trainable()) == set(initial) - set(case.frozen)
    reference = Reference(case, loss, opt, dtype, initial)

    for index in range(len(BATCH_SIZES)):
        batch = make_batch(case, loss, dtype, index)
        inputs = model.decode_inputs(batch.x_wire)
        result = engine.step(
            model,
            loss_spec,
            optimizer,
            inputs,
            batch.y_wire,
            clip_grad_norm=opt_spec.clip_grad_norm,
        )
        expected = reference.step(batch)
        assert_same_result(_as_dict(result), expected, f"step {index + 1}")
        # The model itself holds what the step reported; frozen parameters never move.
        for name, p in model.named_parameters().items():
            assert torch.equal(p.detach(), result.params[name]), name  # type: ignore[index]
        for name in case.frozen:
            assert torch.equal(result.params[name], initial[name]), name  # type: ignore[index]


_INITIAL: dict[tuple[str, str], Params] = {}


def initial_params(case: ModelCase, dtype_name: str) -> Params:
    """What the spec builds to, once per model and dtype (the reference clones it)."""
    key = (case.id, dtype_name)
    if key not in _INITIAL:
        model = models.build(MODEL_SPEC.validate_python(case.spec_for(dtype_name)))
        _INITIAL[key] = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    return _INITIAL[key]


@pytest.mark.parametrize(("case", "loss", "opt", "dtype_name"), COMBINATIONS)
def test_the_wire_level_step_equals_an_independent_torch_computation(
    case: ModelCase, loss: LossCase, opt: OptimizerCase, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    initial = initial_params(case, dtype_name)
    # Each optimizer's cases take another of the batches, and so another wire form.
    batch = make_batch(case, loss, dtype, OPTIMIZERS.index(opt) % len(BATCH_SIZES))
    request = {
        "model": case.spec_for(dtype_name),
        "loss": loss.wire,
        "optimizer": opt.wire,
        "batch": {"x": batch.x_wire, "y": batch.y_wire},
    }
    body = engine.run("step", specs.StepRequest.model_validate(request))
    expected = Reference(case, loss, opt, dtype, initial).step(batch)
    assert_same_result(body, expected, "step")
    for name in case.frozen:
        assert torch.equal(torch.tensor(body["params"][name], dtype=dtype), initial[name]), name


@pytest.mark.parametrize(
    ("case", "loss", "dtype_name"),
    [
        pytest.param(m, lo, d, id=f"{m.id}-{lo.id}-{d}")
        for m, lo, d in itertools.product(MODELS, LOSSES, DTYPES)
    ],
)
def test_the_wire_level_gradients_equal_an_independent_torch_computation(
    case: ModelCase, loss: LossCase, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    batch = make_batch(case, loss, dtype, LOSSES.index(loss) % len(BATCH_SIZES))
    request = {
        "model": case.spec_for(dtype_name),
        "loss": loss.wire,
        "batch": {"x": batch.x_wire, "y": batch.y_wire},
    }
    body = engine.run("gradients", specs.GradientsRequest.model_validate(request))
    assert "params" not in body
    reference = Reference(case, loss, OPTIMIZERS[0], dtype, initial_params(case, dtype_name))
    expected = reference.step(batch)
    del expected["params"]
    assert_same_result(body, expected, "gradients")


@pytest.mark.parametrize("opt", [o for o in OPTIMIZERS if o.clip is not None], ids=lambda o: o.id)
def test_the_clipping_cases_do_clip(opt: OptimizerCase) -> None:
    """The raw gradient norm is above the bound, so the comparisons above cover clipping."""
    case = next(m for m in MODELS if m.id == "linear")
    loss = next(lo for lo in LOSSES if lo.id == "mse")
    model = models.build(MODEL_SPEC.validate_python(case.spec_for("float64")))
    batch = make_batch(case, loss, torch.float64, 0)
    result = engine.gradients(
        model,
        losses.normalise(LOSS_SPEC.validate_python(loss.wire)),
        model.decode_inputs(batch.x_wire),
        batch.y_wire,
    )
    assert opt.clip is not None and result.grad_norm is not None
    assert float(result.grad_norm) > opt.clip


# --------------------------------------------------------------------------------------------
# gradcheck, float64, through the engine's own forward pass and losses.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcheckCase:
    id: str
    spec: dict[str, Any]
    inputs: dict[str, tuple[int, ...]]
    positive_inputs: bool = False


GRADCHECK_MODELS = [
    GradcheckCase(
        "exp",
        {
            "type": "expression",
            "expression": "exp(w * x) + b",
            "params": {
                "w": {"shape": [3], "init": "normal", "std": 0.5},
                "b": {"shape": [3], "init": "normal"},
            },
        },
        {"x": (4, 3)},
    ),
    GradcheckCase(
        "log-sqrt",
        {
            "type": "expression",
            "expression": "log(softplus(w) + x * x + 1) * b - sqrt(w * w + x * x + 0.5)",
            "params": {
                "w": {"shape": [3], "init": "normal"},
                "b": {"shape": [3], "init": "uniform", "a": -1.0, "b": 1.0},
            },
        },
        {"x": (4, 3)},
    ),
    GradcheckCase(
        "log-of-positive-input",
        {
            "type": "expression",
            "expression": "w * log(x) + sqrt(x) / b",
            "params": {
                "w": {"shape": [3], "init": "normal"},
                "b": {"shape": [3], "init": "uniform", "a": 1.0, "b": 2.0},
            },
        },
        {"x": (4, 3)},
        positive_inputs=True,
    ),
    GradcheckCase(
        "sigmoid-softplus-trig",
        {
            "type": "expression",
            "expression": (
                "sigmoid(w * x + b) * softplus(c) - sin(b) * cos(x) + w ** 2 / (1 + exp(-x))"
            ),
            "params": {
                "w": {"shape": [3], "init": "normal"},
                "b": {"shape": [3], "init": "normal"},
                "c": {"shape": [3], "init": "normal"},
            },
        },
        {"x": (4, 3)},
    ),
    GradcheckCase(
        "sum-mean",
        {
            "type": "expression",
            "expression": "w * x + sum(b * x) / 3 + mean(tanh(c * x))",
            "params": {
                "w": {"shape": [3], "init": "normal"},
                "b": {"shape": [3], "init": "normal"},
                "c": {"shape": [3], "init": "normal"},
            },
        },
        {"x": (4, 3)},
    ),
    GradcheckCase(
        "abs-relu-away-from-zero",
        {
            "type": "expression",
            "expression": "abs(w) * x + relu(b) - abs(c)",
            "params": {
                "w": {"shape": [3], "init": "uniform", "a": 0.5, "b": 1.5},
                "b": {"shape": [3], "init": "uniform", "a": 0.5, "b": 1.5},
                "c": {"shape": [3], "init": "uniform", "a": -1.5, "b": -0.5},
            },
        },
        {"x": (4, 3)},
    ),
    GradcheckCase(
        "matmul-two-layers",
        {
            "type": "expression",
            "expression": "tanh(x @ w + b) @ v",
            "params": {
                "w": {"shape": [4, 5], "init": "xavier_uniform"},
                "b": {"shape": [5], "init": "normal", "std": 0.1},
                "v": {"shape": [5, 3], "init": "kaiming_uniform"},
            },
        },
        {"x": (4, 4)},
    ),
    GradcheckCase(
        "two-inputs",
        {
            "type": "expression",
            "expression": "a * w + exp(-z) * v - z / (1 + w * w)",
            "params": {
                "w": {"shape": [3], "init": "normal"},
                "v": {"shape": [3], "init": "normal"},
            },
        },
        {"a": (4, 3), "z": (4, 3)},
    ),
    GradcheckCase(
        "seq-linear-relu-linear",
        {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 4, "out_features": 6},
                {"type": "relu"},
                {"type": "linear", "in_features": 6, "out_features": 3},
            ],
        },
        {"x": (5, 4)},
    ),
    GradcheckCase(
        "seq-tanh-sigmoid",
        {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 4, "out_features": 5},
                {"type": "tanh"},
                {"type": "linear", "in_features": 5, "out_features": 3},
                {"type": "sigmoid"},
            ],
        },
        {"x": (5, 4)},
    ),
    GradcheckCase(
        "seq-gelu-layernorm-softmax",
        {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 4, "out_features": 6},
                {"type": "gelu"},
                {"type": "layer_norm", "normalized_shape": 6},
                {"type": "linear", "in_features": 6, "out_features": 4},
                {"type": "softmax"},
                {"type": "linear", "in_features": 4, "out_features": 3},
            ],
        },
        {"x": (5, 4)},
    ),
    GradcheckCase(
        "seq-gelu-tanh-plain-layernorm",
        {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 3, "out_features": 5},
                {"type": "gelu", "approximate": "tanh"},
                {"type": "layer_norm", "normalized_shape": [5], "elementwise_affine": False},
                {"type": "linear", "in_features": 5, "out_features": 3, "bias": False},
            ],
        },
        {"x": (5, 3)},
    ),
    GradcheckCase(
        "linear",
        {"type": "linear", "in_features": 4, "out_features": 3},
        {"x": (5, 4)},
    ),
]


class _ThroughModel(nn.Module):
    """Holds the engine's module so that ``functional_call`` can swap its parameters, and
    computes with ``Model.forward`` (batch fitting, feature checks and all)."""

    def __init__(self, model: models.Model) -> None:
        super().__init__()
        self.inner = model.module
        self.model = model

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.model.forward(inputs)


def _gradcheck_setup(
    case: GradcheckCase,
) -> tuple[models.Model, list[str], list[str], tuple[torch.Tensor, ...]]:
    model = models.build(MODEL_SPEC.validate_python({**case.spec, "dtype": "float64", "seed": 1}))
    g = torch.Generator().manual_seed(2)
    inputs = {}
    for name, shape in case.inputs.items():
        value = torch.randn(shape, generator=g, dtype=torch.float64)
        inputs[name] = value.abs() + 0.5 if case.positive_inputs else value
    pnames = list(model.named_parameters())
    values = [p.detach().clone() for p in model.named_parameters().values()]
    values += list(inputs.values())
    return model, pnames, list(inputs), tuple(v.requires_grad_(True) for v in values)


def _function(
    model: models.Model, pnames: list[str], inames: list[str]
) -> Callable[..., torch.Tensor]:
    through = _ThroughModel(model)

    def fn(*values: torch.Tensor) -> torch.Tensor:
        params = {f"inner.{n}": v for n, v in zip(pnames, values, strict=False)}
        inputs = dict(zip(inames, values[len(pnames) :], strict=True))
        return torch.func.functional_call(through, params, (inputs,))  # type: ignore[no-any-return]

    return fn


@pytest.mark.parametrize("case", GRADCHECK_MODELS, ids=lambda c: c.id)
def test_gradcheck_model_outputs(case: GradcheckCase) -> None:
    model, pnames, inames, values = _gradcheck_setup(case)
    fn = _function(model, pnames, inames)
    # The swapped-in parameters really are the ones used: the output matches the model's own.
    with torch.no_grad():
        own = model.forward(dict(zip(inames, values[len(pnames) :], strict=True)))
        assert torch.equal(fn(*values), own)
    assert own.shape == (case.inputs[inames[0]][0], CLASSES)
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: c.id)
@pytest.mark.parametrize("case", GRADCHECK_MODELS, ids=lambda c: c.id)
def test_gradcheck_losses(case: GradcheckCase, loss: LossCase) -> None:
    model, pnames, inames, values = _gradcheck_setup(case)
    n = case.inputs[inames[0]][0]
    g = torch.Generator().manual_seed(3)
    if loss.target == "class":
        y = torch.randint(0, CLASSES, (n,), generator=g)
    elif loss.target == "prob":
        y = torch.rand(n, CLASSES, generator=g, dtype=torch.float64)
    else:
        # Far enough from the outputs that l1, huber and smooth_l1 are nowhere near a kink.
        y = torch.randn(n, CLASSES, generator=g, dtype=torch.float64) + 10.0
    forward = _function(model, pnames, inames)
    loss_fn = losses.loss_fn(losses.normalise(LOSS_SPEC.validate_python(loss.wire)))

    def fn(*vals: torch.Tensor) -> torch.Tensor:
        return loss_fn(forward(*vals), y)

    # The model's own derivatives were checked in full above; here, with the loss on top,
    # gradcheck's fast mode (random directional derivatives, all inputs at once) is enough.
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-7, fast_mode=True)
