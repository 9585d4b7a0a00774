"""Quantities beyond the gradient, each defined once, here, in its docstring.

Write the batch loss as L = Σₙ Lₙ, where Lₙ is sample n's share of it: the loss's terms
that come from output row n, divided by the number of terms when the reduction is
``mean``. Then gₙ = ∂Lₙ/∂θ, and Σₙ gₙ = dL/dθ (the answer's ``grads``). A batch without a
batch dimension (a 0-d ``x``, or one row of features) is one sample. These are BackPACK's
definitions (f-dangel/backpack), and its results are the reference of the tests.

Everything is computed with ``torch.func`` on the model as a function of its trainable
parameters (frozen ones are constants): per-sample gradients as ``vmap`` over ``grad`` of
one sample's share where the model treats rows independently (from one backward, in
``engine.batchgrad``, where its trainable parameters are all linear layers'), else as the
Jacobian of the vector of shares (``jacrev``, a backward per sample); curvature as
Hessian-vector products (the ``vjp`` of ``grad``) pushed through in chunks of ``CHUNK``
basis vectors.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from service.engine import batchgrad, budget, losses, models, specs
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.engine.tensors import decode
from service.errors import GradsvcError, NonFinite, ShapeError, SpecError

NAMES: tuple[str, ...] = specs.QuantityName.__args__  # type: ignore[attr-defined]
PER_SAMPLE = frozenset({"per_sample_grads", "per_sample_l2", "sum_grad_squared", "variance"})
SECOND_ORDER = frozenset({"diag_hessian", "diag_ggn", "hvp", "hessian"})
HESSIAN_KEY = "*"
"""The key of the full Hessian: it spans every trainable parameter, in the order of grads."""
CHUNK = 64
"""Basis vectors (or samples, for ``jacrev``) pushed through at once: memory grows with it,
the number of passes shrinks."""

Params = dict[str, torch.Tensor]


@dataclass
class Problem:
    """The loss of one request as a function of the trainable parameters.

    ``target`` is the batch's ``y`` fitted to the outputs, as the loss takes it.
    """

    model: models.Model
    loss: specs.LossSpec
    inputs: models.Inputs
    target: torch.Tensor
    outputs: torch.Tensor
    seed: int = 0

    @property
    def params(self) -> Params:
        return {n: p.detach() for n, p in self.model.trainable().items()}

    @property
    def frozen(self) -> Params:
        trainable = self.model.trainable()
        named = self.model.named_parameters()
        return {n: p.detach() for n, p in named.items() if n not in trainable}

    def forward(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's outputs on the batch at ``params``."""
        self._reseed()
        whole = _Whole(self.model)
        merged = {f"m.{n}": v for n, v in {**self.frozen, **params}.items()}
        out: torch.Tensor = functional_call(whole, merged, (self.inputs,))
        return out

    def total(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L at ``params``, reduced as the request says."""
        return losses.loss_fn(self.loss)(self.forward(params), self.target)

    def _reseed(self) -> None:
        # Dropout must draw the masks the gradients were computed with (first-order ones only:
        # second-order quantities refuse dropout models).
        if self.model.has_dropout:
            torch.manual_seed(self.seed)

    @property
    def terms(self) -> int:
        """How many terms the loss reduces (its ``mean`` divides by this)."""
        out = self.outputs
        if self.loss.type == "cross_entropy":
            return out.numel() // max(1, out.shape[1 if out.ndim >= 2 else 0])
        return out.numel()

    @property
    def samples(self) -> int | None:
        """N, the rows of the batch; None for a batch that is one sample without a batch
        dimension."""
        out = self.outputs
        terms_ndim = out.ndim - (1 if self.loss.type == "cross_entropy" else 0)
        if terms_ndim < 1:
            return None
        if isinstance(self.model.module, models.ExpressionModule):
            batched = any(t.ndim >= 1 for t in self.inputs.values())
        else:
            batched = self._features().ndim >= 2
        return out.shape[0] if batched else None

    def _features(self) -> torch.Tensor:
        return self.model._features(self.inputs["x"])  # noqa: SLF001 - the model's own fitting

    def share(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Lₙ from one sample's outputs and target (each with its batch dimension of 1)."""
        summed = losses.loss_fn(self.loss.model_copy(update={"reduction": "sum"}))
        count = self.terms if self.loss.reduction == "mean" else 1

        def one(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = summed(out, y)
            return value / count if count != 1 else value

        return one


class _Whole(nn.Module):
    """The model's whole forward (input fitting and checks included) as one module."""

    def __init__(self, model: models.Model) -> None:
        super().__init__()
        self.m = model.module
        self.forward_fn = model.forward

    def forward(self, inputs: models.Inputs) -> torch.Tensor:
        return self.forward_fn(inputs)


# -- the definitions --------------------------------------------------------------------------


def per_sample_grads(problem: Problem) -> Params:
    """gₙ = ∂Lₙ/∂θ for every sample n: shape ``[N, *θ.shape]`` (BackPACK ``BatchGrad``).

    Σₙ gₙ is ``grads``. A model that treats rows independently (linear and sequential ones
    without dropout, softmax over the batch or layer norm over it) is run on each sample
    alone under ``vmap``, or, where every trainable parameter is a linear layer's, from one
    backward as BackPACK does; any other model differentiates the vector of shares, one
    backward per sample, so that even an expression that mixes rows gets the exact definition.
    """
    return _per_sample(problem)[0]


def _per_sample(problem: Problem) -> tuple[Params, frozenset[str]]:
    """The per-sample gradients, and the parameters whose gradients are known finite already
    (so that ``compute`` need not read their N×P numbers again to check)."""
    params = problem.params
    n = problem.samples
    share = problem.share()
    if n is not None and _row_wise(problem):
        fast = batchgrad.linear(problem.model, problem.loss, problem._features(), problem.target)
        if fast is not None:
            return fast
        module, frozen = problem.model.module, problem.frozen
        # A sample without its batch dimension makes each weight's gradient one outer
        # product, which batches far faster than a matmul over a dimension of 1; only a
        # softmax over a dimension counted from the front needs that dimension kept.
        keep = any(isinstance(m, nn.Softmax) and (m.dim or 0) >= 0 for m in module.modules())

        def one(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if keep:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            return share(functional_call(module, {**frozen, **p}, (x,)), y)

        result: Params = vmap(grad(one), in_dims=(None, 0, 0))(
            params, problem._features(), problem.target
        )
        return result, frozenset()

    def shares(p: Params) -> torch.Tensor:
        out = problem.forward(p)
        if n is None:
            return share(out, problem.target).unsqueeze(0)
        rows: torch.Tensor = vmap(lambda o, y: share(o.unsqueeze(0), y.unsqueeze(0)))(
            out, problem.target
        )
        return rows

    jacobian: Params = jacrev(shares, chunk_size=CHUNK)(params)
    return jacobian, frozenset()


def per_sample_l2(per_sample: Params) -> Params:
    """Σ over θ's elements of gₙ², for each n: shape ``[N]`` (BackPACK ``BatchL2Grad``)."""
    return {n: g.flatten(1).pow(2).sum(1) for n, g in per_sample.items()}


def sum_grad_squared(per_sample: Params) -> Params:
    """Σₙ gₙ², elementwise: shape ``θ.shape`` (BackPACK ``SumGradSquared``)."""
    return {n: g.pow(2).sum(0) for n, g in per_sample.items()}


def variance(per_sample: Params) -> Params:
    """(1/N) Σₙ gₙ² − ((1/N) Σₙ gₙ)², elementwise: shape ``θ.shape`` (BackPACK
    ``Variance``). With ``mean`` each gₙ carries the 1/N already, as BackPACK's do."""
    out = {}
    for name, g in per_sample.items():
        n = g.shape[0]
        out[name] = g.pow(2).sum(0) / n - (g.sum(0) / n).pow(2)
    return out


def hvp(problem: Problem, vector: Params) -> Params:
    """H·v, H = ∂²L/∂θ² over all trainable parameters, for ``v`` given per parameter:
    shape ``θ.shape`` each (the ``vjp`` of ``grad``: H is symmetric)."""
    (product,) = _hessian_operator(problem)(vector)
    result: Params = product
    return result


def _hessian_operator(problem: Problem) -> Callable[[Params], tuple[Params]]:
    """v ↦ H·v, the gradient's graph built once (reverse over reverse: torch's forward mode
    lacks some losses' second derivatives)."""
    product: Callable[[Params], tuple[Params]] = vjp(grad(problem.total), problem.params)[1]
    return product


def hessian(problem: Problem) -> Params:
    """The full Hessian ∂²L/∂θ² over all trainable parameters, flattened in the order of
    ``grads``: shape ``[P, P]`` under the key ``"*"``."""
    rows = [block for _, block in _hessian_rows(problem)]
    return {HESSIAN_KEY: torch.cat(rows) if rows else _empty(problem, 2)}


def diag_hessian(problem: Problem) -> Params:
    """The diagonal of ∂²L/∂θ² (the full Hessian's, not a block's approximation): shape
    ``θ.shape`` (BackPACK ``DiagHessian``). One Hessian-vector product per element."""
    diagonal = [block.diagonal(offset=start) for start, block in _hessian_rows(problem)]
    return _unflatten(problem, torch.cat(diagonal) if diagonal else _empty(problem, 1))


def diag_ggn(problem: Problem) -> Params:
    """The diagonal of the exact generalized Gauss-Newton matrix Jᵀ (∂²L/∂ŷ²) J, J the
    Jacobian of the outputs ŷ in θ: shape ``θ.shape`` (BackPACK ``DiagGGNExact``). For
    element i: uᵢ = J eᵢ (a ``jvp`` through the model), then uᵢᵀ (∂²L/∂ŷ²) uᵢ (the
    ``vjp`` of the loss's gradient in ŷ)."""
    params, target = problem.params, problem.target
    loss = losses.loss_fn(problem.loss)

    def in_outputs(o: torch.Tensor) -> torch.Tensor:
        return loss(o, target)

    curvature: Callable[[torch.Tensor], tuple[torch.Tensor]] = vjp(
        grad(in_outputs), problem.outputs
    )[1]

    def entry(tangent: Params) -> torch.Tensor:
        u: torch.Tensor = jvp(problem.forward, (params,), (tangent,))[1]
        (hu,) = curvature(u)
        return (u * hu).sum()

    values = [vmap(entry)(basis) for _, basis in _bases(problem)]
    return _unflatten(problem, torch.cat(values) if values else _empty(problem, 1))


def jacobian(problem: Problem) -> Params:
    """∂outputs/∂θ: shape ``[*outputs.shape, *θ.shape]``."""
    result: Params = jacrev(problem.forward, chunk_size=CHUNK)(problem.params)
    return result


# -- basis vectors ----------------------------------------------------------------------------


def _sizes(problem: Problem) -> list[tuple[str, torch.Size]]:
    return [(n, p.shape) for n, p in problem.model.trainable().items()]


def _bases(problem: Problem) -> list[tuple[int, Params]]:
    """The unit vectors of the flattened parameters, CHUNK at a time, per parameter."""
    sizes = _sizes(problem)
    total = sum(math.prod(s) for _, s in sizes)
    out = []
    for start in range(0, total, CHUNK):
        rows = min(CHUNK, total - start)
        flat = torch.zeros(rows, total, dtype=problem.model.dtype, device=problem.model.device)
        flat[torch.arange(rows), torch.arange(start, start + rows)] = 1
        pieces = torch.split(flat, [math.prod(s) for _, s in sizes], dim=1)
        basis = {n: v.reshape(rows, *s) for (n, s), v in zip(sizes, pieces, strict=True)}
        out.append((start, basis))
    return out


def _hessian_rows(problem: Problem) -> list[tuple[int, torch.Tensor]]:
    """The Hessian's rows, a chunk at a time: (first row's index, rows as [rows, P])."""
    params = problem.params
    product = _hessian_operator(problem)
    out = []
    for start, basis in _bases(problem):
        (rows,) = vmap(product)(basis)
        out.append((start, torch.cat([rows[n].flatten(1) for n in params], dim=1)))
    return out


def _unflatten(problem: Problem, flat: torch.Tensor) -> Params:
    sizes = _sizes(problem)
    pieces = torch.split(flat, [math.prod(s) for _, s in sizes])
    return {n: v.reshape(s) for (n, s), v in zip(sizes, pieces, strict=True)}


def _empty(problem: Problem, ndim: int) -> torch.Tensor:
    return torch.zeros((0,) * ndim, dtype=problem.model.dtype, device=problem.model.device)


def _row_wise(problem: Problem) -> bool:
    """Whether sample n's outputs depend on row n of the batch alone, so that each sample
    can be run by itself: no dropout (its mask is drawn for the whole batch), no softmax or
    layer norm across the batch's dimension, and not an expression (which may mix rows);
    nor shaped layers (flatten and last count dimensions from the batch's)."""
    model = problem.model
    if isinstance(model.module, models.ExpressionModule) or model.has_dropout or model.shaped:
        return False
    ndim = problem._features().ndim
    for layer in model.module.modules():
        if isinstance(layer, nn.Softmax) and (layer.dim is None or layer.dim % ndim == 0):
            return False
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) >= ndim:
            return False
    return True


# -- a request's quantities -------------------------------------------------------------------


def check(
    model: models.Model,
    wanted: tuple[str, ...],
    vector: Mapping[str, Any] | None,
    limits: Limits = DEFAULT_LIMITS,
) -> Params | None:
    """What a request's quantities need of its model, checked before anything is computed;
    the vector of ``hvp`` decoded (None when not asked for).

    Raises:
        SpecError: a second-order quantity of a model with dropout; any of a model with
            batch-norm.
        TooLarge: ``hessian`` of more than ``limits.hessian_params`` parameters.
        ShapeError: ``hvp``'s vector misses a parameter, names another or has another shape.
    """
    second = [q for q in wanted if q in SECOND_ORDER]
    if second and model.has_dropout:
        raise SpecError(
            f"{', '.join(second)} cannot be computed for a model with dropout: its random mask "
            "makes the loss a different function at every evaluation. Remove the dropout "
            "layers, or ask only for first-order quantities",
            loc=("quantities",),
        )
    if model.has_batch_norm:
        raise SpecError(
            f"{', '.join(wanted)} cannot be computed for a model with batch-norm: in train "
            "mode each sample's output depends on the whole batch through its statistics, so "
            "per-sample quantities are not defined. Ask for the gradients alone, or use "
            "layer_norm, which normalises each sample by itself",
            loc=("quantities",),
        )
    trainable = model.trainable()
    if "hessian" in wanted:
        budget.check_hessian({n: tuple(p.shape) for n, p in trainable.items()}, limits)
    if "hvp" not in wanted:
        return None
    if vector is None:
        raise ShapeError('"hvp" needs "vector": {parameter: tensor}', loc=("vector",))
    return _vector(model, trainable, vector, limits)


def _vector(
    model: models.Model,
    trainable: Mapping[str, torch.Tensor],
    vector: Mapping[str, Any],
    limits: Limits,
) -> Params:
    missing = [n for n in trainable if n not in vector]
    unknown = [n for n in vector if n not in trainable]
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unknown {', '.join(map(repr, unknown[:5]))}"] if unknown else []
        raise ShapeError(
            f"vector names every trainable parameter, as grads does ({'; '.join(parts)}); "
            f"the trainable parameters are {', '.join(trainable) or 'none'}",
            loc=("vector",),
        )
    out = {}
    for name, param in trainable.items():
        try:
            value = decode(vector[name], model.dtype, limits)
        except GradsvcError as exc:
            raise exc.at("vector", name) from None
        if value.shape != param.shape:
            if value.numel() != param.numel() or value.squeeze().shape != param.squeeze().shape:
                raise ShapeError(
                    f"vector.{name} has shape {list(value.shape)}; the parameter's shape is "
                    f"{list(param.shape)}",
                    loc=("vector", name),
                )
            value = value.reshape(param.shape)
        out[name] = value.to(param.device)
    return out


@functools.cache
def _forward_mode() -> None:
    """Load torch's forward-mode decompositions once: torch scripts them on first use, and
    says that scripting is deprecated (a warning for torch's own use, not ours to show)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def compute(problem: Problem, wanted: tuple[str, ...], vector: Params | None) -> dict[str, Params]:
    """Each quantity of ``wanted`` (checked by ``check``), by name, per parameter.

    Raises:
        NonFinite: a quantity that is NaN or infinite somewhere.
    """
    _forward_mode()
    problem.model.module.train()
    if not problem.params:  # every parameter frozen, or none: nothing to differentiate
        return {n: {HESSIAN_KEY: _empty(problem, 2)} if n == "hessian" else {} for n in wanted}
    found: dict[str, Params] = {}
    per_sample, finite = _per_sample(problem) if PER_SAMPLE & set(wanted) else (None, frozenset())
    for name in wanted:
        if name in found:
            continue
        if per_sample is not None and name in _FROM_PER_SAMPLE:
            found[name] = _FROM_PER_SAMPLE[name](per_sample)
        elif name == "hvp":
            assert vector is not None
            found[name] = hvp(problem, vector)
        else:
            found[name] = _FROM_PROBLEM[name](problem)
    for name, tensors in found.items():
        for param, value in tensors.items():
            if name == "per_sample_grads" and param in finite:
                continue  # its factors were checked: reading N×P numbers again costs as much
            if value.dtype.is_floating_point and not _finite(value):
                raise NonFinite(
                    f"{name} of {param} is not finite (NaN or Infinity): JSON cannot carry it. "
                    "Scale the inputs or targets down, or use float64"
                )
    return {name: {p: v.detach() for p, v in found[name].items()} for name in wanted}


def _finite(value: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is non-finite whenever an element is, and
    costs a fraction of ``isfinite`` on the large per-sample tensors; only a sum that
    overflowed needs the element-wise look."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


_FROM_PER_SAMPLE: dict[str, Callable[[Params], Params]] = {
    "per_sample_grads": lambda g: g,
    "per_sample_l2": per_sample_l2,
    "sum_grad_squared": sum_grad_squared,
    "variance": variance,
}
_FROM_PROBLEM: dict[str, Callable[[Problem], Params]] = {
    "diag_hessian": diag_hessian,
    "diag_ggn": diag_ggn,
    "hessian": hessian,
    "jacobian": jacobian,
}
