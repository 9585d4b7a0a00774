"""Cross-session batching against the unbatched path, session by session.

Each case builds a group of sessions and a deep copy of it: the group goes through
``batching.run_group`` and the copy, entry by entry, through ``step.compute``. Results
(outputs, loss, gradients, their norm, parameters) and afterwards every session's parameters
and optimizer state must agree after each of three consecutive calls: to 1e-12 in float64
and 1e-6 in float32, 1e-4 after float32 steps of Adam, AdamW, RMSprop or Adagrad (see
``AMPLIFIED``). The specs are drawn at random (seeded): model types and widths, activations,
dtypes, losses, optimizers and their hyper-parameters, clipping, frozen parameters, group
sizes and kinds; some sessions go through their saved state between calls, as a worker that
reloads them would. No entry of a group of several may fall back to running alone.
"""

from __future__ import annotations

import base64
import copy
import math
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from service.engine import batching, models, optimizers, specs, state
from service.engine.limits import DEFAULT_LIMITS
from service.engine.specs import Kind
from service.engine.step import Result, compute
from service.errors import GradsvcError, NonFinite, ShapeError, TensorError

LIMITS = DEFAULT_LIMITS
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
NORMALISING = {"adam", "adamw", "rmsprop", "adagrad"}
AMPLIFIED = {torch.float64: 1e-12, torch.float32: 1e-4}
"""Tolerances after steps of the optimizers that divide each gradient element by its own
running scale. An element whose gradient is rounding-close to zero (a few float32 ulps of
the terms it sums, which a batched kernel adds in another order) then moves by a visible part
of lr either way, so in float32 such steps agree to about 1e-5, not 1e-6; float64 checks
the same code at 1e-12 throughout."""
CASES = 200
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Sessions, built twice from one spec, and the two paths.
# --------------------------------------------------------------------------------------------


@dataclass
class Session:
    spec: specs.SessionSpec
    model: models.Model
    optimizer: torch.optim.Optimizer


def build(spec: specs.SessionSpec) -> Session:
    model = models.build(spec.model, LIMITS)
    trainable = model.trainable().values()
    # gradients and forward need no optimizer; a model with every parameter frozen has none
    params = trainable or [torch.nn.Parameter(torch.zeros(1))]
    return Session(spec, model, optimizers.build(spec.optimizer, params))


def reloaded(session: Session) -> Session:
    """The session as a worker rebuilds it from the store: fresh objects, restored state."""
    data = state.dump(session.model, session.optimizer, {})
    fresh = build(session.spec)
    state.restore(fresh.model, fresh.optimizer, data)
    return fresh


def entry(kind: Kind, session: Session, x: Any, y: Any) -> batching.Entry:
    optimizer = session.optimizer if kind == "step" else None
    return batching.Entry(session.model, optimizer, session.model.decode_inputs(x, LIMITS), y)


def unbatched(kind: Kind, session: Session, x: Any, y: Any) -> Result | GradsvcError:
    try:
        return compute(
            kind,
            session.model,
            session.model.decode_inputs(x, LIMITS),
            y,
            loss=session.spec.loss,
            optimizer=session.optimizer if kind == "step" else None,
            clip_grad_norm=session.spec.optimizer.clip_grad_norm,
            seed=session.spec.model.seed,
            limits=LIMITS,
        )
    except GradsvcError as exc:
        return exc


def batched(kind: Kind, sessions: list[Session], batch: list[tuple[Any, Any]]) -> list[Any]:
    entries = [entry(kind, s, x, y) for s, (x, y) in zip(sessions, batch, strict=True)]
    return batching.run_group(kind, sessions[0].spec, entries, LIMITS)


