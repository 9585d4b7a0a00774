"""The memory budget's cost model against torch's own accounting of what it allocates.

Each case is a random request (expression, linear and sequential models, their layers,
losses, optimizers, float32 and float64, batch sizes), run once under ``torch.profiler``
with ``profile_memory``: the running sum of its allocation events, in order, is the peak of
what torch's allocator held. Tensors that arrive as b64 are views of the request's own bytes
(``torch.frombuffer``), outside that allocator, so their bytes are added; a session's
parameters and optimizer state, allocated before the call, likewise. The estimate must never
be under that peak, and within 2x of it from 1 MiB up (below, fixed overheads dominate).
Answers are held to their estimated text the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from service.engine import budget, footprint, models, optimizers, specs, state, step
from service.engine.limits import Limits
from service.engine.tensors import encode
from service.errors import TooLarge

LIMITS = Limits(request_bytes=2**62)
CASES = 200
FLOOR = 1024**2
"""Below this, the 2x check is not asked for (the upper bound still is)."""
LOSSES = ["squared", "mse", "l1", "huber", "smooth_l1", "bce_with_logits", "cross_entropy"]
ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "softmax"]
EXPRESSIONS = [
    # (expression, parameter shapes, x's shape) in sizes n and m
    ("w * x + b", {"w": ["n"], "b": [1]}, ["n"]),
    ("sum(sin(w * v)) * x", {"w": ["n", 1], "v": ["m"]}, []),
    ("mean(tanh(w * x) * exp(-(x * x))) + b", {"w": ["n", 1], "b": [1]}, ["m"]),
    ("relu(x @ W + c) @ V", {"W": ["m", 64], "c": [64], "V": [64, 3]}, ["n", "m"]),
    ("sum((x @ W) ** 2) + sum(W * W)", {"W": ["m", "n"]}, [16, "m"]),
    ("softplus(w * x) / (1 + abs(w)) - sqrt(abs(x) + 1)", {"w": ["n"]}, ["n"]),
    ("sigmoid(u @ v) * log(1 + exp(w)) * x", {"u": ["n", 8], "v": [8, "m"], "w": ["m"]}, []),
    ("cos(w * x) / (w * w + 1)", {"w": ["n", 1]}, ["m"]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def peak(fn: Callable[[], object]) -> int:
    """The most bytes torch's allocator held at once while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = most = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        most = max(most, held)
    return most


def _known() -> None:
    """12 MB at the peak, by construction."""
    a = torch.empty(1000, 1000)  # 4 MB
    b = torch.empty(1000, 1000)  # 8 MB held
    del a
    c = torch.empty(2000, 1000)  # 4 + 8 = 12 MB held: the peak
    del b, c
    torch.empty(500, 1000)  # 2 MB, after the peak


# --------------------------------------------------------------------------------------------
# Random requests
# --------------------------------------------------------------------------------------------


def b64(tensor: torch.Tensor) -> dict[str, Any]:
    return dict(encode(tensor, True))


def _optimizer(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(["sgd", "sgd-momentum", "adam", "adamw", "rmsprop", "adagrad"])
    spec: dict[str, Any] = {"type": name.split("-")[0]}
    if name == "sgd-momentum":
        spec |= {"momentum": 0.9, "nesterov": rng.random() < 0.5}
    if name == "adam" and rng.random() < 0.3:
        spec["amsgrad"] = True
    if name == "rmsprop":
        spec |= {"centered": rng.random() < 0.5, "momentum": rng.choice([0.0, 0.9])}
    if rng.random() < 0.3:
        spec["weight_decay"] = 0.01
    if rng.random() < 0.2:
        spec["maximize"] = True
    if rng.random() < 0.3:
        spec["clip_grad_norm"] = 1.0
    return spec


def _model(rng: random.Random, dtype: str) -> tuple[dict[str, Any], list[int]]:
    """A model spec and its x's shape, sized so that most requests hold 1-30 MB."""
    kind = rng.choice(["expression", "expression", "linear", "sequential", "sequential"])
    if kind == "linear":
        n_in, n_out = rng.choice([1, 16, 128, 512]), rng.choice([1, 8, 256, 1024])
        rows = rng.choice([1, 64, 1024, 4096]) if n_in * n_out <= 2**16 else rng.choice([1, 64])
        model = {"type": "linear", "in_features": n_in, "out_features": n_out}
        return {**model, "bias": rng.random() < 0.8, "dtype": dtype}, [rows, n_in]
    if kind == "sequential":
        width = first = rng.choice([1, 16, 128, 256])
        rows = rng.choice([8, 256, 1024, 4096])
        layers: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, 8)):
            layer = rng.choice(["linear", "linear", *ACTIVATIONS, "layer_norm", "dropout"])
            if layer == "linear":
                out = rng.choice([1, 32, 256, 1024] if rows * width <= 2**16 else [1, 32, 256])
                layers.append({"type": "linear", "in_features": width, "out_features": out})
                width = out
            elif layer == "layer_norm":
                layers.append({"type": "layer_norm", "normalized_shape": width})
            elif layer == "dropout":
                layers.append({"type": "dropout", "p": 0.3})
            else:
                layers.append({"type": layer})
        if not any(layer["type"] == "linear" for layer in layers):
            layers.insert(0, {"type": "linear", "in_features": width, "out_features": width})
        return {"type": "sequential", "layers": layers, "dtype": dtype}, [rows, first]
    expression, shapes, x = rng.choice(EXPRESSIONS)
    sizes = {"n": rng.choice([100, 1000, 3000]), "m": rng.choice([1, 10, 300, 1000])}
    params: dict[str, Any] = {}
    for name, raw in shapes.items():
        shape = [sizes.get(d, d) if isinstance(d, str) else d for d in raw]
        if rng.random() < 0.2:  # given, as b64: a view of the request's bytes
            params[name] = {"value": b64(torch.full(shape, 0.01, dtype=getattr(torch, dtype)))}
        else:
            init = rng.choice(["normal", "uniform", "zeros"])
            params[name] = {"shape": shape, "init": init}
    model = {"type": "expression", "expression": expression, "params": params, "dtype": dtype}
    return model, [sizes.get(d, d) if isinstance(d, str) else d for d in x]


