"""Per-sample gradients against the plain gradient, on the benchmark's 4096-row MLP.

Both are timed in this process, on the engine's own path (the model built, the batch
decoded, then ``step.compute``), so that the ratio is what the quantity costs to compute;
neither answer is encoded (per-sample gradients of this model are 4096 x 16,897 numbers,
past the answer limit as JSON). Run with ``python -m bench.quantities``; the goal is at
most 3x.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.workloads import MLP_MODEL, ROWS, _mlp_data, b64
from service.engine import models, specs
from service.engine.step import compute


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: torch.func's first call builds its transforms
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def row(repeats: int = 5) -> dict[str, float]:
    """Median seconds of the plain gradient and of the gradient with per_sample_grads, and
    their ratio."""
    x, y = _mlp_data()
    body = {"model": MLP_MODEL, "loss": "mse", "batch": {"x": b64(x), "y": b64(y)}}
    plain = specs.GradientsRequest.model_validate(body)
    wanted = specs.GradientsRequest.model_validate({**body, "quantities": ["per_sample_grads"]})
    model = models.build(plain.model)
    inputs = model.decode_inputs(plain.batch.x)

    def gradients(request: specs.GradientsRequest) -> Callable[[], object]:
        return lambda: compute(
            "gradients", model, inputs, request.batch.y, loss=request.loss, wanted=request
        )

    base = _median_s(gradients(plain), repeats)
    per_sample = _median_s(gradients(wanted), repeats)
    return {"gradient_s": base, "per_sample_s": per_sample, "ratio": per_sample / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    found = row(args.repeats)
    print(
        f"| per_sample_grads, MLP {ROWS} rows | {1000 * found['gradient_s']:.1f} ms | "
        f"{1000 * found['per_sample_s']:.1f} ms | {found['ratio']:.2f}x | "
        f"torch threads {torch.get_num_threads()} |"
    )


if __name__ == "__main__":
    main()
