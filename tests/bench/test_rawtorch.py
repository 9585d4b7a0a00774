"""The benchmark's raw torch limit for many sessions computes what the engine computes.

``bench.rawtorch.StackedAdam`` is what the ``/v1/sessions/step`` row is measured against; if
it computed something else (fewer sessions, a shared batch, one Adam's worth of state), the
row would silently measure a different thing. In float64 it must leave every session's
weights where separate ``torch.optim.Adam`` instances and the engine leave them.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import rawtorch
from service.engine import models, optimizers, specs
from service.engine.step import compute

SESSIONS, ROWS, FEATURES, HIDDEN, STEPS = 16, 8, 4, 6, 3
SPEC: dict[str, Any] = {
    "model": {
        "type": "sequential",
        "dtype": "float64",
        "layers": [
            {"type": "linear", "in_features": FEATURES, "out_features": HIDDEN},
            {"type": "tanh"},
            {"type": "linear", "in_features": HIDDEN, "out_features": 1},
        ],
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.05},
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(STEPS, SESSIONS, ROWS, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randn(STEPS, SESSIONS, ROWS, 1, generator=generator, dtype=torch.float64)
    return x, y


def test_stacked_adam_is_one_adam_per_session_and_the_engines_step() -> None:
    spec = specs.SessionSpec.model_validate(SPEC)
    engine = [models.build(spec.model.model_copy(update={"seed": i})) for i in range(SESSIONS)]
    start = [{n: p.detach().clone() for n, p in m.trainable().items()} for m in engine]
    x, y = _data()

    stacked = rawtorch.StackedAdam(rawtorch.stack(start), lr=0.05)
    separate = []
    for params in start:
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        separate.append((leaves, torch.optim.Adam(leaves.values(), lr=0.05)))
    adams = [optimizers.build(spec.optimizer, m.trainable().values()) for m in engine]

    for t in range(STEPS):
        stacked.step(x[t], y[t])
        for s, (leaves, adam) in enumerate(separate):
            adam.zero_grad()
            rawtorch._loss(leaves, x[t, s], y[t, s]).backward()
            adam.step()
        for s, model in enumerate(engine):
            compute("step", model, {"x": x[t, s]}, y[t, s].tolist(), loss="mse", optimizer=adams[s])

    for s in range(SESSIONS):
        for name in rawtorch.NAMES:
            got = stacked.params[name][s].detach()
            torch.testing.assert_close(got, separate[s][0][name].detach(), rtol=1e-12, atol=1e-12)
            want = engine[s].trainable()[name].detach()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The weights moved: a step that did nothing would also agree with itself.
    assert not torch.equal(stacked.params["0.weight"].detach(), rawtorch.stack(start)["0.weight"])