def _outputs(model: dict[str, Any], x: list[int]) -> list[int]:
    """The model's output shape on x, as the budget works it out (and ``_fit_batch`` fits
    it to the batch)."""
    spec = specs.ForwardRequest.model_validate({"model": model, "batch": {"x": 0.0}}).model
    params = footprint.param_shapes(spec)
    assert params is not None
    out = list(footprint.computed(spec, params, {"x": tuple(x)}, LIMITS, train=False).outputs)
    extra = len(out) - len(x)
    if model["type"] == "expression" and extra > 0 and all(d == 1 for d in out[:extra]):
        out = out[extra:]
    return out


def case(rng: random.Random) -> tuple[specs.Kind, dict[str, Any]] | None:
    dtype = rng.choice(["float32", "float64"])
    model, x = _model(rng, dtype)
    kind: specs.Kind = rng.choice(["forward", "gradients", "step", "step"])
    out = _outputs(model, x)
    if math.prod(out) > LIMITS.tensor_elements:  # refused as a tensor, not by the budget
        return None
    params = (
        footprint.param_shapes(
            specs.ForwardRequest.model_validate({"model": model, "batch": {"x": 0.0}}).model
        )
        or {}
    )
    numbers = math.prod(out) + sum(math.prod(s) for s in params.values())
    body: dict[str, Any] = {
        "model": model,
        "batch": {"x": b64(torch.full(x, 0.5, dtype=getattr(torch, dtype)))},
        # lists are slow to make: only for answers that are not large
        "encoding": rng.choice(["b64", "list"]) if numbers < 100_000 else "b64",
    }
    if kind == "forward":
        return kind, body
    loss = rng.choice(LOSSES)
    if loss == "cross_entropy":
        if not out:
            return None
        classes = [out[0], *out[2:]] if len(out) >= 2 else []
        body["batch"]["y"] = b64(torch.zeros(classes, dtype=torch.int64))
    else:
        body["batch"]["y"] = b64(torch.full(out, 0.25, dtype=getattr(torch, dtype)))
    body["loss"] = {"type": loss, "reduction": rng.choice(["mean", "sum"])}
    if kind == "step":
        body["optimizer"] = _optimizer(rng)
    return kind, body


def outside(value: Any) -> int:
    """Bytes of the b64 tensors in ``value``: torch.frombuffer views, not the allocator's."""
    if isinstance(value, dict):
        if "b64" in value:
            return math.prod(value["shape"]) * budget.itemsize(value.get("dtype", "float32"))
        return sum(outside(v) for v in value.values())
    return sum(outside(v) for v in value) if isinstance(value, list) else 0


def x_shape(body: dict[str, Any]) -> list[int]:
    return list(body["batch"]["x"]["shape"])


REQUESTS = {"forward": specs.ForwardRequest, "gradients": specs.GradientsRequest}


