"""A session's state ↔ bytes: safetensors for the tensors, JSON in its metadata for the rest.

Never pickle. The same bytes are the store's record and the checkpoint a client downloads;
reading them back validates every name, shape and dtype against the model the specs build,
so a checkpoint that lies is a 422, not a crash.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from service.engine import optimizers, schedulers
from service.engine.models import Model
from service.errors import InvalidInput

PARAM = "param."
BUFFER = "buffer."
"""Buffers (batch-norm's running statistics): a file without any holds none, as every file
written before models had buffers does."""
OPT = "opt."
SCHEDULER = "scheduler"
"""The metadata key of the scheduler's state (``schedulers.Saved`` as JSON), if any."""
MAX_METADATA = 1_000_000
MAX_COUNT = 2**62
"""A count of batches a restored buffer may hold at most (less one): steps add to it."""
ACC = "accumulator."
ACCUMULATOR = "accumulator"
"""The metadata key of the accumulator's counts (JSON), beside its ``ACC`` tensors."""


@dataclass(frozen=True)
class Accumulator:
    """Gradients summed since the last apply: one tensor per trainable parameter that a
    batch's backward reached (torch's ``.grad`` not None; the others are absent), the
    batches summed, and the sum and number of their losses (a batch sent with
    ``grad_outputs`` has none). Never changed in place: an accumulate makes a new one, so
    a cached one always stands for its committed version."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    loss_sum: float = 0.0
    losses: int = 0


def dump(
    model: Model,
    optimizer: torch.optim.Optimizer,
    metadata: dict[str, str],
    scheduler: schedulers.Scheduler | None = None,
    accumulator: Accumulator | None = None,
) -> bytes:
    """The state's bytes: parameters, buffers and optimizer state as tensors, the rest as
    metadata; a non-empty ``accumulator`` as ``ACC`` tensors and its counts under
    ``ACCUMULATOR``."""
    return _save(*_parts(model, optimizer, metadata, scheduler, accumulator))


def _parts(
    model: Model,
    optimizer: torch.optim.Optimizer,
    metadata: dict[str, str],
    scheduler: schedulers.Scheduler | None,
    accumulator: Accumulator | None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata ``dump`` writes, in the order it writes them."""
    tensors: dict[str, torch.Tensor] = {
        PARAM + name: p.detach().contiguous() for name, p in model.named_parameters().items()
    }
    for name, b in model.named_buffers().items():
        tensors[BUFFER + name] = b.detach().contiguous()
    extra: dict[str, Any] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            name = f"{OPT}{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous()
            else:
                extra[name] = value
    if scheduler is not None:
        metadata = {**metadata, SCHEDULER: schedulers.save(scheduler, optimizer)}
    if accumulator is not None and accumulator.count > 0:
        for name, g in accumulator.grads.items():
            tensors[ACC + name] = g.detach().contiguous()
        counts = {"count": accumulator.count, "loss_sum": accumulator.loss_sum}
        metadata = {**metadata, ACCUMULATOR: json.dumps({**counts, "losses": accumulator.losses})}
    return tensors, {**metadata, "optimizer_extra": json.dumps(extra)}


Dumped = tuple[Model, torch.optim.Optimizer, schedulers.Scheduler | None, Accumulator | None]
"""What ``dump_many`` dumps for one session: its model, optimizer, scheduler, accumulator."""


@dataclass(frozen=True)
class _Part:
    """A session's file as ``_save_many`` takes it: tensor names in ``dump``'s order, the
    tensors (neither detached nor copied: ``_save_many`` reads them stacked), the metadata,
    and the layout that files written together share."""

    key: tuple[Any, ...]
    names: list[str]
    tensors: list[torch.Tensor]
    metadata: dict[str, str]


def dump_many(states: list[Dumped]) -> list[bytes]:
    """Per session, in order, the bytes ``dump(model, optimizer, {}, scheduler, accumulator)``
    gives it alone. Sessions whose files have one layout (tensor names, order, shapes and
    dtypes: a vmapped group's do) are written together (``_save_many``); a session with
    buffers or an accumulator, off the CPU, or alone in its layout, by ``dump``."""
    out: list[bytes | None] = [None] * len(states)
    layouts: dict[tuple[Any, ...], list[tuple[int, _Part]]] = {}
    for i, (model, optimizer, scheduler, accumulator) in enumerate(states):
        part = _part(model, optimizer, scheduler, accumulator)
        if part is None:
            out[i] = dump(model, optimizer, {}, scheduler, accumulator)
        else:
            layouts.setdefault(part.key, []).append((i, part))
    for members in layouts.values():
        if len(members) > 1 and all(t.numel() for t in members[0][1].tensors):
            files = _save_many([part for _, part in members])
        else:
            files = [dump(states[i][0], states[i][1], {}, *states[i][2:]) for i, _ in members]
        for (i, _), data in zip(members, files, strict=True):
            out[i] = data
    return [cast(bytes, data) for data in out]


_PARAMS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, ...] | None] = (
    weakref.WeakKeyDictionary()
)