def close(got: torch.Tensor, want: torch.Tensor, what: str, amplified: bool = False) -> None:
    tol = (AMPLIFIED if amplified else TOLERANCE).get(want.dtype, 0.0)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.dtype.is_floating_point and bool(((got - want).abs() <= tol + tol * want.abs()).all()):
        return  # assert_close's own checks cost more than the computations they check
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_same_result(
    got: Any, want: Result | GradsvcError, what: str, amplified: bool = False
) -> None:
    if isinstance(want, GradsvcError):
        assert isinstance(got, type(want)), f"{what}: {got!r} instead of {want!r}"
        assert (got.detail, got.loc) == (want.detail, want.loc), what
        return
    assert isinstance(got, Result), f"{what}: {got!r}"
    close(got.outputs, want.outputs, f"{what} outputs", amplified)
    for name in ("loss", "grad_norm"):
        mine, theirs = getattr(got, name), getattr(want, name)
        assert (mine is None) == (theirs is None), f"{what} {name}"
        if theirs is not None:
            close(mine, theirs, f"{what} {name}", amplified)
    for name in ("grads", "params"):
        mine, theirs = getattr(got, name), getattr(want, name)
        assert (mine is None) == (theirs is None), f"{what} {name}"
        if theirs is not None:
            assert list(mine) == list(theirs), f"{what} {name}"
            for key in theirs:
                close(mine[key], theirs[key], f"{what} {name}[{key}]", amplified)
    assert got.trace is None


def assert_same_session(got: Session, want: Session, what: str, amplified: bool = False) -> None:
    mine, theirs = got.model.named_parameters(), want.model.named_parameters()
    assert list(mine) == list(theirs)
    for name in theirs:
        close(mine[name].detach(), theirs[name].detach(), f"{what} parameter {name}", amplified)
    a, b = got.optimizer.state_dict(), want.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"], what
    assert a["state"].keys() == b["state"].keys(), f"{what} optimizer state"
    for index, slots in b["state"].items():
        assert slots.keys() == a["state"][index].keys(), f"{what} optimizer state {index}"
        for key, value in slots.items():
            other = a["state"][index][key]
            if key == "step" or not isinstance(value, torch.Tensor):
                assert other == value if value is None else bool(other == value), (what, key)
            else:
                close(other, value, f"{what} optimizer state {index}.{key}", amplified)


# --------------------------------------------------------------------------------------------
# Random specs: a group of sessions that differ only in their seeds.
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: Kind
    dtype: torch.dtype
    specs: list[specs.SessionSpec]
    inputs: dict[str, int]
    """Input name -> features (last dimension); several names: x is sent as an object."""
    classes: int
    target: str
    """``real``, ``prob`` or ``class``."""
    form: int
    """0: nested lists; 1: {dtype, shape, data}; 2: {dtype, shape, b64}."""
    reload: bool


def _activation(rng: random.Random, width: int) -> dict[str, Any]:
    choice = rng.choice(["relu", "tanh", "sigmoid", "gelu", "gelu-tanh", "layer_norm", "softmax"])
    if choice == "layer_norm" and width < 3:
        # Over one feature its output is its bias whatever comes in (over two, nearly), so what
        # flows back through it is rounding noise, which two kernels need not agree on.
        choice = "tanh"
    if choice.startswith("gelu"):
        return {"type": "gelu", "approximate": "tanh" if choice == "gelu-tanh" else "none"}
    if choice == "layer_norm":
        return {
            "type": "layer_norm",
            "normalized_shape": rng.choice([width, [width]]),
            "eps": rng.choice([1e-5, 1e-3]),
            "elementwise_affine": rng.random() < 0.8,
            "bias": rng.random() < 0.7,
        }
    if choice == "softmax":
        return {"type": "softmax", "dim": -1}
    return {"type": choice}


def _init(rng: random.Random, shape: list[int]) -> dict[str, Any]:
    kind = rng.choice(["normal", "uniform", "xavier_uniform", "value"])
    if kind == "value":
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        return {"value": (torch.rand(shape, generator=g) * 2 - 1).tolist()}
    if kind == "xavier_uniform" and len(shape) < 2:
        kind = "normal"
    return {"shape": shape, "init": kind, **({"std": 0.5} if kind == "normal" else {})}


