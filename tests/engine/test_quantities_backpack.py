"""The quantities beyond the gradient against BackPACK, on random linear and sequential
models (linear, relu, tanh, sigmoid) with mse and cross_entropy, mean and sum.

BackPACK is imported without torchvision (which it needs only for its examples), and its
hooks are kept off the service's own modules: each case extends a copy.
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from service.engine import models, specs, step

backpack = pytest.importorskip("backpack")
extensions = pytest.importorskip("backpack.extensions")

pytestmark = pytest.mark.usefixtures("one_thread")

# BackPACK's name for each of our quantities, as it leaves it on parameters.
BACKPACK = {
    "per_sample_grads": ("BatchGrad", "grad_batch"),
    "per_sample_l2": ("BatchL2Grad", "batch_l2"),
    "sum_grad_squared": ("SumGradSquared", "sum_grad_squared"),
    "variance": ("Variance", "variance"),
    "diag_hessian": ("DiagHessian", "diag_h"),
    "diag_ggn": ("DiagGGNExact", "diag_ggn_exact"),
}
CASES = 24


def random_case(seed: int) -> dict[str, Any]:
    """A random request: a linear model or a sequential one of 1-3 linear layers with
    activations between, a loss, a reduction, a dtype and a batch."""
    rng = random.Random(seed)
    dtype = "float32" if seed % 4 == 3 else "float64"
    loss = "cross_entropy" if seed % 2 else "mse"
    reduction = "sum" if seed % 3 == 0 else "mean"
    n, width = rng.randint(1, 5), rng.randint(1, 4)
    out = rng.randint(2, 3) if loss == "cross_entropy" else rng.randint(1, 3)
    if seed % 5 == 0:
        model: dict[str, Any] = {"type": "linear", "in_features": width, "out_features": out}
    else:
        layers: list[dict[str, Any]] = []
        features = width
        for i in range(rng.randint(1, 3)):
            last = i == 2 or rng.random() < 0.4
            nxt = out if last else rng.randint(1, 4)
            layers.append({"type": "linear", "in_features": features, "out_features": nxt})
            if last:
                break
            layers.append({"type": rng.choice(["relu", "tanh", "sigmoid"])})
            features = nxt
        if layers[-1]["type"] != "linear" or layers[-1]["out_features"] != out:
            layers.append({"type": "linear", "in_features": features, "out_features": out})
        model = {"type": "sequential", "layers": layers}
    model |= {"dtype": dtype, "seed": seed}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen, dtype=torch.float64).tolist()
    if loss == "cross_entropy":
        y: Any = torch.randint(0, out, (n,), generator=gen).tolist()
    else:
        y = torch.randn(n, out, generator=gen, dtype=torch.float64).tolist()
    return {
        "model": model,
        "loss": {"type": loss, "reduction": reduction},
        "batch": {"x": x, "y": y},
        "quantities": list(BACKPACK),
    }


def with_backpack(request: specs.GradientsRequest) -> dict[str, dict[str, torch.Tensor]]:
    """BackPACK's answer for the request, on a copy of the service's model."""
    built = models.build(request.model)
    module = copy.deepcopy(built.module)
    plain = nn.Sequential(*module.children()) if isinstance(module, nn.Sequential) else module
    if not isinstance(plain, nn.Sequential):
        plain = nn.Sequential(nn.Linear(plain.in_features, plain.out_features, dtype=built.dtype))
        plain[0].load_state_dict(module.state_dict())
    names = {f"0.{n}": n for n, _ in module.named_parameters()}
    net = backpack.extend(plain)
    loss_spec = request.loss
    assert isinstance(loss_spec, specs.LossSpec)
    if loss_spec.type == "mse":
        criterion: nn.Module = nn.MSELoss(reduction=loss_spec.reduction)
        y = torch.tensor(request.batch.y, dtype=built.dtype)
    else:
        criterion = nn.CrossEntropyLoss(reduction=loss_spec.reduction)
        y = torch.tensor(request.batch.y, dtype=torch.int64)
    criterion = backpack.extend(criterion)
    x = torch.tensor(request.batch.x, dtype=built.dtype)
    loss = criterion(net(x), y)
    wanted = [getattr(extensions, cls)() for cls, _ in BACKPACK.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its hooks on a module whose input needs no grad
        with backpack.backpack(*wanted):
            loss.backward()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for quantity, (_, attribute) in BACKPACK.items():
        out[quantity] = {
            names.get(n, n): getattr(p, attribute).detach() for n, p in net.named_parameters()
        }
    return out


@pytest.mark.parametrize("seed", range(CASES))
def test_against_backpack(seed: int) -> None:
    request = specs.GradientsRequest.model_validate(random_case(seed))
    answer = step.run("gradients", request)
    reference = with_backpack(request)
    tol = 1e-5 if request.model.dtype == "float32" else 1e-10
    for quantity, params in reference.items():
        got = answer["quantities"][quantity]
        assert set(got) == set(params), quantity
        for name, expected in params.items():
            value = torch.tensor(got[name], dtype=torch.float64)
            assert value.shape == expected.shape, (quantity, name)
            torch.testing.assert_close(
                value, expected.double(), rtol=tol, atol=tol, msg=f"{quantity} of {name}"
            )
