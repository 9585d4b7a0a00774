"""The typed builders: each serialises to exactly the contract's JSON, the service's own
spec models accept those it implements, and a live server makes and steps a session from
builders alone."""

from __future__ import annotations

import json
from typing import Any

import gradsvc_client as gc
import numpy as np
import pytest
from gradsvc_client import specs
from gradsvc_client.tensors import _Encoder
from pydantic import TypeAdapter

from service.engine import specs as server_specs
from tests.e2e.server import Server

# Every builder, and the JSON it must give. A builder missing here fails the coverage test.
EXPECTED: list[tuple[specs.Spec, dict[str, Any]]] = [
    (gc.Value([1.0]), {"value": [1.0]}),
    (
        gc.Init((3, 2), "normal", mean=0.5, std=0.1),
        {"shape": [3, 2], "init": "normal", "mean": 0.5, "std": 0.1},
    ),
    (
        gc.Expression("w * x + 1", params={"w": gc.Value([1.0])}, dtype="float64"),
        {
            "type": "expression",
            "expression": "w * x + 1",
            "dtype": "float64",
            "params": {"w": {"value": [1.0]}},
        },
    ),
    (
        gc.Linear(3, 1, bias=False, seed=7, frozen=["weight"]),
        {
            "type": "linear",
            "in_features": 3,
            "out_features": 1,
            "bias": False,
            "seed": 7,
            "frozen": ["weight"],
        },
    ),
    (
        gc.Sequential([gc.Linear(3, 16), gc.ReLU(), gc.Linear(16, 1)], dtype="float64"),
        {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 3, "out_features": 16},
                {"type": "relu"},
                {"type": "linear", "in_features": 16, "out_features": 1},
            ],
            "dtype": "float64",
        },
    ),
    (gc.ReLU(), {"type": "relu"}),
    (gc.Tanh(), {"type": "tanh"}),
    (gc.Sigmoid(), {"type": "sigmoid"}),
    (gc.GELU("tanh"), {"type": "gelu", "approximate": "tanh"}),
    (gc.Softmax(dim=1), {"type": "softmax", "dim": 1}),
    (gc.LayerNorm(4, eps=1e-6), {"type": "layer_norm", "normalized_shape": 4, "eps": 1e-6}),
    (gc.Dropout(0.2), {"type": "dropout", "p": 0.2}),
    (
        gc.Conv1d(1, 4, 3, padding="same"),
        {
            "type": "conv1d",
            "in_channels": 1,
            "out_channels": 4,
            "kernel_size": 3,
            "padding": "same",
        },
    ),
    (
        gc.Conv2d(3, 8, (3, 3), stride=2, groups=1),
        {
            "type": "conv2d",
            "in_channels": 3,
            "out_channels": 8,
            "kernel_size": [3, 3],
            "stride": 2,
            "groups": 1,
        },
    ),
    (gc.MaxPool1d(2), {"type": "max_pool1d", "kernel_size": 2}),
    (
        gc.MaxPool2d(2, stride=1, ceil_mode=True),
        {"type": "max_pool2d", "kernel_size": 2, "stride": 1, "ceil_mode": True},
    ),  # fmt: skip
    (gc.AvgPool1d(3, padding=1), {"type": "avg_pool1d", "kernel_size": 3, "padding": 1}),
    (
        gc.AvgPool2d((2, 2), count_include_pad=False),
        {"type": "avg_pool2d", "kernel_size": [2, 2], "count_include_pad": False},
    ),
    (gc.Flatten(), {"type": "flatten"}),
    (
        gc.Embedding(100, 8, padding_idx=0),
        {"type": "embedding", "num_embeddings": 100, "embedding_dim": 8, "padding_idx": 0},
    ),
    (
        gc.BatchNorm1d(4, momentum=0.2),
        {"type": "batch_norm1d", "num_features": 4, "momentum": 0.2},
    ),  # fmt: skip
    (
        gc.BatchNorm1d(4, momentum=gc.NULL),  # torch's None: a cumulative average
        {"type": "batch_norm1d", "num_features": 4, "momentum": None},
    ),  # fmt: skip
    (
        gc.BatchNorm2d(3, affine=False),
        {"type": "batch_norm2d", "num_features": 3, "affine": False},
    ),  # fmt: skip
    (
        gc.LSTM(4, 8, num_layers=2),
        {"type": "lstm", "input_size": 4, "hidden_size": 8, "num_layers": 2},
    ),
    (
        gc.GRU(4, 8, bidirectional=True),
        {"type": "gru", "input_size": 4, "hidden_size": 8, "bidirectional": True},
    ),  # fmt: skip
    (gc.Last(), {"type": "last"}),
    (gc.SquaredLoss(), {"type": "squared"}),
    (gc.MSELoss(reduction="sum"), {"type": "mse", "reduction": "sum"}),
    (gc.L1Loss(), {"type": "l1"}),
    (gc.HuberLoss(delta=2.0), {"type": "huber", "delta": 2.0}),
    (
        gc.SmoothL1Loss(beta=0.5, reduction="sum"),
        {"type": "smooth_l1", "reduction": "sum", "beta": 0.5},
    ),  # fmt: skip
    (gc.BCEWithLogitsLoss(), {"type": "bce_with_logits"}),
    (gc.CrossEntropyLoss(label_smoothing=0.1), {"type": "cross_entropy", "label_smoothing": 0.1}),
    (gc.SGD(0.1), {"type": "sgd", "lr": 0.1}),
    (
        gc.SGD(0.1, momentum=0.9, nesterov=True, clip_grad_norm=1.0),
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "clip_grad_norm": 1.0},
    ),
    (gc.Adam(1e-3, betas=(0.8, 0.99)), {"type": "adam", "lr": 1e-3, "betas": [0.8, 0.99]}),
    (gc.AdamW(weight_decay=0.1), {"type": "adamw", "weight_decay": 0.1}),
    (gc.RMSprop(0.01, centered=True), {"type": "rmsprop", "lr": 0.01, "centered": True}),
    (gc.Adagrad(lr_decay=0.1), {"type": "adagrad", "lr_decay": 0.1}),
    (gc.StepLR(10, gamma=0.5), {"type": "step", "step_size": 10, "gamma": 0.5}),
    (gc.MultiStepLR([5, 10]), {"type": "multistep", "milestones": [5, 10]}),
    (gc.ExponentialLR(0.9), {"type": "exponential", "gamma": 0.9}),
    (gc.CosineAnnealingLR(100, eta_min=1e-4), {"type": "cosine", "T_max": 100, "eta_min": 1e-4}),
    (gc.LinearLR(total_iters=10), {"type": "linear", "total_iters": 10}),
    (
        gc.OneCycleLR(0.1, total_steps=100, anneal_strategy="linear"),
        {"type": "onecycle", "max_lr": 0.1, "total_steps": 100, "anneal_strategy": "linear"},
    ),
    (
        gc.CosineAnnealingWarmRestarts(10, T_mult=2),
        {"type": "cosine_warm_restarts", "T_0": 10, "T_mult": 2},
    ),
]


