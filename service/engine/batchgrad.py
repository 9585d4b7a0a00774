"""Per-sample gradients of linear layers from one backward, as BackPACK's ``BatchGrad``.

For a linear layer z = a Wᵀ + b on a batch of rows, row n's output depends on row n of its
input alone, so with δ = ∂L/∂z (one backward of the batch loss L to each layer's output)
δₙ = ∂Lₙ/∂zₙ, and sample n's gradients are the outer product δₙ ⊗ aₙ for W and δₙ for b.
That is one multiplication per layer, written straight into the answer, where ``vmap``
over ``grad`` runs the model's backward once per sample and stacks the results.

The answer is N×P numbers, so its cost is writing them: most of it, in fresh memory, is
the page faults, one per 4 KiB page; ``answer_tensor`` asks the kernel for 2 MiB pages.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from service.engine import losses, models, specs

Params = dict[str, torch.Tensor]

HUGE_PAGES_FROM = 16 << 20
"""Bytes from which an answer's memory is asked for in huge pages: below it, page faults
cost little, and torch's allocator (whose peak the budget's tests read) serves it."""
_PROVABLE = frozenset({torch.float32, torch.float64})
"""Dtypes whose products torch rounds once, in the dtype itself (see ``_finite_product``)."""


def linear(
    model: models.Model, loss: specs.LossSpec, features: torch.Tensor, target: torch.Tensor
) -> tuple[Params, frozenset[str]] | None:
    """gₙ for every trainable parameter, by name in the order of ``model.trainable()``, and
    the names whose gradients are known finite; None unless the batch is rows of features
    (``[N, in_features]``) and every trainable parameter is a linear layer's weight or bias.

    The caller has checked that the model treats rows independently (no dropout, no softmax
    or layer norm across the batch), which is what makes δₙ sample n's alone.

    Args:
        model: a linear or sequential model.
        loss: the request's loss, as ``grads`` were computed with.
        features: the batch's ``x`` as the model's first layer takes it.
        target: the batch's ``y`` fitted to the outputs.

    Returns:
        The per-sample gradients and the finite ones' names, or None for another model.
    """
    trainable = model.trainable()
    if features.ndim != 2 or not trainable:
        return None
    module = model.module
    children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
    layers = [(f"{name}.", layer) for name, layer in children] if children else [("", module)]
    owned = {
        f"{prefix}{kind}"
        for prefix, layer in layers
        if isinstance(layer, nn.Linear)
        for kind, _ in layer.named_parameters(recurse=False)
    }
    if not set(trainable) <= owned:
        return None
    with torch.enable_grad():
        taken: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # prefix, input a, output z
        x = features
        for prefix, layer in layers:
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            bias = None if layer.bias is None else layer.bias.detach()
            z = F.linear(x, layer.weight.detach(), bias)
            if any(name.startswith(prefix) for name in trainable):
                if not z.requires_grad:  # nothing before it is trainable
                    z.requires_grad_()
                taken.append((prefix, x.detach(), z))
            x = z
        total = losses.loss_fn(loss)(x, target)
        deltas = torch.autograd.grad(total, [z for _, _, z in taken])
    found: Params = {}
    finite: set[str] = set()
    for (prefix, a, _), delta in zip(taken, deltas, strict=True):
        weight, bias_name = f"{prefix}weight", f"{prefix}bias"
        peak = _peak(delta)
        if weight in trainable:
            g = answer_tensor((delta.shape[0], delta.shape[1], a.shape[1]), delta)
            torch.mul(delta.unsqueeze(2), a.unsqueeze(1), out=g)
            found[weight] = g
            if _finite_product(peak, _peak(a)):
                finite.add(weight)
        if bias_name in trainable:
            found[bias_name] = delta
            if bool(torch.isfinite(peak)):
                finite.add(bias_name)
    return {name: found[name] for name in trainable}, frozenset(finite)


def _peak(t: torch.Tensor) -> torch.Tensor:
    """max |t| (NaN where t holds one), copying nothing (``aminmax`` would be one pass, but
    torch's CPU kernel for it is many times slower on some shapes, [4096, 64] among them)."""
    if not t.numel():
        return torch.zeros((), dtype=t.dtype, device=t.device)
    return torch.maximum(t.amax(), -t.amin())


def _finite_product(peak_delta: torch.Tensor, peak_a: torch.Tensor) -> bool:
    """Whether every δᵢ·aⱼ is finite, from max|δ|·max|a| alone: rounding is monotone, so no
    product rounds past the largest one's rounding (a NaN or Infinity in δ or a makes the
    bound not finite too). Only where torch rounds the product once, in the dtype."""
    if peak_delta.dtype not in _PROVABLE or peak_a.dtype != peak_delta.dtype:
        return False
    return bool(torch.isfinite(peak_delta * peak_a))


def answer_tensor(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s dtype and device, to be written once.

    A large one on the CPU is an anonymous mapping advised into transparent huge pages
    (Linux; elsewhere, or where the kernel keeps them off, ordinary pages): writing fresh
    memory costs a page fault per page, and 2 MiB pages make 512 times fewer of them.

    Args:
        shape: the tensor's shape.
        like: the tensor whose dtype and device it takes.

    Returns:
        The tensor; its memory is freed with it.
    """
    size = math.prod(shape) * like.element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux's alone
    if like.device.type != "cpu" or advice is None or size < max(HUGE_PAGES_FROM, 1):
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    # Private: a shared anonymous mapping is shmem, which takes huge pages by another switch.
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(advice)
    # The tensor keeps the mapping alive, and the mapping is unmapped when the tensor goes.
    return torch.frombuffer(memory, dtype=like.dtype).view(shape)
