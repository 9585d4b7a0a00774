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


def _medians_s(fns: tuple[Callable[[], object], ...], repeats: int) -> list[tuple[float, float]]:
    """Each function's median seconds, of the wall clock and of this process's CPU time (which
    others' load inflates less), the functions run in turn: on a shared machine, load that
    comes and goes then weighs on both sides of the ratio alike."""
    for fn in fns:
        fn()  # warm: torch.func's first call builds its transforms
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, taken in zip(fns, times, strict=True):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            taken.append((time.perf_counter() - wall, time.process_time() - cpu))
    return [
        (statistics.median(w for w, _ in taken), statistics.median(c for _, c in taken))
        for taken in times
    ]


def row(repeats: int = 5) -> dict[str, float]:
    """Median seconds of the plain gradient and of the gradient with per_sample_grads, their
    ratio, and the ratio of their CPU times."""
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

    (base, base_cpu), (per_sample, per_sample_cpu) = _medians_s(
        (gradients(plain), gradients(wanted)), repeats
    )
    return {
        "gradient_s": base,
        "per_sample_s": per_sample,
        "ratio": per_sample / base,
        "cpu_ratio": per_sample_cpu / base_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's intra-op threads (default: torch's own choice); on a loaded machine each "
        "parallel operation may wait a scheduler tick for its second thread",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    found = row(args.repeats)
    print(
        f"| per_sample_grads, MLP {ROWS} rows | {1000 * found['gradient_s']:.1f} ms | "
        f"{1000 * found['per_sample_s']:.1f} ms | {found['ratio']:.2f}x | "
        f"CPU time {found['cpu_ratio']:.2f}x | "
        f"torch threads {torch.get_num_threads()} |"
    )


if __name__ == "__main__":
    main()
