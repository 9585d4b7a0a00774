"""The chain rule, computed: every node's value, dL/dnode, and local derivatives.

A ``Tracer`` is handed to a model's forward pass. Each node records its value (the very
tensor the next node consumes, so that autograd can give dL/dnode for it) and, for an
elementwise node, its local derivative with respect to each input, taken per element
(the inputs are broadcast to the node's shape first, so nothing is summed away).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from service.errors import InvalidInput


@dataclass
class TraceNode:
    node: str
    op: str
    inputs: list[str]
    value: torch.Tensor
    local: dict[str, torch.Tensor] | None = None
    grad: torch.Tensor | None = None


@dataclass
class Tracer:
    budget: int = 1_000_000
    """Elements the trace may show in all; past it, the request is refused, not computed."""
    nodes: list[TraceNode] = field(default_factory=list)
    _index: dict[str, TraceNode] = field(default_factory=dict)
    _shown: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def value(self, name: str) -> torch.Tensor:
        return self._index[name].value

    def leaf(self, name: str, op: str, value: torch.Tensor) -> torch.Tensor:
        """Record an input, parameter or constant (once per name)."""
        if name not in self._index:
            self._add(TraceNode(name, op, [], value))
        return value

    def spend(self, elements: int) -> None:
        self._shown += elements
        if self._shown > self.budget:
            raise InvalidInput(
                f"the explained answer would show more than {self.budget} numbers: explain a "
                "smaller batch or model, or leave explain out"
            )

    def record(
        self,
        name: str,
        op: str,
        inputs: Sequence[str],
        value: torch.Tensor,
        local: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self._add(TraceNode(name, op, list(inputs), value, local))
        return value

    def _add(self, node: TraceNode) -> None:
        self.nodes.append(node)
        self.spend(node.value.numel() * 2)  # its value and dL/dnode
        self._index[node.node] = node

    def backward(self, loss: torch.Tensor) -> None:
        """Fill in dL/dnode for every node that the loss depends on; the graph is kept."""
        wanted = [n for n in self.nodes if n.value.requires_grad]
        grads = torch.autograd.grad(
            loss, [n.value for n in wanted], retain_graph=True, allow_unused=True
        )
        for node, grad in zip(wanted, grads, strict=True):
            node.grad = torch.zeros_like(node.value) if grad is None else grad.detach()
        # Snapshot: parameters are updated in place after this, the trace shows them before.
        for node in self.nodes:
            node.value = node.value.detach().clone()

    def refit(self, value: torch.Tensor) -> None:
        """The last node's value was reshaped on its way out of the model: show that tensor."""
        node = self.nodes[-1]
        if node.value.shape != value.shape:
            node.value = value
            if node.local is not None:
                node.local = {k: v.reshape(value.shape) for k, v in node.local.items()}


def elementwise_locals(
    fn: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    names: Sequence[str],
    shape: torch.Size,
) -> dict[str, torch.Tensor]:
    """d fn / d arg for each argument, per element of the output (of ``shape``)."""
    with torch.enable_grad():
        expanded = [
            a.detach().expand(shape).clone().requires_grad_(a.dtype.is_floating_point) for a in args
        ]
        out = fn(*expanded)
        wanted = [(n, e) for n, e in zip(names, expanded, strict=True) if e.requires_grad]
        grads = torch.autograd.grad(out.sum(), [e for _, e in wanted], allow_unused=True)
    local: dict[str, torch.Tensor] = {}
    for (name, tensor), grad in zip(wanted, grads, strict=True):
        g = torch.zeros_like(tensor) if grad is None else grad
        # The same input twice (x * x) contributes through both places.
        local[name] = local[name] + g if name in local else g
    return local
