"""The quantities beyond the gradient against brute-force autograd: a loop over samples for
the per-sample ones, double backward for the Hessian (``hvp``, ``hessian``,
``diag_hessian``), the output Jacobian and the loss's Hessian in the outputs, element by
element, for the GGN. Random expression, linear and sequential models, every loss.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from service.engine import budget, losses, models, quantities, specs, step
from service.engine.limits import Limits
from service.errors import SpecError
from tests.engine.test_budget import peak

LIMITS = Limits(request_bytes=2**62)

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ["squared", "mse", "l1", "huber", "smooth_l1", "bce_with_logits", "cross_entropy"]
# expression, its parameters' shapes, and its input's shape for N rows (k: features)
EXPRESSIONS = [
    ("w * x + 1", {"w": [1]}, lambda n, k: [n]),
    ("tanh(w * x + b) * v", {"w": [1], "b": [1], "v": [1]}, lambda n, k: [n]),
    ("x @ w + b", {"w": ["k"], "b": [1]}, lambda n, k: [n, "k"]),
    ("exp(-(w * x) ** 2) + sigmoid(b) * x", {"w": [1], "b": [1]}, lambda n, k: [n]),
    ("sum(softplus(w * x))", {"w": ["k"]}, lambda n, k: [n, "k"]),
    ("w * x + mean(x) * b", {"w": [1], "b": [1]}, lambda n, k: [n]),
]
CASES = 18


def _shape(shape: list[Any], k: int) -> list[int]:
    return [k if d == "k" else d for d in shape]


def random_case(seed: int) -> dict[str, Any]:
    """A random gradients request asking for every quantity."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    loss = LOSSES[seed % len(LOSSES)]
    reduction = rng.choice(["mean", "sum"])
    n, k = rng.randint(1, 4), rng.randint(1, 3)
    kind = ["expression", "linear", "sequential"][seed % 3]
    out = 1
    if kind == "expression" and loss != "cross_entropy":
        text, pshapes, xshape = EXPRESSIONS[rng.randrange(len(EXPRESSIONS))]
        params = {
            name: {"value": torch.randn(_shape(s, k), generator=gen).tolist()}
            for name, s in pshapes.items()
        }
        model: dict[str, Any] = {"type": "expression", "expression": text, "params": params}
        x: Any = torch.randn(_shape(xshape(n, k), k), generator=gen).tolist()
    else:
        out = 3 if loss == "cross_entropy" else rng.randint(1, 2)
        if kind == "linear":
            model = {"type": "linear", "in_features": k, "out_features": out}
        else:
            act = rng.choice(["tanh", "sigmoid", "gelu", "softmax"])
            model = {
                "type": "sequential",
                "layers": [
                    {"type": "linear", "in_features": k, "out_features": 3},
                    {"type": act},
                    {"type": "layer_norm", "normalized_shape": 3},
                    {"type": "linear", "in_features": 3, "out_features": out},
                ],
            }
        x = torch.randn(n, k, generator=gen).tolist()
    model |= {"dtype": "float64", "seed": seed}
    body: dict[str, Any] = {
        "model": model,
        "loss": {"type": loss, "reduction": reduction},
        "batch": {"x": x},
        "quantities": [*quantities.NAMES],
    }
    first = {"model": model, "loss": "mse", "batch": {"x": x}}
    built = models.build(specs.GradientsRequest.model_validate(first).model)
    outputs = built.forward(built.decode_inputs(x))
    if loss == "cross_entropy":
        body["batch"]["y"] = torch.randint(0, out, outputs.shape[:-1], generator=gen).tolist()
    elif loss == "bce_with_logits":
        body["batch"]["y"] = torch.rand(outputs.shape, generator=gen, dtype=torch.float64).tolist()
    else:
        body["batch"]["y"] = torch.randn(outputs.shape, generator=gen, dtype=torch.float64).tolist()
    body["vector"] = {
        name: torch.randn(p.shape, generator=gen, dtype=torch.float64).tolist()
        for name, p in built.trainable().items()
    }
    return body


