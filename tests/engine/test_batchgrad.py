"""Per-sample gradients of linear layers from one backward (``engine.batchgrad``) against
``vmap`` over ``grad``, the path every other row-wise model takes; and the finiteness its
answer is spared reading, still refused where the factors do not prove it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.engine import batchgrad, losses, models, quantities, specs
from service.errors import NonFinite

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL: dict[str, Any] = {
    "type": "sequential",
    "dtype": "float64",
    "seed": 3,
    "layers": [
        {"type": "linear", "in_features": 3, "out_features": 4},
        {"type": "tanh"},
        {"type": "linear", "in_features": 4, "out_features": 5, "bias": False},
        {"type": "softmax", "dim": -1},
        {"type": "linear", "in_features": 5, "out_features": 2},
    ],
    "frozen": ["4.bias"],
}


def _problem(model_spec: dict[str, Any], x: Any, y: Any, loss: str) -> quantities.Problem:
    spec = specs.GradientsRequest.model_validate(
        {"model": model_spec, "loss": loss, "batch": {"x": x, "y": y}}
    )
    model = models.build(spec.model)
    inputs = model.decode_inputs(spec.batch.x)
    outputs = model.forward(inputs)
    loss_spec = losses.normalise(spec.loss)
    target = losses.target(loss_spec, spec.batch.y, outputs)
    return quantities.Problem(model, loss_spec, inputs, target, outputs)


@pytest.mark.parametrize("loss", ["mse", {"type": "cross_entropy", "reduction": "sum"}])
def test_the_same_as_vmap(loss: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trainable parameter's gₙ equals vmap's to float64 rounding; the frozen bias has
    none; the answer's memory (huge pages, the threshold lowered to reach it) holds them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64).tolist()
    y = [0, 1, 1, 0, 1, 0, 0] if isinstance(loss, dict) else torch.randn(7, 2).tolist()
    problem = _problem(MODEL, x, y, loss)
    monkeypatch.setattr(batchgrad, "HUGE_PAGES_FROM", 0)
    fast = batchgrad.linear(problem.model, problem.loss, problem._features(), problem.target)
    assert fast is not None
    found, finite = fast
    assert list(found) == ["0.weight", "0.bias", "2.weight", "4.weight"]
    assert finite == set(found)
    monkeypatch.setattr(batchgrad, "linear", lambda *_: None)
    expected = quantities.per_sample_grads(problem)
    assert list(expected) == list(found)
    for name, value in found.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14)


def test_a_product_past_the_largest_float_is_refused() -> None:
    """δ = 4e20 and x = 1e20 are finite, their product in float32 is not: the bound does not
    prove it finite, so the answer is read, and refused."""
    model = {"type": "linear", "in_features": 1, "out_features": 1}
    model["params"] = {"weight": {"value": [[1.0]]}, "bias": {"value": [0.0]}}
    problem = _problem(model, [[1e20]], [[-1e20]], "mse")
    fast = batchgrad.linear(problem.model, problem.loss, problem._features(), problem.target)
    assert fast is not None
    assert fast[1] == {"bias"}
    with pytest.raises(NonFinite, match="per_sample_grads of weight"):
        quantities.compute(problem, ("per_sample_grads",), None)