def _params(model: Model) -> tuple[Any, ...] | None:
    """The model's (``PARAM`` name, parameter) pairs in ``dump``'s order and their layout,
    worked out once per module: a built model's parameters are fixed objects, which steps
    and restores write into (``engine.batching`` relies on it too). None for a model with
    buffers or off the CPU: ``dump`` writes those."""
    if model.module in _PARAMS:
        return _PARAMS[model.module]
    named = model.named_parameters()
    known = None
    if not model.named_buffers() and all(p.device.type == "cpu" for p in named.values()):
        pairs = tuple((PARAM + n, p) for n, p in named.items())
        known = (pairs, tuple((n, p.dtype, p.shape) for n, p in pairs))
    _PARAMS[model.module] = known
    return known


def _part(
    model: Model,
    optimizer: torch.optim.Optimizer,
    scheduler: schedulers.Scheduler | None,
    accumulator: Accumulator | None,
) -> _Part | None:
    """What ``dump`` would write for this session (as ``_parts`` gives it), or None where
    ``dump`` must write it: ``_params``'s Nones, an accumulator, an optimizer whose
    ``state_dict`` runs hooks or would not number its state."""
    params = _params(model)
    hooks = optimizer._optimizer_state_dict_pre_hooks or optimizer._optimizer_state_dict_post_hooks
    if params is None or hooks or (accumulator is not None and accumulator.count > 0):
        return None
    pairs, layout = params
    names = [n for n, _ in pairs]
    tensors = [p for _, p in pairs]
    # Optimizer.state_dict's numbering: a parameter's first place over the groups in order.
    index: dict[int, int] = {}
    start = 0
    for group in optimizer.param_groups:
        index.update({id(p): i for i, p in enumerate(group["params"], start) if id(p) not in index})
        start += len(group["params"])
    slots: list[Any] = []
    extra: dict[str, Any] = {}
    for param, entry in optimizer.state.items():  # state_dict's order
        if not isinstance(param, torch.Tensor) or id(param) not in index:
            return None
        for key, value in entry.items():
            name = f"{OPT}{index[id(param)]}.{key}"
            if isinstance(value, torch.Tensor):
                if not value.is_cpu:  # a fifth of device.type's cost: 12 a session
                    return None
                names.append(name)
                tensors.append(value)
                slots.append((name, value.dtype, value.shape))
            else:
                extra[name] = value
    metadata: dict[str, str] = {}
    if scheduler is not None:
        metadata[SCHEDULER] = schedulers.save(scheduler, optimizer)
    metadata["optimizer_extra"] = json.dumps(extra)
    return _Part((layout, tuple(slots)), names, tensors, metadata)


def _save_many(parts: list[_Part]) -> list[bytes]:
    """``_save`` of each part, for parts of one layout and no empty tensor: each tensor
    name's rows stacked and all of them read out as one byte string (a session's data is
    then one contiguous slice of it), and the header's tensor entries encoded once, since
    only the metadata differs from file to file. The same bytes as ``_save``, file for file."""
    first = parts[0]
    entries: dict[str, Any] = {}
    offset = 0
    for name, tensor in zip(first.names, first.tensors, strict=True):
        size = tensor.numel() * tensor.element_size()
        entries[name] = _entry(tensor, offset, size)
        offset += size
    count = len(parts)
    with torch.no_grad():  # parameters require grad: the stack must not record it
        blocks = [
            torch.stack([part.tensors[j] for part in parts]).reshape(count, -1).view(torch.uint8)
            for j in range(len(first.names))
        ]
        rows = torch.cat(blocks, dim=1) if blocks else torch.empty(count, 0, dtype=torch.uint8)
    data = memoryview(rows.numpy().tobytes())
    # _save encodes {"__metadata__": metadata, **entries}; a JSON object is its members
    # joined by commas, so that text is the metadata's encoding spliced into this one.
    tail = _HEADER.encode(entries)[1:]
    tail = ("," + tail) if entries else tail
    files: list[bytes] = []
    for i, part in enumerate(parts):
        text = '{"__metadata__":' + _HEADER.encode(part.metadata) + tail
        files.append(_file(text, [data[i * offset : (i + 1) * offset]]))
    return files


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


