"""Shaped layers (conv, pool, flatten, embedding, LSTM, GRU, last) against torch.nn itself.

Random models drawn from a seeded generator are built by the engine and, independently,
from plain ``torch.nn`` modules with the same initial values; one SGD step must give the
same loss, gradients and parameters in float64. Then ``gradcheck`` through the engine's
forward, the refusals (bad specs, shapes and dtypes as 422s that say how to fix them), and
the memory estimate as an upper bound of the measured peak.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import nn

from service.engine import budget, models, optimizers, specs, step
from service.errors import InvalidInput, ShapeError, SpecError, TensorError
from tests.engine.test_budget import stateless

MODEL = TypeAdapter(specs.ModelSpec)
CASES = 30

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(rng: random.Random) -> tuple[list[dict[str, Any]], list[nn.Module], tuple[int, ...]]:
    two = rng.random() < 0.5
    c_in, c_out = rng.randint(1, 3), rng.randint(1, 4)
    groups = rng.choice([g for g in (1, 2) if c_in % g == 0 and c_out % g == 0])
    k = rng.randint(1, 3)
    padding: Any = rng.choice([0, 1, "same", "valid"])
    stride = 1 if padding == "same" else rng.randint(1, 2)
    dilation = rng.randint(1, 2)
    mode = rng.choice(["zeros", "reflect", "replicate", "circular"]) if padding != 0 else "zeros"
    bias = rng.random() < 0.7
    kind = "conv2d" if two else "conv1d"
    spec: dict[str, Any] = {
        "type": kind,
        "in_channels": c_in,
        "out_channels": c_out,
        "kernel_size": [k, rng.randint(1, 3)] if two and rng.random() < 0.5 else k,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": bias,
        "padding_mode": mode,
    }
    conv = nn.Conv2d if two else nn.Conv1d
    ks = tuple(spec["kernel_size"]) if isinstance(spec["kernel_size"], list) else k
    ref = conv(c_in, c_out, ks, stride, padding, dilation, groups, bias, mode, dtype=torch.float64)
    pool: dict[str, Any]
    if rng.random() < 0.5:
        pool = {"type": f"max_pool{kind[-2:]}", "kernel_size": 2, "ceil_mode": rng.random() < 0.5}
        pool_ref: nn.Module = (nn.MaxPool2d if two else nn.MaxPool1d)(
            2, ceil_mode=pool["ceil_mode"]
        )
    else:
        pool = {"type": f"avg_pool{kind[-2:]}", "kernel_size": 2, "stride": 1, "padding": 1}
        pool_ref = (nn.AvgPool2d if two else nn.AvgPool1d)(2, stride=1, padding=1)
    size = (7, 6) if two else (9,)
    return [spec, pool, {"type": "flatten"}], [ref, pool_ref, nn.Flatten()], (c_in, *size)


def _recurrent(
    rng: random.Random,
) -> tuple[list[dict[str, Any]], list[nn.Module], tuple[int, ...]]:
    kind = rng.choice(["lstm", "gru"])
    n_in, hidden = rng.randint(1, 4), rng.randint(1, 5)
    layers, bidirectional = rng.randint(1, 2), rng.random() < 0.5
    bias = rng.random() < 0.7
    spec = {
        "type": kind,
        "input_size": n_in,
        "hidden_size": hidden,
        "num_layers": layers,
        "bias": bias,
        "bidirectional": bidirectional,
    }
    rnn = nn.LSTM if kind == "lstm" else nn.GRU
    ref = rnn(
        n_in,
        hidden,
        layers,
        bias,
        batch_first=True,
        bidirectional=bidirectional,
        dtype=torch.float64,
    )
    return [spec, {"type": "last"}], [ref, _Last()], (rng.randint(1, 5), n_in)


class _Last(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def _reference(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
        if isinstance(x, tuple):  # nn.LSTM / nn.GRU: (output, state)
            x = x[0]
    return x


def _case(rng: random.Random) -> tuple[dict[str, Any], nn.Sequential, torch.Tensor]:
    layers, refs, sample = (_conv if rng.random() < 0.5 else _recurrent)(rng)
    n = rng.randint(1, 4)
    x = torch.randn((n, *sample), dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        features = _reference(refs, x).shape[-1]
    layers = [*layers, {"type": "linear", "in_features": features, "out_features": 2}]
    refs = [*refs, nn.Linear(features, 2, dtype=torch.float64)]
    spec = {"type": "sequential", "dtype": "float64", "seed": rng.randrange(99), "layers": layers}
    return spec, nn.Sequential(*refs), x


def _step_both(
    spec: dict[str, Any], reference: nn.Sequential, x: torch.Tensor, y: torch.Tensor
) -> tuple[step.Result, nn.Sequential]:
    model = models.build(MODEL.validate_python(spec))
    reference.load_state_dict({n: p.detach() for n, p in model.named_parameters().items()})
    sgd = TypeAdapter(specs.OptimizerSpec).validate_python({"type": "sgd", "lr": 0.1})
    optimizer = optimizers.build(sgd, model.trainable().values())
    result = step.compute("step", model, model.decode_inputs(x), y, loss="mse", optimizer=optimizer)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = F.mse_loss(_reference(list(reference), x), y)
    loss.backward()
    ref_opt.step()
    assert abs(float(result.loss) - float(loss.detach())) < 1e-10
    return result, reference


def test_random_layers_step_as_torch_nn_does() -> None:
    rng = random.Random(15)
    for _ in range(CASES):
        spec, reference, x = _case(rng)
        y = torch.randn(x.shape[0], 2, dtype=torch.float64)
        result, stepped = _step_both(spec, reference, x, y)
        assert result.grads is not None and result.params is not None
        expected = dict(stepped.named_parameters())
        assert set(result.grads) == set(expected), spec
        for name, param in expected.items():
            assert param.grad is not None
            torch.testing.assert_close(result.grads[name], param.grad, atol=1e-10, rtol=0)
            torch.testing.assert_close(result.params[name], param.detach(), atol=1e-10, rtol=0)


def test_an_embedding_takes_int64_indices() -> None:
    spec = {
        "type": "sequential",
        "dtype": "float64",
        "layers": [
            {"type": "embedding", "num_embeddings": 7, "embedding_dim": 3, "padding_idx": 0},
            {"type": "lstm", "input_size": 3, "hidden_size": 4},
            {"type": "last"},
            {"type": "linear", "in_features": 4, "out_features": 2},
        ],
    }
    reference = nn.Sequential(
        nn.Embedding(7, 3, padding_idx=0, dtype=torch.float64),
        nn.LSTM(3, 4, batch_first=True, dtype=torch.float64),
        _Last(),
        nn.Linear(4, 2, dtype=torch.float64),
    )
    x = torch.tensor([[1, 0, 6, 2], [3, 3, 0, 5]])
    y = torch.randn(2, 2, dtype=torch.float64)
    result, stepped = _step_both(spec, reference, x, y)
    assert result.grads is not None
    assert list(result.grads)[:2] == ["0.weight", "1.weight_ih_l0"]
    for name, param in stepped.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(result.grads[name], param.grad, atol=1e-10, rtol=0)
    assert float(result.grads["0.weight"][0].abs().sum()) == 0  # padding_idx is not trained


def test_gradcheck_through_a_conv_and_a_recurrent_model() -> None:
    for layers, shape in (
        (
            [
                {"type": "conv1d", "in_channels": 2, "out_channels": 2, "kernel_size": 2},
                {"type": "max_pool1d", "kernel_size": 2},
                {"type": "flatten"},
            ],
            (2, 2, 5),
        ),
        ([{"type": "gru", "input_size": 2, "hidden_size": 2}, {"type": "last"}], (2, 3, 2)),
        ([{"type": "lstm", "input_size": 2, "hidden_size": 2}, {"type": "last"}], (2, 3, 2)),
    ):
        spec = {"type": "sequential", "dtype": "float64", "layers": layers}
        model = models.build(MODEL.validate_python(spec))
        names = list(model.named_parameters())
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def run(x: torch.Tensor, *params: torch.Tensor, model: Any = model, names: Any = names):
            values = dict(zip(names, params, strict=True))
            return torch.func.functional_call(model.module, values, (x,))

        inputs = (x, *(p.detach().requires_grad_() for p in model.named_parameters().values()))
        assert torch.autograd.gradcheck(run, inputs)


def _refused(spec: dict[str, Any], x: Any = None) -> InvalidInput:
    with pytest.raises((InvalidInput, ValidationError)) as caught:
        model = models.build(MODEL.validate_python(spec))
        if x is not None:
            model.forward(model.decode_inputs(x))
    if isinstance(caught.value, ValidationError):
        raise AssertionError(f"a pydantic error, not an engine one: {caught.value}")
    return caught.value


CONV = {"type": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3}


@pytest.mark.parametrize(
    ("layers", "x", "error", "words"),
    [
        ([CONV], [[[[1.0]]]], ShapeError, "layer 0 (conv2d) takes [N, 3, H, W]"),
        (
            [CONV, {"type": "flatten"}, {"type": "linear", "in_features": 5, "out_features": 1}],
            torch.zeros(1, 3, 4, 4).tolist(),
            ShapeError,
            "layer 2 (linear) takes [..., 5]",
        ),
        (
            [{"type": "lstm", "input_size": 3, "hidden_size": 2}],
            [[[1.0, 2.0]]],
            ShapeError,
            "[N, T, 3]",
        ),
        (
            [{"type": "embedding", "num_embeddings": 4, "embedding_dim": 2}],
            [[0, 4]],
            ShapeError,
            "in [0, 4)",
        ),
        (
            [{"type": "embedding", "num_embeddings": 4, "embedding_dim": 2}],
            [[0.5]],
            TensorError,
            "int64 indices",
        ),
        ([{**CONV, "groups": 2}], None, SpecError, "in_channels must be divisible by groups"),
        ([{**CONV, "padding": "same", "stride": 2}], None, SpecError, "padding='same'"),
        ([{**CONV, "kernel_size": [3]}], None, SpecError, "an int or 2 of them"),
        ([{"type": "batch_norm2d", "num_features": 10**9}], None, SpecError, "wider than"),
        ([{"type": "max_pool1d", "kernel_size": 2, "padding": 2}], None, SpecError, "at most half"),
        (
            [{"type": "relu"}, {"type": "embedding", "num_embeddings": 4, "embedding_dim": 2}],
            None,
            SpecError,
            "only the first layer",
        ),
        (
            [
                {"type": "lstm", "input_size": 3, "hidden_size": 2},
                {"type": "linear", "in_features": 3, "out_features": 1},
            ],
            None,
            SpecError,
            "takes 3 features but receives 2",
        ),
        ([{**CONV, "out_channels": 10**6}], None, SpecError, "wider than the limit"),
        (
            [{"type": "embedding", "num_embeddings": 10**7, "embedding_dim": 4}],
            None,
            SpecError,
            "more than",
        ),
    ],
)
def test_bad_layers_and_batches_are_clear_422s(
    layers: list[dict[str, Any]], x: Any, error: type[InvalidInput], words: str
) -> None:
    refused = _refused({"type": "sequential", "layers": layers}, x)
    assert isinstance(refused, error), refused
    assert refused.status == 422 and words in refused.detail, refused.detail


def test_batch_first_is_always_true() -> None:
    layer = {"type": "lstm", "input_size": 1, "hidden_size": 1, "batch_first": False}
    with pytest.raises(ValidationError, match="batch_first is always true here"):
        MODEL.validate_python({"type": "sequential", "layers": [layer]})


def _wire(shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "dtype": "float32",
        "shape": list(shape),
        "data": [0.5] * int(torch.Size(shape).numel()),
    }


@pytest.mark.parametrize(
    ("layers", "x", "y"),
    [
        (
            [
                {**CONV, "padding": 1},
                {"type": "relu"},
                {"type": "max_pool2d", "kernel_size": 2},
                {"type": "flatten"},
                {"type": "linear", "in_features": 4 * 8 * 8, "out_features": 2},
            ],
            (32, 3, 16, 16),
            (32, 2),
        ),
        (
            [
                {"type": "lstm", "input_size": 4, "hidden_size": 32, "num_layers": 2},
                {"type": "last"},
                {"type": "linear", "in_features": 32, "out_features": 2},
            ],
            (16, 40, 4),
            (16, 2),
        ),
    ],
    ids=["conv", "lstm"],
)
def test_the_estimate_bounds_the_measured_peak(
    layers: list[dict[str, Any]], x: tuple[int, ...], y: tuple[int, ...]
) -> None:
    body = {
        "model": {"type": "sequential", "layers": layers},
        "loss": "mse",
        "optimizer": {"type": "adam"},
        "batch": {"x": _wire(x), "y": _wire(y)},
    }
    measured, answer, estimate = stateless("step", body)
    assert isinstance(estimate, budget.Estimate)
    assert measured <= estimate.tensors <= 2 * measured  # an upper bound, within 2x
    assert estimate.answer >= answer


def test_per_sample_gradients_of_shaped_models_equal_one_sample_at_a_time() -> None:
    gru = {"type": "gru", "input_size": 2, "hidden_size": 3}
    for layers, x in (
        (
            [{**CONV, "in_channels": 1, "kernel_size": 2}, {"type": "flatten"}],
            torch.randn(3, 1, 3, 3),
        ),
        (
            [{"type": "embedding", "num_embeddings": 5, "embedding_dim": 2}, gru, {"type": "last"}],
            torch.randint(0, 5, (3, 4)),
        ),
    ):
        spec = {"type": "sequential", "dtype": "float64", "layers": layers}
        model = models.build(MODEL.validate_python(spec))
        y = torch.randn(model.forward(model.decode_inputs(x)).shape, dtype=torch.float64)
        wanted = specs.Quantities(quantities=["per_sample_grads"])
        result = step.compute(
            "gradients", model, model.decode_inputs(x), y, loss="mse", wanted=wanted
        )
        assert result.quantities is not None
        for n in range(3):
            model.module.zero_grad()
            out = model.module(model.decode_inputs(x[n : n + 1])["x"])
            (F.mse_loss(out, y[n : n + 1], reduction="sum") / y.numel()).backward()
            for name, param in model.named_parameters().items():
                got = result.quantities["per_sample_grads"][name][n]
                torch.testing.assert_close(got, param.grad, atol=1e-10, rtol=0)


def test_the_clients_layer_builders_are_accepted_as_they_send_them() -> None:
    from gradsvc_client import specs as client

    sent = [
        client.Conv1d(
            2,
            4,
            3,
            stride=1,
            padding="same",
            dilation=1,
            groups=2,
            bias=False,
            padding_mode="circular",
        ),
        client.Conv2d(4, 2, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 1), groups=1),
        client.MaxPool1d(2, stride=1, padding=1, dilation=1, ceil_mode=True),
        client.MaxPool2d((2, 2), stride=(2, 1), padding=0, dilation=1, ceil_mode=False),
        client.AvgPool1d(2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        client.AvgPool2d(2, stride=None, padding=(1, 0), ceil_mode=False, count_include_pad=True),
        client.Flatten(start_dim=1, end_dim=-1),
        client.Embedding(10, 4, padding_idx=0),
        client.LSTM(4, 8, num_layers=2, bias=True, dropout=0.1, bidirectional=True),
        client.GRU(16, 3, num_layers=1, bias=False, dropout=0.0, bidirectional=False),
        client.Last(),
        client.BatchNorm1d(3, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True),
        client.BatchNorm2d(3, momentum=client.NULL),  # torch's None: a cumulative average
    ]
    for builder in sent:
        layer = builder.to_json()
        parsed = MODEL.validate_python({"type": "sequential", "layers": [layer]})
        assert parsed.layers[0].model_dump(exclude_unset=True) == layer
        if layer["type"] != "embedding":
            models.build(parsed)  # torch takes every argument as the client sends it


def test_shaped_models_run_alone_not_in_vmapped_groups() -> None:
    from service.engine import batching

    for layers in ([CONV], [{"type": "lstm", "input_size": 3, "hidden_size": 2}]):
        spec = specs.SessionSpec.model_validate(
            {
                "model": {"type": "sequential", "layers": layers},
                "loss": "mse",
                "optimizer": {"type": "sgd"},
            }
        )
        model = models.build(spec.model)
        inputs = model.decode_inputs(
            torch.zeros(2, 3, 4, 4).tolist() if layers == [CONV] else torch.zeros(2, 3, 3).tolist()
        )
        entry = batching.Entry(model, None, inputs, None)
        assert batching.signature("forward", spec, entry, explain=False) is None


def test_the_estimate_of_an_embedding_model_counts_its_layers() -> None:
    layers = [
        {"type": "embedding", "num_embeddings": 50, "embedding_dim": 16},
        {"type": "gru", "input_size": 16, "hidden_size": 32},
        {"type": "last"},
    ]
    rows = [[i % 50 for i in range(30)]] * 16
    body = {
        "model": {"type": "sequential", "dtype": "float64", "layers": layers},
        "loss": "mse",
        "batch": {
            "x": {"dtype": "int64", "shape": [16, 30], "data": sum(rows, [])},
            "y": _wire((16, 32)),
        },
    }
    measured, _, estimate = stateless("gradients", body)
    assert estimate.tensors >= measured