EXPRESSIONS: list[tuple[str, dict[str, str], dict[str, str]]] = [
    # expression, parameter shapes and input widths ("C": classes, "F": features, "": none)
    ("w * x + b", {"w": "C", "b": "C"}, {"x": "C"}),
    ("w * x + b", {"w": "", "b": ""}, {"x": "C"}),
    ("x @ w + b", {"w": "FC", "b": "C"}, {"x": "F"}),
    ("tanh(x @ w) * v + b", {"w": "FC", "v": "C", "b": "C"}, {"x": "F"}),
    ("a * w + exp(-z) * v + sigmoid(c) / 2", {"w": "C", "v": "C", "c": "C"}, {"a": "C", "z": "C"}),
    ("softplus(w) * x - relu(b) + sqrt(abs(x) + 1) * c", {"w": "C", "b": "C", "c": ""}, {"x": "C"}),
    ("mean(x @ w) + b * x + log(1 + v * v)", {"w": "CC", "b": "C", "v": "C"}, {"x": "C"}),
    (
        "sum(sin(x) * w) + cos(b) * x ** 2 - x / (1 + v * v)",
        {"w": "C", "b": "C", "v": ""},
        {"x": "C"},
    ),
]


def _model(rng: random.Random, classes: int) -> tuple[dict[str, Any], dict[str, int]]:
    kind = rng.choice(["linear", "sequential", "sequential", "expression"])
    if kind == "linear":
        features = rng.randint(1, 5)
        spec: dict[str, Any] = {"in_features": features, "out_features": classes}
        spec["bias"] = rng.random() < 0.8
        return {"type": "linear", **spec}, {"x": features}
    if kind == "sequential":
        features = rng.randint(1, 5)
        layers, width = [], features
        for i in range(rng.randint(1, 3)):
            if i:
                layers.append(_activation(rng, width))
            out = rng.randint(1, 6)
            layers.append({"type": "linear", "in_features": width, "out_features": out})
            width = out
        if width != classes or rng.random() < 0.5:
            layers += [_activation(rng, width)] if rng.random() < 0.5 else []
            layers.append({"type": "linear", "in_features": width, "out_features": classes})
        return {"type": "sequential", "layers": layers}, {"x": features}
    text, shapes, widths = rng.choice(EXPRESSIONS)
    sizes = {"C": classes, "F": rng.randint(1, 4)}
    params = {name: _init(rng, [sizes[c] for c in shape]) for name, shape in shapes.items()}
    spec = {"type": "expression", "expression": text, "params": params}
    return spec, {name: sizes[w] for name, w in widths.items()}


def _loss(rng: random.Random, classes: int) -> tuple[Any, str]:
    reduction = rng.choice(["mean", "sum"])
    choice = rng.choice(["squared", "mse", "l1", "huber", "smooth_l1", "bce", "ce", "ce"])
    if choice == "ce" and classes >= 2:
        smoothing = rng.choice([0.0, 0.1])
        spec = {"type": "cross_entropy", "reduction": reduction, "label_smoothing": smoothing}
        return spec, rng.choice(["class", "class", "prob"])
    if choice == "bce":
        return {"type": "bce_with_logits", "reduction": reduction}, "prob"
    if choice in ("huber", "smooth_l1"):
        extra = {"delta": rng.uniform(0.2, 2)} if choice == "huber" else {"beta": rng.uniform(0, 1)}
        return {"type": choice, "reduction": reduction, **extra}, "real"
    if choice == "ce":
        choice = "mse"
    return (choice if rng.random() < 0.5 else {"type": choice, "reduction": reduction}), "real"