def terms(spec: specs.LossSpec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss's terms, unreduced, written out independently of the service's losses."""
    table = {
        "squared": lambda: (out - y) ** 2 / 2,
        "mse": lambda: (out - y) ** 2,
        "l1": lambda: (out - y).abs(),
        "huber": lambda: F.huber_loss(out, y, reduction="none", delta=spec.delta),
        "smooth_l1": lambda: F.smooth_l1_loss(out, y, reduction="none", beta=spec.beta),
        "bce_with_logits": lambda: F.binary_cross_entropy_with_logits(out, y, reduction="none"),
        "cross_entropy": lambda: F.cross_entropy(out, y, reduction="none"),
    }
    return table[spec.type]()


def _grad(value: torch.Tensor, wrt: list[torch.Tensor], graph: bool = False) -> torch.Tensor:
    if not value.requires_grad:
        return torch.zeros(sum(w.numel() for w in wrt), dtype=torch.float64)
    parts = torch.autograd.grad(
        value, wrt, retain_graph=True, create_graph=graph, allow_unused=True
    )
    return torch.cat(
        [
            (p if p is not None else torch.zeros_like(w)).flatten()
            for p, w in zip(parts, wrt, strict=True)
        ]
    )


def brute_force(request: specs.GradientsRequest) -> dict[str, Any]:
    """Every quantity by loops of autograd over samples, outputs and parameters."""
    model = models.build(request.model)
    spec = losses.normalise(request.loss)
    inputs = model.decode_inputs(request.batch.x)
    model.module.train()
    params = list(model.trainable().values())
    shapes = {n: p.shape for n, p in model.trainable().items()}
    out = model.forward(inputs)
    y = losses.target(spec, request.batch.y, out)
    t = terms(spec, out, y)
    count = t.numel() if spec.reduction == "mean" else 1
    loss = t.sum() / count
    batched = (
        any(v.ndim >= 1 for v in inputs.values())
        if request.model.type == "expression"
        else inputs["x"].ndim >= 2
    )
    rows = [t[i] for i in range(t.shape[0])] if batched and t.ndim >= 1 else [t]
    per_sample = torch.stack([_grad(r.sum() / count, params) for r in rows])
    g = _grad(loss, params, graph=True)
    hessian = torch.stack([_grad(g[i], params) for i in range(g.numel())])
    flat_out = out.flatten()
    jac = torch.stack([_grad(flat_out[a], params) for a in range(flat_out.numel())])
    o = out.detach().requires_grad_()
    go = torch.autograd.grad(terms(spec, o, y).sum() / count, o, create_graph=True)[0].flatten()
    h_out = torch.stack([_grad(go[a], [o]) for a in range(go.numel())])
    ggn = jac.T @ h_out @ jac
    v = torch.cat([torch.tensor(request.vector[n], dtype=torch.float64).flatten() for n in shapes])
    n = per_sample.shape[0]
    flat = {
        "per_sample_grads": per_sample,
        "per_sample_l2": None,
        "sum_grad_squared": (per_sample**2).sum(0),
        "variance": (per_sample**2).sum(0) / n - (per_sample.sum(0) / n) ** 2,
        "diag_hessian": hessian.diagonal(),
        "diag_ggn": ggn.diagonal(),
        "hvp": hessian @ v,
        "jacobian": jac,
    }
    answer: dict[str, Any] = {"hessian": {"*": hessian}, "grads": g.detach()}
    for name, value in flat.items():
        answer[name] = {}
        start = 0
        for pname, shape in shapes.items():
            size = shape.numel()
            if name == "per_sample_l2":
                answer[name][pname] = (per_sample[:, start : start + size] ** 2).sum(1)
            elif name == "per_sample_grads":
                answer[name][pname] = value[:, start : start + size].reshape(n, *shape)
            elif name == "jacobian":
                piece = value[:, start : start + size]
                answer[name][pname] = piece.reshape(*out.shape, *shape)
            else:
                answer[name][pname] = value[start : start + size].reshape(shape)
            start += size
    return answer


@pytest.mark.parametrize("seed", range(CASES))
def test_against_brute_force(seed: int) -> None:
    request = specs.GradientsRequest.model_validate(random_case(seed))
    answer = step.run("gradients", request)
    reference = brute_force(request)
    for name in quantities.NAMES:
        got = answer["quantities"][name]
        assert set(got) == set(reference[name]), name
        for param, expected in reference[name].items():
            value = torch.tensor(got[param], dtype=torch.float64)
            assert value.shape == expected.shape, (name, param, value.shape, expected.shape)
            torch.testing.assert_close(
                value, expected.detach(), rtol=1e-10, atol=1e-10, msg=f"{name} of {param}"
            )


@pytest.mark.parametrize("seed", range(0, CASES, 2))
def test_per_sample_grads_sum_to_grads(seed: int) -> None:
    """Σₙ gₙ = grads: to 1e-12 in float64 (bit for bit where one sample is the batch or the
    sum has one term per element; the order of additions differs otherwise)."""
    request = specs.GradientsRequest.model_validate(random_case(seed))
    answer = step.run("gradients", request)
    for name, g in answer["grads"].items():
        per_sample = answer["quantities"]["per_sample_grads"][name]
        summed = torch.tensor(per_sample, dtype=torch.float64).sum(0)
        expected = torch.tensor(g, dtype=torch.float64)
        torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)


def test_dropout_first_order_uses_the_gradients_mask() -> None:
    """With dropout, per-sample gradients are of the batch's own masks: they sum to grads."""
    body = random_case(2)
    body["model"]["layers"].insert(1, {"type": "dropout", "p": 0.5})
    body["quantities"] = ["per_sample_grads", "variance", "jacobian"]
    body.pop("vector")
    request = specs.GradientsRequest.model_validate(body)
    answer = step.run("gradients", request)
    for name, g in answer["grads"].items():
        per_sample = answer["quantities"]["per_sample_grads"][name]
        summed = torch.tensor(per_sample, dtype=torch.float64).sum(0)
        expected = torch.tensor(g, dtype=torch.float64)
        torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)
    assert any(torch.tensor(g).abs().sum() > 0 for g in answer["grads"].values())
    for name in quantities.SECOND_ORDER:
        request = specs.GradientsRequest.model_validate(
            {
                **body,
                "quantities": [name],
                "vector": random_case(2)["vector"] if name == "hvp" else None,
            }
        )
        with pytest.raises(SpecError, match="dropout"):
            step.run("gradients", request)


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 7, 11])
@pytest.mark.parametrize("rows", [3, 200])
def test_the_budget_is_an_upper_bound(seed: int, rows: int) -> None:
    """The estimate covers what torch's allocator held while every quantity was computed."""
    body = random_case(seed)
    if body["model"]["type"] != "expression":  # a wider batch: what grows with N shows
        gen = torch.Generator().manual_seed(seed)
        k = len(body["batch"]["x"][0])
        body["batch"]["x"] = torch.randn(rows, k, generator=gen).tolist()
        body["batch"].pop("y")
        y = random_case_target(body)
        body["batch"]["y"] = y
    request = specs.GradientsRequest.model_validate(body)
    estimate = budget.stateless("gradients", request, LIMITS)
    assert estimate is not None
    measured = peak(lambda: step.run("gradients", request, LIMITS))
    assert estimate.tensors >= measured, (estimate.parts, measured)


def random_case_target(body: dict[str, Any]) -> Any:
    first = {"model": body["model"], "loss": "mse", "batch": {"x": body["batch"]["x"]}}
    built = models.build(specs.GradientsRequest.model_validate(first).model)
    outputs = built.forward(built.decode_inputs(body["batch"]["x"]))
    if body["loss"]["type"] == "cross_entropy":
        return torch.zeros(outputs.shape[:-1], dtype=torch.int64).tolist()
    return torch.zeros(outputs.shape, dtype=torch.float64).tolist()


def test_nothing_to_differentiate() -> None:
    """Every parameter frozen: every quantity is empty (the Hessian 0 x 0), not an error."""
    body = {
        "model": {
            "type": "expression",
            "expression": "w * x + 1",
            "params": {"w": {"value": [1.0]}},
            "frozen": ["w"],
        },
        "loss": "squared",
        "batch": {"x": [1, 2], "y": [3, 5]},
        "quantities": [*quantities.NAMES],
        "vector": {},
    }
    answer = step.run("gradients", specs.GradientsRequest.model_validate(body))
    assert answer["quantities"]["hessian"] == {"*": []}
    assert all(answer["quantities"][n] == {} for n in quantities.NAMES if n != "hessian")
