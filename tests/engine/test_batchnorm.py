"""Batch-norm layers against torch.nn's own: gradients, updates and running statistics over
three steps, eval-mode forward, and the buffers in the state file."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from service.engine import models, optimizers, specs, state, step
from service.errors import InvalidInput, SpecError

OPTIMIZER = TypeAdapter(specs.OptimizerSpec)
MODEL = TypeAdapter(specs.ModelSpec)
TOL = {"rtol": 1e-10, "atol": 1e-10}

BN1 = {"type": "batch_norm1d", "num_features": 3}
BN2 = {"type": "batch_norm2d", "num_features": 2}
FLAT = {"type": "flatten"}

CASES = [
    # (layers, x's shape, outputs): 1d on [N, C] and [N, C, L], 2d on [N, C, H, W]
    ([BN1, {"type": "linear", "in_features": 3, "out_features": 2}], (6, 3), 2),
    ([{**BN1, "momentum": None}, FLAT, {"type": "linear", "in_features": 12, "out_features": 2}],
     (5, 3, 4), 2),
    ([{**BN2, "affine": False}, FLAT, {"type": "linear", "in_features": 18, "out_features": 1}],
     (4, 2, 3, 3), 1),
    ([{**BN2, "track_running_stats": False, "eps": 1e-3}, FLAT,
      {"type": "linear", "in_features": 8, "out_features": 2}], (3, 2, 2, 2), 2),
    ([{"type": "linear", "in_features": 4, "out_features": 3}, {**BN1, "momentum": 0.5},
      {"type": "relu"}, {"type": "linear", "in_features": 3, "out_features": 1}], (7, 4), 1),
]  # fmt: skip


def _built(layers: list[dict[str, Any]], seed: int = 3) -> models.Model:
    spec = MODEL.validate_python(
        {"type": "sequential", "dtype": "float64", "seed": seed, "layers": layers}
    )
    return models.build(spec)


def _torch_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.05)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_three_steps_equal_torch_nn(case: int, kind: str) -> None:
    layers, shape, out = CASES[case]
    model = _built(layers)
    reference = copy.deepcopy(model.module)  # the same torch modules, the same values
    hyper = {"type": "sgd", "lr": 0.1, "momentum": 0.9} if kind == "sgd" else {"type": "adam"}
    hyper = hyper if kind == "sgd" else {**hyper, "lr": 0.05}
    ours = optimizers.build(OPTIMIZER.validate_python(hyper), model.trainable().values())
    theirs = _torch_optimizer(kind, reference.parameters())
    generator = torch.Generator().manual_seed(case)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + 1
        y = torch.randn(shape[0], out, dtype=torch.float64, generator=generator)
        result = step.compute("step", model, {"x": x}, y.tolist(), loss="mse", optimizer=ours)
        reference.train()
        theirs.zero_grad()
        loss = nn.functional.mse_loss(reference(x), y)
        loss.backward()
        expected_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        theirs.step()
        assert result.grads is not None and result.params is not None
        assert result.grads.keys() == expected_grads.keys()
        for name, g in expected_grads.items():
            torch.testing.assert_close(result.grads[name], g, **TOL)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(result.params[name], p.detach(), **TOL)
        theirs_buffers = dict(reference.named_buffers())
        assert model.named_buffers().keys() == theirs_buffers.keys()
        for name, b in theirs_buffers.items():
            torch.testing.assert_close(model.named_buffers()[name], b, **TOL)
    tracked = not any(layer.get("track_running_stats") is False for layer in layers)
    if tracked:
        bn = next(n for n in model.named_buffers() if n.endswith("num_batches_tracked"))
        assert int(model.named_buffers()[bn]) == 3
    else:
        assert model.named_buffers() == {}
    # eval mode: the running statistics, as module.eval() uses them
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    outputs = step.compute("forward", model, {"x": x}, None).outputs
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs, reference(x), **TOL)


def test_parameter_and_buffer_names_are_torch_sequential_names() -> None:
    model = _built(CASES[4][0])
    assert list(model.named_parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias",
                                              "3.weight", "3.bias"]  # fmt: skip
    assert list(model.named_buffers()) == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]
    assert list(_built([{**BN1, "affine": False}]).named_parameters()) == []


def test_gradients_and_a_failed_step_leave_the_buffers_as_they_were() -> None:
    model = _built(CASES[0][0])
    x = torch.randn(6, 3, dtype=torch.float64) + 5
    before = {n: b.clone() for n, b in model.named_buffers().items()}
    step.compute("gradients", model, {"x": x}, [[0.0, 0.0]] * 6, loss="mse")
    for name, b in model.named_buffers().items():
        assert torch.equal(b, before[name]), name
    huge = OPTIMIZER.validate_python({"type": "sgd", "lr": 1e308})
    optimizer = optimizers.build(huge, model.trainable().values())
    with pytest.raises(Exception, match="not finite"):
        step.compute("step", model, {"x": x}, [[1e300, 0.0]] * 6, loss="mse", optimizer=optimizer)
    for name, b in model.named_buffers().items():
        assert torch.equal(b, before[name]), name


def test_per_sample_quantities_of_batch_norm_are_refused() -> None:
    from service.engine import quantities

    with pytest.raises(SpecError, match="batch-norm"):
        quantities.check(_built(CASES[0][0]), ("per_sample_grads",), None)


def _stepped() -> tuple[models.Model, torch.optim.Optimizer, bytes]:
    model = _built(CASES[0][0])
    sgd = OPTIMIZER.validate_python({"type": "sgd", "lr": 0.1})
    optimizer = optimizers.build(sgd, model.trainable().values())
    x = torch.randn(6, 3, dtype=torch.float64) * 3
    step.compute("step", model, {"x": x}, [[1.0, 0.0]] * 6, loss="mse", optimizer=optimizer)
    return model, optimizer, state.dump(model, optimizer, {})


def test_the_state_file_keeps_the_buffers() -> None:
    model, _, data = _stepped()
    fresh = _built(CASES[0][0])
    sgd = OPTIMIZER.validate_python({"type": "sgd", "lr": 0.1})
    state.restore(fresh, optimizers.build(sgd, fresh.trainable().values()), data)
    for name, b in model.named_buffers().items():
        assert torch.equal(fresh.named_buffers()[name], b), name
    assert int(fresh.named_buffers()["0.num_batches_tracked"]) == 1


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("0.running_var", torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), "negative"),
        ("0.running_mean", torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), "finite"),
        ("0.running_mean", torch.zeros(4, dtype=torch.float64), "holds torch.float64 \\[4\\]"),
        ("0.running_mean", torch.zeros(3, dtype=torch.float32), "float32"),
        ("0.num_batches_tracked", torch.tensor(-2), "negative"),
        ("0.num_batches_tracked", None, "buffers"),  # missing
        ("0.extra", torch.zeros(1), "buffers"),  # unknown
    ],
)
def test_a_forged_buffer_is_refused(name: str, value: torch.Tensor | None, message: str) -> None:
    _, _, data = _stepped()
    tensors, metadata = state.read(data)
    if value is None:
        del tensors[state.BUFFER + name]
    else:
        tensors[state.BUFFER + name] = value
    forged = state._save(tensors, metadata)
    fresh = _built(CASES[0][0])
    sgd = OPTIMIZER.validate_python({"type": "sgd", "lr": 0.1})
    with pytest.raises(InvalidInput, match=message):
        state.restore(fresh, optimizers.build(sgd, fresh.trainable().values()), forged)


def test_a_state_file_without_buffers_still_loads_for_a_model_without_any() -> None:
    spec = {"type": "linear", "in_features": 2, "out_features": 1, "dtype": "float64"}
    model = models.build(MODEL.validate_python(spec))
    sgd = OPTIMIZER.validate_python({"type": "sgd", "lr": 0.1})
    optimizer = optimizers.build(sgd, model.trainable().values())
    tensors, metadata = state.read(state.dump(model, optimizer, {}))
    assert not any(k.startswith(state.BUFFER) for k in tensors)  # as files were before
    state.restore(model, optimizer, state._save(tensors, metadata))


def test_the_memory_estimate_bounds_the_measured_peak() -> None:
    from service.engine import budget
    from tests.engine.test_layers import _wire, stateless

    layers = [
        {"type": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "batch_norm2d", "num_features": 4},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "in_features": 4 * 16 * 16, "out_features": 2},
    ]
    body = {
        "model": {"type": "sequential", "layers": layers},
        "loss": "mse",
        "optimizer": {"type": "adam"},
        "batch": {"x": _wire((32, 3, 16, 16)), "y": _wire((32, 2))},
    }
    measured, answer, estimate = stateless("step", body)
    assert isinstance(estimate, budget.Estimate)
    assert measured <= estimate.tensors <= 2 * measured  # an upper bound, within 2x
    assert estimate.answer >= answer