_NUMPY = frozenset(_SAFETENSORS_DTYPES) - {torch.bfloat16}
"""Dtypes whose tensors numpy reads as they are."""
_HEADER = json.JSONEncoder(separators=(",", ":"))
"""``json.dumps``'s encoder with these separators, made once rather than per state."""


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format, written directly: ``safetensors.torch.save`` spends about a
    millisecond per small tensor checking for shared storage, which a step cannot afford.
    (8-byte little-endian header size, a JSON header padded to 8 bytes, then the data.)"""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.requires_grad:  # dump's are detached already; a detach is a new tensor
            tensor = tensor.detach()
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _NUMPY:
            raw = tensor.numpy().tobytes()  # the same bytes in two calls, not six: 16 a step
        else:  # numpy has no bfloat16, so its bytes are read as uint8
            raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = _entry(tensor, offset, len(raw))
        chunks.append(raw)
        offset += len(raw)
    return _file(_HEADER.encode(header), chunks)


def _entry(tensor: torch.Tensor, offset: int, size: int) -> dict[str, Any]:
    """A tensor's entry in a safetensors header: its data at ``offset``, ``size`` bytes."""
    return {
        "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
        "shape": list(tensor.shape),
        "data_offsets": [offset, offset + size],
    }


def _file(header: str, data: Sequence[bytes | memoryview]) -> bytes:
    """A safetensors file: the 8-byte little-endian header size, the JSON ``header``
    padded with spaces to 8 bytes, then the data."""
    text = header.encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *data])