def _optimizer(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["sgd", "adam", "adamw", "rmsprop", "adagrad"])
    decay = rng.choice([0.0, rng.uniform(0, 0.1)])
    common: dict[str, Any] = {"weight_decay": decay, "maximize": rng.random() < 0.15}
    if rng.random() < 0.35:
        common["clip_grad_norm"] = rng.uniform(0.05, 2)
    eps = 10 ** rng.uniform(-10, -5)
    if kind == "sgd":
        momentum = rng.choice([0.0, rng.uniform(0.1, 0.95)])
        nesterov = momentum > 0 and rng.random() < 0.4
        dampening = 0.0 if nesterov else rng.choice([0.0, rng.uniform(0, 0.5)])
        spec: dict[str, Any] = {"lr": rng.uniform(1e-3, 0.2), "momentum": momentum}
        spec["dampening"] = dampening
        return {"type": "sgd", "nesterov": nesterov, **spec, **common}
    if kind in ("adam", "adamw"):
        betas = [rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.9999)]
        spec = {"lr": rng.uniform(1e-4, 0.05), "betas": betas, "eps": eps}
        return {"type": kind, "amsgrad": rng.random() < 0.4, **spec, **common}
    if kind == "rmsprop":
        momentum = rng.choice([0.0, rng.uniform(0.1, 0.9)])
        spec = {"lr": rng.uniform(1e-4, 0.05), "alpha": rng.uniform(0.8, 0.999), "eps": eps}
        return {
            "type": "rmsprop",
            "momentum": momentum,
            "centered": rng.random() < 0.4,
            **spec,
            **common,
        }
    spec = {
        "lr": rng.uniform(1e-3, 0.2),
        "lr_decay": rng.choice([0.0, rng.uniform(0, 0.1)]),
        "initial_accumulator_value": rng.choice([0.0, rng.uniform(0, 0.5)]),
        "eps": eps,
    }
    return {"type": "adagrad", **spec, **common}


def make_case(index: int) -> Case:
    rng = random.Random(index)
    dtype = rng.choice(["float32", "float64"])
    classes = rng.randint(1, 4)
    model, inputs = _model(rng, classes)
    names = _param_names(model)
    frozen = [n for n in names if rng.random() < 0.2]
    kinds: list[Kind] = ["step", "gradients", "forward"]
    kind = rng.choices(kinds, weights=[7, 2, 1])[0]
    if kind == "step" and len(frozen) == len(names):
        frozen = frozen[1:]
    loss, target = _loss(rng, classes)
    optimizer = _optimizer(rng)
    size = rng.randint(1, 8)
    base = {**model, "dtype": dtype, "frozen": frozen}
    group = [
        specs.SessionSpec.model_validate(
            {"model": {**base, "seed": 100 * index + i}, "loss": loss, "optimizer": optimizer}
        )
        for i in range(size)
    ]
    return Case(
        kind,
        getattr(torch, dtype),
        group,
        inputs,
        classes,
        target,
        form=rng.randint(0, 2),
        reload=rng.random() < 0.3,
    )


def _param_names(model: dict[str, Any]) -> list[str]:
    spec = specs.SessionSpec.model_validate(
        {"model": model, "loss": "mse", "optimizer": {"type": "sgd"}}
    )
    return list(models.build(spec.model, LIMITS).named_parameters())


def _wire(tensor: torch.Tensor, form: int) -> Any:
    name = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}[tensor.dtype]
    if form == 0:
        return tensor.tolist()
    if form == 1:
        return {"dtype": name, "shape": list(tensor.shape), "data": tensor.flatten().tolist()}
    raw = tensor.contiguous().numpy().tobytes()
    return {"dtype": name, "shape": list(tensor.shape), "b64": base64.b64encode(raw).decode()}


def make_batches(case: Case, call: int) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(call)
    rows = 1 + call % 5
    batch = []
    for _ in case.specs:
        x = {n: torch.randn(rows, k, generator=g, dtype=case.dtype) for n, k in case.inputs.items()}
        if case.target == "class":
            y = torch.randint(0, case.classes, (rows,), generator=g)
        elif case.target == "prob":
            y = torch.rand(rows, case.classes, generator=g, dtype=case.dtype)
            if case.classes > 1 and call % 2:  # cross_entropy's probabilities sum to one
                y = y / y.sum(-1, keepdim=True)
        else:
            y = torch.randn(rows, case.classes, generator=g, dtype=case.dtype)
        x_wire = (
            _wire(x["x"], case.form)
            if list(x) == ["x"]
            else {n: _wire(t, case.form) for n, t in x.items()}
        )
        batch.append((x_wire, None if case.kind == "forward" and call % 2 else _wire(y, case.form)))
    return batch


# --------------------------------------------------------------------------------------------
# The random cases.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def alone_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many entries ran alone, through compute(), instead of in the vmapped call."""
    calls: list[int] = []
    real = compute

    def counting(*args: Any, **kwargs: Any) -> Result:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("service.engine.batching.compute", counting)
    return calls