@pytest.mark.parametrize(("builder", "expected"), EXPECTED, ids=lambda v: type(v).__name__)
def test_each_builder_gives_the_contracts_json(builder: specs.Spec, expected: Any) -> None:
    assert builder.to_json() == expected


def test_every_builder_is_covered() -> None:
    exported = {
        getattr(specs, name)
        for name in specs.__all__
        if isinstance(getattr(specs, name), type) and issubclass(getattr(specs, name), specs.Spec)
    }
    assert exported - {specs.Spec} == {type(b) for b, _ in EXPECTED}
    assert all(name in gc.__all__ for name in specs.__all__)  # every builder at the top too


# What the service implements today, checked by its own spec models.
ACCEPTED = [
    (server_specs.ModelSpec, gc.Expression("w * x", params={"w": gc.Value(np.array([1.0]))})),
    (server_specs.ModelSpec, gc.Linear(3, 2, params={"weight": gc.Init([2, 3], "xavier_uniform")})),
    (
        server_specs.ModelSpec,
        gc.Sequential(
            [
                gc.Linear(3, 4),
                gc.Tanh(),
                gc.GELU(),
                gc.LayerNorm(4),
                gc.Dropout(0.1),
                gc.Sigmoid(),
                gc.Softmax(),
                gc.Linear(4, 1),
            ],  # fmt: skip
            seed=3,
        ),
    ),
    (server_specs.LossSpec, gc.SmoothL1Loss(beta=0.5, reduction="sum")),
    (server_specs.LossSpec, gc.CrossEntropyLoss(label_smoothing=0.1)),
    (server_specs.SGD, gc.SGD(0.1, momentum=0.9, nesterov=True, clip_grad_norm=1.0)),
    (server_specs.Adam, gc.Adam(betas=(0.8, 0.99), amsgrad=True)),
    (server_specs.AdamW, gc.AdamW(0.01, weight_decay=0.1, maximize=False)),
    (server_specs.RMSprop, gc.RMSprop(alpha=0.9, momentum=0.1)),
    (server_specs.Adagrad, gc.Adagrad(initial_accumulator_value=0.1, eps=1e-9)),
]


@pytest.mark.parametrize(("model", "builder"), ACCEPTED, ids=lambda v: type(v).__name__)
def test_the_services_spec_models_accept_the_builders(model: Any, builder: specs.Spec) -> None:
    wire = _Encoder(1024).spec(builder)  # as the client sends it: tensors in wire form
    TypeAdapter(model).validate_json(json.dumps(wire))


@pytest.mark.slow
def test_a_session_from_builders_steps_and_refreshes(server: Server) -> None:
    notebook = gc.Expression("w * x + 1", params={"w": gc.Value([1.0])}, dtype="float64")
    with gc.Client(server.url, tensors="numpy") as gs:
        s = gs.create_session(notebook, gc.SquaredLoss(), gc.SGD(lr=0.1), name="built")
        assert s.model["expression"] == "w * x + 1" and s.step == 0
        two = [gs.session_step(s, x=1, y=3), gs.session_step(s, x=2, y=5)]
        assert [t.loss for t in two] == [0.5, 1.6199999999999997]
        assert two[1].params["w"].tolist() == [1.46]
        fresh = s.refresh()  # a Session is a snapshot; refresh fetches it again
        assert (s.step, fresh.step, fresh.version) == (0, 2, 3)
        assert fresh.params["w"].tolist() == [1.46]

        deep = gc.Sequential(
            [
                gc.Linear(3, 4),
                gc.Tanh(),
                gc.LayerNorm(4),
                gc.Dropout(0.1),
                gc.GELU("tanh"),
                gc.Linear(4, 1),
            ],  # fmt: skip
            dtype="float64",
            seed=1,
            params={"0.bias": gc.Init([4], "ones")},
        )
        optimizer = gc.AdamW(0.01, betas=(0.8, 0.99), clip_grad_norm=1.0)
        made = gs.create_session(deep, gc.HuberLoss(delta=0.5), optimizer)
        assert made.params["0.bias"].tolist() == [1.0, 1.0, 1.0, 1.0]
        assert made.optimizer["type"] == "adamw" and made.optimizer["clip_grad_norm"] == 1.0
        step = gs.session_step(made, np.ones((2, 3)), np.zeros((2, 1)))
        assert step.step == 1 and np.isfinite(step.loss)