def read(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a state file, or InvalidInput if it is not one."""
    if len(data) < 8:
        raise InvalidInput("not a safetensors file")
    header = int.from_bytes(data[:8], "little")
    if header > MAX_METADATA or header + 8 > len(data):
        raise InvalidInput("not a safetensors file (its header size is wrong)")
    try:
        tensors = load(data)
        raw = json.loads(data[8 : 8 + header]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError, AttributeError) as exc:
        raise InvalidInput(f"not a valid safetensors file: {str(exc)[:200]}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise InvalidInput("the file's metadata must map names to strings")
    return tensors, raw


def restore(model: Model, optimizer: torch.optim.Optimizer, data: bytes) -> dict[str, str]:
    """Load parameters and optimizer state into freshly built ``model`` and ``optimizer``;
    the file's metadata, where the scheduler's state is (``SCHEDULER``)."""
    tensors, metadata = read(data)
    params = model.named_parameters()
    expected = {PARAM + n for n in params}
    present = {k for k in tensors if k.startswith(PARAM)}
    if present != expected:
        raise InvalidInput(
            f"the file's parameters ({', '.join(sorted(present)) or 'none'}) are not the model's "
            f"({', '.join(sorted(expected))})"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = tensors[PARAM + name]
            if value.shape != p.shape or value.dtype != p.dtype:
                raise InvalidInput(
                    f"{name}: the file holds {value.dtype} {list(value.shape)}, the model "
                    f"{p.dtype} {list(p.shape)}"
                )
            if p.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise InvalidInput(f"{name}: the file holds values that are not finite")
            p.copy_(value)
    _restore_buffers(model, tensors)
    _restore_optimizer(model, optimizer, tensors, metadata)
    return metadata


def _restore_buffers(model: Model, tensors: dict[str, torch.Tensor]) -> None:
    """The file's buffers into ``model``: exactly the model's, each of its shape and dtype,
    finite, a variance not negative, a count of batches not negative. torch checks none of
    this, and a lie would surface as NaN outputs or a 500 at the next forward."""
    buffers = model.named_buffers()
    expected = {BUFFER + n for n in buffers}
    present = {k for k in tensors if k.startswith(BUFFER)}
    if present != expected:
        raise InvalidInput(
            f"the file's buffers ({', '.join(sorted(present)) or 'none'}) are not the model's "
            f"({', '.join(sorted(expected)) or 'none'})",
            loc=(sorted(present ^ expected)[0],),
        )
    with torch.no_grad():
        for name, b in buffers.items():
            value, at = tensors[BUFFER + name], (BUFFER + name,)
            if value.shape != b.shape or value.dtype != b.dtype:
                raise InvalidInput(
                    f"{BUFFER}{name}: the file holds {value.dtype} {list(value.shape)}, the "
                    f"model {b.dtype} {list(b.shape)}",
                    loc=at,
                )
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise InvalidInput(f"{BUFFER}{name} holds values that are not finite", loc=at)
            if name.endswith("running_var") and bool((value < 0).any()):
                raise InvalidInput(f"{BUFFER}{name} holds negative values: a variance", loc=at)
            if not value.dtype.is_floating_point and bool((value < 0).any()):
                raise InvalidInput(f"{BUFFER}{name} is negative: it counts batches", loc=at)
            if not value.dtype.is_floating_point and bool((value >= MAX_COUNT).any()):
                # Each train-mode forward adds one, and int64 wraps to negative past 2**63.
                raise InvalidInput(
                    f"{BUFFER}{name} counts batches, and steps add to it: it must be below "
                    f"{MAX_COUNT}",
                    loc=at,
                )
            b.copy_(value)


def _restore_optimizer(
    model: Model,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """The file's optimizer state into ``optimizer``, checked as its parameters are: a slot
    this optimizer keeps, of its parameter's shape and dtype, finite, and within its kind's
    range; and every slot its next step reads. torch checks none of this, and a lie would
    surface as a 500 at the next step, or as NaN parameters."""
    try:
        extra = json.loads(metadata.get("optimizer_extra", "{}"))
    except (ValueError, RecursionError):
        raise InvalidInput("the file's optimizer metadata is not JSON") from None
    if not isinstance(extra, dict):
        raise InvalidInput("the file's optimizer metadata must be an object")
    groups = optimizer.state_dict()["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters().items()}
    slots = optimizers.slots(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *extra.items()]:
        if not name.startswith(OPT):
            continue
        index_text, _, key = name[len(OPT) :].partition(".")
        if not (index_text.isdigit() and str(int(index_text)) == index_text) or not (
            int(index_text) < len(params) and key in slots.kinds
        ):
            known = ", ".join(sorted(slots.kinds)) or "none"
            raise InvalidInput(
                f"the file's optimizer state names an unknown slot: {name} (this optimizer "
                f"keeps {known} for parameters 0 to {len(params) - 1})",
                loc=(name,),
            )
        index = int(index_text)
        if key in state.get(index, {}):
            raise InvalidInput(f"the file's optimizer state has {name} twice", loc=(name,))
        param = params[index]
        what = f"{name} (the optimizer's {key} of {names.get(id(param), index)})"
        state.setdefault(index, {})[key] = _slot(what, name, slots.kinds[key], value, param)
    for index, param in enumerate(params):
        missing = sorted(slots.needed - set(state.get(index, {})))
        if missing and index in state:  # no state at all: the first step makes it
            raise InvalidInput(
                f"the optimizer state of {names.get(id(param), index)} has no "
                f"{', '.join(missing)}, which this optimizer's steps read (was amsgrad, "
                "momentum or centered turned on after it stepped?)",
                loc=(f"{OPT}{index}.{missing[0]}",),
            )
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise InvalidInput(f"the file's optimizer state does not fit: {str(exc)[:200]}") from None


def _slot(what: str, name: str, kind: str, value: Any, param: torch.Tensor) -> torch.Tensor:
    """One slot's value, checked for its ``kind`` (see ``optimizers.COUNT``)."""
    if kind == optimizers.COUNT:
        count = _count(value)
        if count is None:
            raise InvalidInput(f"{what} must be a float32 scalar: a count of steps", loc=(name,))
        if not (math.isfinite(count) and count >= 0 and count.is_integer()):
            raise InvalidInput(
                f"{what} is {count!r}: a count of steps is a whole number, 0 or more", loc=(name,)
            )
        return value if isinstance(value, torch.Tensor) else torch.tensor(count)
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"{what} must be a tensor", loc=(name,))
    if value.shape != param.shape or value.dtype != param.dtype:
        raise InvalidInput(
            f"{what}: the file holds {value.dtype} {list(value.shape)}, the parameter is "
            f"{param.dtype} {list(param.shape)}",
            loc=(name,),
        )
    if not bool(torch.isfinite(value).all()):
        raise InvalidInput(f"{what} holds values that are not finite", loc=(name,))
    if kind == optimizers.SQUARE and bool((value < 0).any()):
        raise InvalidInput(
            f"{what} holds negative values: it is a sum or average of squares", loc=(name,)
        )
    return value