@pytest.mark.parametrize("block", range(4))
def test_random_groups_equal_the_unbatched_path(block: int, alone_calls: list[int]) -> None:
    for index in range(block * CASES // 4, (block + 1) * CASES // 4):
        case = make_case(index)
        mine = [build(s) for s in case.specs]
        theirs = copy.deepcopy(mine)
        for call in range(STEPS):
            if case.reload and call == 1:
                mine = [reloaded(s) for s in mine]
            batch = make_batches(case, 1000 * index + call)
            keys = {
                batching.signature(case.kind, s.spec, entry(case.kind, s, x, y), False)
                for s, (x, y) in zip(mine, batch, strict=True)
            }
            assert len(keys) == 1 and None not in keys, f"case {index}: {keys}"
            before = len(alone_calls)
            got = batched(case.kind, mine, batch)
            if len(mine) > 1:
                assert len(alone_calls) == before, f"case {index}: ran alone"
            amplified = case.kind == "step" and case.specs[0].optimizer.type in NORMALISING
            for i, (session, (x, y)) in enumerate(zip(theirs, batch, strict=True)):
                what = f"case {index} call {call} entry {i}"
                want = unbatched(case.kind, session, x, y)
                assert_same_result(got[i], want, what, amplified)
                assert_same_session(mine[i], session, what, amplified)


# --------------------------------------------------------------------------------------------
# Errors: one entry's failure is that entry's alone.
# --------------------------------------------------------------------------------------------


def _sgd_spec(seed: int, dtype: str = "float32", **optimizer: Any) -> specs.SessionSpec:
    model = {"type": "linear", "in_features": 2, "out_features": 1, "dtype": dtype, "seed": seed}
    return specs.SessionSpec.model_validate(
        {"model": model, "loss": "mse", "optimizer": {"type": "sgd", "lr": 0.1, **optimizer}}
    )


def _run_both(
    kind: Kind,
    group: list[specs.SessionSpec],
    batch: list[tuple[Any, Any]],
) -> tuple[list[Session], list[Session], list[Any], list[Result | GradsvcError]]:
    mine = [build(s) for s in group]
    theirs = copy.deepcopy(mine)
    got = batched(kind, mine, batch)
    want = [unbatched(kind, s, x, y) for s, (x, y) in zip(theirs, batch, strict=True)]
    return mine, theirs, got, want


@pytest.mark.parametrize(
    ("optimizer", "x_bad", "message"),
    [
        # outputs overflow float32: caught before the update
        ({"type": "adam", "lr": 0.01}, [[1e38, 1e38]], "loss is not finite"),
        # a finite gradient, but an update that overflows
        ({"type": "sgd", "lr": 1e30}, [[1e10, 1e10]], "the updated"),
    ],
)
def test_a_non_finite_entry_is_left_as_it_was(
    optimizer: dict[str, Any], x_bad: list[list[float]], message: str
) -> None:
    group = [
        specs.SessionSpec.model_validate(
            {
                "model": {"type": "linear", "in_features": 2, "out_features": 1, "seed": i},
                "loss": "mse",
                "optimizer": optimizer,
            }
        )
        for i in range(4)
    ]
    good = [[0.5, -1.0]]
    batch = [(x_bad if i == 2 else good, [[1.0]]) for i in range(4)]
    mine = [build(s) for s in group]
    snapshot = reloaded(mine[2])
    theirs = [build(s) for s in group]
    got = batched("step", mine, batch)
    for i, (session, (x, y)) in enumerate(zip(theirs, batch, strict=True)):
        want = unbatched("step", session, x, y)
        assert isinstance(want, NonFinite) == (i == 2)
        assert_same_result(got[i], want, f"entry {i}")
        assert_same_session(mine[i], session, f"entry {i}")
    assert isinstance(got[2], NonFinite) and message in got[2].detail
    assert_same_session(mine[2], snapshot, "the failed entry")
    assert not mine[2].optimizer.state_dict()["state"]  # never stepped


def test_an_entry_whose_target_does_not_decode_fails_as_alone() -> None:
    group = [_sgd_spec(i) for i in range(4)]
    batch: list[tuple[Any, Any]] = [([[1.0, 2.0]], [[1.0]]), ([[1.0, 2.0]], [[1.0], [2.0]])]
    batch += [([[0.0, 1.0]], "no"), ([[-1.0, 0.5]], 2.0)]
    mine, theirs, got, want = _run_both("step", group, batch)
    assert isinstance(want[1], ShapeError) and isinstance(want[2], TensorError)
    for i in range(4):
        assert_same_result(got[i], want[i], f"entry {i}")
        assert_same_session(mine[i], theirs[i], f"entry {i}")


def test_b64_targets_decoded_together_fail_one_by_one_as_alone() -> None:
    """b64 targets are decoded as one array; one that is not finite, or not valid base64,
    or of another dtype, sends every entry back to its own decoding, each failing as alone."""
    group = [_sgd_spec(i) for i in range(5)]
    good = [_wire(torch.tensor([[float(i)]]), 2) for i in range(5)]
    nan = _wire(torch.tensor([[math.nan]]), 2)
    broken = {**good[0], "b64": "!!!!!!!!"[: len(good[0]["b64"])]}
    wide = _wire(torch.tensor([[1.0]], dtype=torch.float64), 2)
    for bad in (nan, broken, wide):
        batch = [([[1.0, 2.0]], bad if i == 3 else good[i]) for i in range(5)]
        mine, theirs, got, want = _run_both("step", group, batch)
        assert isinstance(want[3], TensorError) == (bad is not wide)
        for i in range(5):
            assert_same_result(got[i], want[i], f"entry {i}")
            assert_same_session(mine[i], theirs[i], f"entry {i}")


def test_a_batch_that_does_not_fit_the_model_fails_for_everyone_as_alone() -> None:
    group = [_sgd_spec(i) for i in range(3)]
    batch = [([[1.0, 2.0, 3.0]], [[1.0]])] * 3
    mine, theirs, got, want = _run_both("gradients", group, batch)
    assert all(isinstance(w, ShapeError) for w in want)
    for i in range(3):
        assert_same_result(got[i], want[i], f"entry {i}")


def test_targets_of_several_kinds_in_one_group() -> None:
    """Class indices and probabilities for cross_entropy look alike on the wire."""
    group = [
        specs.SessionSpec.model_validate(
            {
                "model": {"type": "linear", "in_features": 2, "out_features": 3, "seed": i},
                "loss": "cross_entropy",
                "optimizer": {"type": "adam", "lr": 0.1},
            }
        )
        for i in range(4)
    ]
    x = [[1.0, 2.0], [0.5, -1.0]]
    targets = [[0, 2], [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], [1, 1], [[0.0, 1.0, 0.0]] * 2]
    mine, theirs, got, want = _run_both("step", group, [(x, y) for y in targets])
    for i in range(4):
        assert_same_result(got[i], want[i], f"entry {i}")
        assert_same_session(mine[i], theirs[i], f"entry {i}")


# --------------------------------------------------------------------------------------------
# Group sizes: one, and many.
# --------------------------------------------------------------------------------------------


def test_a_group_of_256_mlps() -> None:
    layers = [
        {"type": "linear", "in_features": 16, "out_features": 64},
        {"type": "relu"},
        {"type": "linear", "in_features": 64, "out_features": 1},
    ]
    group = [
        specs.SessionSpec.model_validate(
            {
                "model": {"type": "sequential", "layers": layers, "seed": i},
                "loss": "mse",
                "optimizer": {"type": "adam", "lr": 1e-3, "clip_grad_norm": 1.0},
            }
        )
        for i in range(256)
    ]
    mine = [build(s) for s in group]
    theirs = copy.deepcopy(mine)
    g = torch.Generator().manual_seed(0)
    for call in range(2):
        batch = [
            (torch.randn(32, 16, generator=g).tolist(), torch.randn(32, 1, generator=g).tolist())
            for _ in group
        ]
        got = batched("step", mine, batch)
        for i, (session, (x, y)) in enumerate(zip(theirs, batch, strict=True)):
            want = unbatched("step", session, x, y)
            assert_same_result(got[i], want, f"{call}.{i}", amplified=True)
            assert_same_session(mine[i], session, f"{call}.{i}", amplified=True)


def test_a_group_of_one_is_the_unbatched_path(alone_calls: list[int]) -> None:
    mine, theirs, got, want = _run_both("step", [_sgd_spec(0)], [([[1.0, 2.0]], [[3.0]])])
    assert alone_calls == [1]
    assert_same_result(got[0], want[0], "the entry")
    assert_same_session(mine[0], theirs[0], "the entry")


# --------------------------------------------------------------------------------------------
# Signatures.
# --------------------------------------------------------------------------------------------


def _key(
    spec: specs.SessionSpec,
    kind: Kind = "step",
    x: Any = None,
    y: Any = None,
    *,
    session: Session | None = None,
    explain: bool = False,
) -> Any:
    session = session or build(spec)
    x = [[1.0, 2.0]] if x is None else x
    y = [[1.0]] if y is None else y
    return batching.signature(kind, spec, entry(kind, session, x, y), explain)


def test_signatures_separate_what_must_be_equal() -> None:
    base = _sgd_spec(0, momentum=0.9)
    key = _key(base)
    assert key is not None
    assert _key(_sgd_spec(1, momentum=0.9)) == key  # another seed: other values, same shape
    assert _key(base, y={"dtype": "float32", "shape": [1, 1], "data": [1.0]}) != key
    different = [
        _key(_sgd_spec(0, momentum=0.8)),
        _key(_sgd_spec(0, momentum=0.9, lr=0.2)),
        _key(_sgd_spec(0, momentum=0.9, nesterov=True)),
        _key(_sgd_spec(0, momentum=0.9, clip_grad_norm=1.0)),
        _key(_sgd_spec(0, "float64", momentum=0.9)),
        _key(base.model_copy(update={"loss": "l1"})),
        _key(base, x=[[1.0, 2.0], [3.0, 4.0]], y=[[1.0], [2.0]]),
        _key(base, "gradients"),
    ]
    assert key not in different and len(set(different)) == len(different)
    frozen = specs.SessionSpec.model_validate(
        base.model_dump() | {"model": base.model.model_dump() | {"frozen": ["bias"]}}
    )
    assert _key(frozen) != key


def test_signatures_separate_optimizer_step_counts() -> None:
    spec = specs.SessionSpec.model_validate(
        {
            "model": {"type": "linear", "in_features": 2, "out_features": 1},
            "loss": "mse",
            "optimizer": {"type": "adam", "betas": [0.8, 0.99]},
        }
    )
    fresh, stepped, twice = build(spec), build(spec), build(spec)
    unbatched("step", stepped, [[1.0, 2.0]], [[1.0]])
    for _ in range(2):
        unbatched("step", twice, [[1.0, 2.0]], [[1.0]])
    keys = [_key(spec, session=s) for s in (fresh, stepped, twice)]
    assert len(set(keys)) == 3
    assert _key(spec, session=reloaded(stepped)) == keys[1]
    other = specs.SessionSpec.model_validate(
        spec.model_dump() | {"optimizer": {"type": "adam", "betas": [0.9, 0.99]}}
    )
    assert _key(other, session=build(other)) != keys[0]


def test_what_runs_alone() -> None:
    spec = _sgd_spec(0)
    assert _key(spec, "gradients", explain=True) is None
    dropout = specs.SessionSpec.model_validate(
        {
            "model": {
                "type": "sequential",
                "layers": [
                    {"type": "linear", "in_features": 2, "out_features": 1},
                    {"type": "dropout", "p": 0.5},
                ],
            },
            "loss": "mse",
            "optimizer": {"type": "sgd"},
        }
    )
    assert _key(dropout) is None
    assert _key(_sgd_spec(0, "float16")) is None
    assert _key(_sgd_spec(0, "bfloat16")) is None


def test_forward_checks_y_as_compute_does() -> None:
    group = [_sgd_spec(i) for i in range(3)]
    batch = [([[1.0, 2.0]], None), ([[1.0, 2.0]], "bad"), ([[3.0, 2.0]], [[1.0]])]
    _, _, got, want = _run_both("forward", group, batch)
    assert isinstance(want[1], TensorError) and want[1].loc[:2] == ("batch", "y")
    for i in range(3):
        assert_same_result(got[i], want[i], f"entry {i}")