def stateless(kind: specs.Kind, body: dict[str, Any]) -> tuple[int, int, budget.Estimate]:
    """The measured peak, the answer's bytes, and the estimate, of a stateless request."""
    request = REQUESTS.get(kind, specs.StepRequest).model_validate(body)
    estimate = budget.stateless(kind, request, LIMITS)
    assert estimate is not None
    answer: list[bytes] = []
    measured = peak(lambda: answer.append(orjson.dumps(step.run(kind, request, LIMITS))))
    return measured + outside(body["batch"]) + outside(body["model"]), len(answer[0]), estimate


def in_session(kind: specs.Kind, body: dict[str, Any]) -> tuple[int, int, budget.Estimate]:
    """The same on a session that has stepped once: its parameters and optimizer state
    exist before the call (their bytes are added), and a step's state is serialized."""
    spec = specs.SessionSpec.model_validate(
        {
            "model": body["model"],
            "loss": body.get("loss", "mse"),
            "optimizer": body.get("optimizer", {"type": "adam"}),
        }
    )
    model = models.build(spec.model, LIMITS)
    optimizer = optimizers.build(spec.optimizer, model.trainable().values())
    batch = specs.Batch.model_validate(body["batch"])
    inputs = model.decode_inputs(batch.x, LIMITS)
    y = batch.y if batch.y is not None else torch.zeros(_outputs(body["model"], x_shape(body)))
    step.compute("step", model, inputs, y, loss=spec.loss, optimizer=optimizer)
    held = sum(p.nbytes for p in model.named_parameters().values())
    held += sum(
        v.nbytes for s in optimizer.state.values() for v in s.values() if v.dim() and v.numel()
    )
    b64 = body["encoding"] == "b64"
    estimate = budget.session(kind, spec, batch, LIMITS, b64=b64)
    assert estimate is not None
    answer: list[bytes] = []

    def run() -> None:
        decoded = model.decode_inputs(batch.x, LIMITS)
        result = step.compute(
            kind, model, decoded, batch.y, loss=spec.loss, optimizer=optimizer, limits=LIMITS
        )
        if kind == "step":
            state.dump(model, optimizer, {})
        answer.append(orjson.dumps(step.encode_result(result, b64)))

    measured = peak(run) + held + outside(body["batch"])
    return measured, len(answer[0]), estimate


def test_the_estimate_bounds_the_measured_peak_within_2x() -> None:
    assert peak(_known) == 12_000_000  # the measure is the allocator's own
    rng = random.Random(11)
    checked, floor, ratios = 0, 0, []
    while checked < CASES:
        drawn = case(rng)
        if drawn is None:
            continue
        kind, body = drawn
        session = rng.random() < 0.25
        measured, answer, estimate = (in_session if session else stateless)(kind, body)
        what = f"{'session ' if session else ''}{kind} {body['model']} {body.get('loss')}"
        assert estimate.tensors >= measured, f"under the peak {measured}: {what}"
        assert estimate.answer >= answer, f"under the answer's {answer} bytes: {what}"
        if measured >= FLOOR:
            floor += 1
            ratios.append(estimate.tensors / measured)
            assert estimate.tensors <= 2 * measured, f"over 2x {measured}: {what}"
        checked += 1
    assert floor >= CASES // 3, f"only {floor} cases of 1 MiB or more"
    assert max(ratios) > 1.3, "a model this loose everywhere would not be worth 2x"


# --------------------------------------------------------------------------------------------
# The refusal
# --------------------------------------------------------------------------------------------


def test_a_request_over_the_budget_is_refused_before_it_allocates() -> None:
    """The estimate is made from the spec: an Adam step of 5M float64 parameters over a
    256 MiB budget is refused with the estimate and the limit, before a megabyte of it is
    allocated."""
    tight = Limits(request_bytes=256 * 1024**2)
    request = specs.StepRequest.model_validate(
        {
            "model": {
                "type": "linear",
                "in_features": 5000,
                "out_features": 1000,
                "dtype": "float64",
            },
            "loss": "mse",
            "optimizer": {"type": "adam"},
            "batch": {"x": b64(torch.zeros(1, 5000, dtype=torch.float64)), "y": [[0.0] * 1000]},
            "encoding": "b64",
        }
    )
    detail: list[str] = []

    def refused() -> None:
        with pytest.raises(TooLarge) as caught:
            step.run("step", request, tight)
        detail.append(caught.value.detail)

    assert peak(refused) < 1024**2
    estimate = budget.stateless("step", request, tight)
    assert estimate is not None and estimate.total > tight.request_bytes
    assert f"would need about {budget.human(estimate.total)} of memory" in detail[0], detail
    assert "optimizer state 76.3 MiB" in detail[0], detail  # Adam's two moments
    assert "the limit is 256.0 MiB (--max-request-bytes)" in detail[0], detail