def _count(value: Any) -> float | None:
    """A count slot's number: a float scalar tensor (torch's own form) or a plain number."""
    if isinstance(value, torch.Tensor):
        ok = value.shape == () and value.dtype in (torch.float32, torch.float64)
        return float(value) if ok else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past a float's range
            return math.inf
    return None


def accumulator(model: Model, data: bytes) -> Accumulator | None:
    """The accumulator in a state file, checked against ``model`` as its parameters are
    (a tensor per trainable parameter, of its shape and dtype, finite; counts that add up),
    or None when it holds none. InvalidInput for one that lies."""
    tensors, metadata = read(data)
    present = {k[len(ACC) :]: t for k, t in tensors.items() if k.startswith(ACC)}
    if ACCUMULATOR not in metadata:
        if present:
            raise InvalidInput(
                f"the file holds accumulator tensors but no {ACCUMULATOR!r} metadata",
                loc=(ACCUMULATOR,),
            )
        return None
    try:
        counts = json.loads(metadata[ACCUMULATOR])
    except (ValueError, RecursionError):
        raise InvalidInput(
            "the file's accumulator metadata is not JSON", loc=(ACCUMULATOR,)
        ) from None
    if not isinstance(counts, dict) or set(counts) != {"count", "loss_sum", "losses"}:
        raise InvalidInput(
            'the file\'s accumulator metadata must be {"count", "loss_sum", "losses"}',
            loc=(ACCUMULATOR,),
        )
    count, loss_sum, losses = counts["count"], counts["loss_sum"], counts["losses"]
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (count, losses))
    if not (whole and 0 <= losses <= count < 2**62):
        raise InvalidInput(
            "the file's accumulator counts must be whole numbers with 0 <= losses <= count",
            loc=(ACCUMULATOR,),
        )
    number = isinstance(loss_sum, int | float) and not isinstance(loss_sum, bool)
    if not (number and math.isfinite(loss_sum)):
        raise InvalidInput(
            "the file's accumulator loss_sum must be a finite number", loc=(ACCUMULATOR,)
        )
    trainable = model.trainable()
    if count == 0:
        if present:
            raise InvalidInput(
                "the file's accumulator is empty but holds tensors", loc=(ACCUMULATOR,)
            )
        return None
    if not set(present) <= set(trainable):  # an absent one: no batch reached it
        raise InvalidInput(
            f"the file's accumulator ({', '.join(sorted(present))}) names more than the "
            f"model's trainable parameters ({', '.join(sorted(trainable))})",
            loc=(ACCUMULATOR,),
        )
    for name, value in present.items():
        p = trainable[name]
        if value.shape != p.shape or value.dtype != p.dtype:
            raise InvalidInput(
                f"{ACC}{name}: the file holds {value.dtype} {list(value.shape)}, the parameter "
                f"is {p.dtype} {list(p.shape)}",
                loc=(ACC + name,),
            )
        if not bool(torch.isfinite(value).all()):
            raise InvalidInput(f"{ACC}{name} holds values that are not finite", loc=(ACC + name,))
    grads = {n: present[n].to(p.device) for n, p in trainable.items() if n in present}
    return Accumulator(grads, count, float(loss_sum), losses)


def with_metadata(data: bytes, extra: dict[str, str]) -> bytes:
    """The same tensors with more metadata (a checkpoint is the state plus its specs)."""
    tensors, metadata = read(data)
    return _save(tensors, {**metadata, **extra})
