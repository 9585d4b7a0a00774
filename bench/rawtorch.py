"""The many-sessions limit: every session's MLP step as one raw torch computation.

The sessions' weights are stacked along a leading dimension; one ``torch.func.vmap`` of
``torch.func.grad`` gives every session's gradients at once, and one ``torch.optim.Adam``
over the stacked tensors updates them all. Adam is elementwise (each element's moments and
step depend on that element alone, and the step count is shared), so this is exactly as many
separate Adams as there are sessions: ``tests/bench/test_rawtorch.py`` holds that, against
separate ``torch.optim.Adam`` instances and against the engine.

Each session steps on its own batch (stacked too), as each session's request carries its
own: the same work the service does for ``POST /v1/sessions/step``, with nothing validated,
decoded, stored or encoded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import grad, vmap

Params = dict[str, torch.Tensor]
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")
"""The MLP's parameters, named as the engine's ``sequential`` model names them."""


def _loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    out = hidden @ params["2.weight"].T + params["2.bias"]
    return torch.nn.functional.mse_loss(out, y)


_GRADS = vmap(grad(_loss))


class StackedAdam:
    """Many sessions of linear → tanh → linear with mse and Adam, stepped together.

    Args:
        params: each parameter stacked over the sessions (leading dimension: the session),
            under the names in ``NAMES``; copied, so the caller's tensors are not changed.
        lr: Adam's learning rate (its other settings are torch's defaults, as the engine's).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        self.params = {name: params[name].detach().clone().requires_grad_() for name in NAMES}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=lr)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step of every session: ``x`` is (sessions, rows, in), ``y`` (sessions, rows, 1)."""
        grads = _GRADS({n: p.detach() for n, p in self.params.items()}, x, y)
        for name, param in self.params.items():
            param.grad = grads[name]
        self.optimizer.step()


def stack(per_session: list[Mapping[str, torch.Tensor]]) -> Params:
    """Each named parameter of ``per_session``, stacked in order."""
    return {name: torch.stack([p[name].detach() for p in per_session]) for name in NAMES}
