"""The notebook's first step (``seed/backprop-notebook.txt``) as a request body: ŷ = w·x + 1,
L = ½(ŷ − y)², SGD with lr 0.1, w 1 → 1.1 on x = 1, y = 3. One definition for the Swagger
UI's first example, a worker's warm-up, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any

SEED_MODEL: dict[str, Any] = {
    "type": "expression",
    "expression": "w * x + 1",
    "params": {"w": {"value": [1.0]}},
    "dtype": "float64",
}
SEED_SGD: dict[str, Any] = {"type": "sgd", "lr": 0.1}
SEED_STEP: dict[str, Any] = {
    "model": SEED_MODEL,
    "loss": "squared",
    "optimizer": SEED_SGD,
    "batch": {"x": 1, "y": 3},
}
