"""The requests the benchmark sends, each with its raw torch equivalent and its answer.

A workload is one stateless ``POST /v1/step`` body. Add a row by adding a builder to
``ALL``. The stateful rows (``bench.stateful``) step sessions made from ``SEED_BODY``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.engine import seed
from service.engine.specs import StepRequest
from service.engine.step import run

Body = dict[str, Any]
TorchStep = Callable[[], float]


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    body: Body
    torch_step: TorchStep
    """The same computation in raw torch: tensors already built, nothing encoded."""
    list_only: bool = True
    """Tensors travel as JSON lists only (what the naive peer reads)."""
    path: str = "/v1/step"
    raw: bytes = field(init=False)
    reference_loss: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", json.dumps(self.body, separators=(",", ":")).encode())
        reference = run("step", StepRequest.model_validate(self.body))
        object.__setattr__(self, "reference_loss", float(reference["loss"]))

    def check(self, answer: Any) -> str | None:
        """None if ``answer`` is this step's answer (its loss, to float32 rounding)."""
        loss = answer.get("loss") if isinstance(answer, dict) else None
        if not isinstance(loss, float) or not math.isclose(
            loss, self.reference_loss, rel_tol=1e-4, abs_tol=1e-6
        ):
            return f"loss {loss!r}, expected {self.reference_loss!r}"
        if not {"grads", "params", "outputs"} <= answer.keys():
            return f"answer lacks grads, params or outputs: {sorted(answer)}"
        return None


SEED_BODY: Body = seed.SEED_STEP


def _seed_torch() -> float:
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor(1.0, dtype=torch.float64)
    y = torch.tensor(3.0, dtype=torch.float64)
    loss = 0.5 * ((w * x + 1 - y) ** 2).mean()
    torch.autograd.backward(loss)
    torch.optim.SGD([w], lr=0.1).step()
    return loss.item()


def seed() -> Workload:
    return Workload(
        name="seed",
        summary="API.md's seed step: w * x + 1, float64, squared loss, SGD lr 0.1, x=1, y=3",
        body=SEED_BODY,
        torch_step=_seed_torch,
    )


ROWS, FEATURES, HIDDEN = 4096, 64, 256
MLP_MODEL: Body = {
    "type": "sequential",
    "seed": 0,
    "layers": [
        {"type": "linear", "in_features": FEATURES, "out_features": HIDDEN},
        {"type": "relu"},
        {"type": "linear", "in_features": HIDDEN, "out_features": 1},
    ],
}


def _mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    y = torch.randn(ROWS, 1, generator=generator)
    return x, y


def _mlp_torch(x: torch.Tensor, y: torch.Tensor) -> TorchStep:
    def step() -> float:
        model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        loss = nn.functional.mse_loss(model(x), y)
        torch.autograd.backward(loss)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        return loss.item()

    return step


def b64(tensor: torch.Tensor) -> Body:
    """A float32 tensor in the wire's b64 form."""
    raw = tensor.contiguous().numpy().tobytes()
    return {"dtype": "float32", "shape": list(tensor.shape), "b64": base64.b64encode(raw).decode()}


def mlp(encoding: str) -> Workload:
    x, y = _mlp_data()
    body: Body = {
        "model": MLP_MODEL,
        "loss": "mse",
        "optimizer": {"type": "sgd", "lr": 0.1},
    }
    shape = f"MLP {FEATURES}→{HIDDEN}→1 (ReLU), {ROWS} rows, float32, mse, SGD lr 0.1"
    if encoding == "list":
        body["batch"] = {"x": x.tolist(), "y": y.tolist()}
        summary = f"{shape}; tensors as nested JSON lists both ways"
    else:
        body["batch"] = {"x": b64(x), "y": b64(y)}
        body["encoding"] = "b64"
        summary = f'{shape}; tensors as b64 both ways (`"encoding": "b64"`)'
    return Workload(
        name=f"mlp-{encoding}",
        summary=summary,
        body=body,
        torch_step=_mlp_torch(x, y),
        list_only=encoding == "list",
    )


ALL: tuple[Callable[[], Workload], ...] = (seed, lambda: mlp("list"), lambda: mlp("b64"))


def build_all() -> list[Workload]:
    return [make() for make in ALL]
