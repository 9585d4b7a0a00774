"""A group's state dump (``state.dump_many``) against each session's own ``state.dump``.

Sessions of one spec go through real vmapped steps (``batching.run_group``) and their
schedulers, as a worker's round runs them; then the group's files must be, byte for byte,
the files each session's ``dump`` writes alone: MLPs and an expression model, SGD with and
without momentum, Adam, AdamW, with and without a scheduler, float32 and float64, before
the first step and after some. Sessions a group cannot share a layout with (another dtype,
an accumulator, no optimizer state yet, buffers) are written alone, in order.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.engine import batching, models, optimizers, schedulers, specs, state
from service.engine.limits import DEFAULT_LIMITS

LIMITS = DEFAULT_LIMITS
GROUP = 8

pytestmark = pytest.mark.usefixtures("one_thread")

MLP = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 4, "out_features": 6},
        {"type": "tanh"},
        {"type": "linear", "in_features": 6, "out_features": 1},
    ],
}
EXPRESSION = {
    "type": "expression",
    "expression": "tanh(w * x) + b",
    "params": {"w": {"shape": [4], "init": "normal", "std": 0.5}, "b": {"value": 0.1}},
}
OPTIMIZERS = [
    {"type": "sgd", "lr": 0.1},
    {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    {"type": "adam", "lr": 0.01},
    {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
]
SCHEDULERS = [None, {"type": "step", "step_size": 1, "gamma": 0.5}]


class Session:
    def __init__(self, spec: specs.SessionSpec) -> None:
        self.spec = spec
        self.model = models.build(spec.model, LIMITS)
        self.optimizer = optimizers.build(spec.optimizer, self.model.trainable().values())
        self.scheduler = schedulers.build(spec.scheduler, self.optimizer)
        self.accumulator: state.Accumulator | None = None

    def dumped(self) -> state.Dumped:
        return (self.model, self.optimizer, self.scheduler, self.accumulator)


def group(
    model: dict[str, Any], optimizer: dict[str, Any], scheduler: Any, dtype: str
) -> list[Session]:
    return [
        Session(
            specs.SessionSpec.model_validate(
                {
                    "model": {**model, "dtype": dtype, "seed": i},
                    "loss": "mse",
                    "optimizer": optimizer,
                    "scheduler": scheduler,
                }
            )
        )
        for i in range(GROUP)
    ]


def steps(sessions: list[Session], count: int, expression: bool) -> None:
    """``count`` vmapped steps of all of them, each followed by its scheduler's."""
    for k in range(count):
        entries = []
        for i, s in enumerate(sessions):
            g = torch.Generator().manual_seed(100 * k + i)
            x = torch.randn(3, 4, generator=g, dtype=torch.float64)
            shape = [3, 4] if expression else [3, 1]
            y = torch.randn(*shape, generator=g, dtype=torch.float64).tolist()
            inputs = s.model.decode_inputs(x.tolist(), LIMITS)
            entries.append(batching.Entry(s.model, s.optimizer, inputs, y))
        keys = {
            batching.signature("step", s.spec, e, False)
            for s, e in zip(sessions, entries, strict=True)
        }
        assert len(keys) == 1 and None not in keys  # one vmapped group
        results = batching.run_group("step", sessions[0].spec, entries, LIMITS)
        assert all(not isinstance(r, Exception) for r in results), results
        for s in sessions:
            schedulers.step(s.scheduler, s.optimizer)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=["none", "step"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("model", [MLP, EXPRESSION], ids=["mlp", "expression"])
def test_group_dump_is_each_sessions_dump(
    model: dict[str, Any], optimizer: dict[str, Any], scheduler: Any, dtype: str
) -> None:
    sessions = group(model, optimizer, scheduler, dtype)
    for count in (0, 2):  # no optimizer state yet, then some (Adam's step count among it)
        steps(sessions, count, model is EXPRESSION)
        alone = [state.dump(m, o, {}, s, a) for m, o, s, a in (x.dumped() for x in sessions)]
        assert len(set(alone)) == GROUP  # the sessions differ, so the slices must be right
        assert state.dump_many([s.dumped() for s in sessions]) == alone


def test_sessions_of_other_layouts_are_written_alone_in_order() -> None:
    sessions = group(MLP, OPTIMIZERS[2], SCHEDULERS[1], "float32")
    steps(sessions, 1, False)
    other = group(MLP, OPTIMIZERS[2], None, "float64")[:2]
    steps(other, 1, False)
    fresh = group(MLP, OPTIMIZERS[2], None, "float32")[0]  # no optimizer state: fewer tensors
    summed = group(MLP, OPTIMIZERS[2], None, "float32")[0]
    grads = {n: torch.ones_like(p) for n, p in summed.model.trainable().items()}
    summed.accumulator = state.Accumulator(grads, count=2, loss_sum=1.5, losses=2)
    normed = {
        **MLP,
        "layers": [
            *MLP["layers"][:1],
            {"type": "batch_norm1d", "num_features": 6},
            *MLP["layers"][1:],
        ],
    }
    buffered = group(normed, OPTIMIZERS[2], None, "float32")[:2]  # buffers: written alone
    mixed = [sessions[0], other[0], *sessions[1:4], fresh, summed, other[1], sessions[4]]
    mixed += buffered
    alone = [state.dump(m, o, {}, s, a) for m, o, s, a in (x.dumped() for x in mixed)]
    assert state.dump_many([s.dumped() for s in mixed]) == alone
    assert state.dump_many([]) == []
