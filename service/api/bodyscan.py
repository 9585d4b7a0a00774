"""A JSON body's arrays counted before it is decoded: an over-size tensor is refused while it
is still bytes, never built as a list of millions of Python floats (32 bytes each, eight
times the text it came from) only to be refused by the worker.

The count needs no parser. Between two consecutive ``{``, ``}`` or ``:`` of a JSON text
lies at most one member's value and the comma after it, and an array's commas number its
elements less one (nested arrays included, as long as none is empty). So the commas of such
a stretch bound from above the elements of any tensor in it, plus one: a stretch with more
commas than a tensor may have elements holds an over-size tensor, or is not a tensor at all
(strings with commas by the million, empty arrays by the million). Every tensor of a request
is a member's value (``x``, ``y``, ``value``, ``data``, the entries of ``params``), so no
valid request is refused. A body with fewer commas in all than the limit, almost every body,
costs one ``bytes.count``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.errors import TensorError

_CHUNK = 1 << 20
"""Bytes scanned at a time: the scan's own memory stays a few MiB whatever the body."""
_COMMA, _OPEN, _CLOSE, _COLON = b",{}:"
_LOCATE = 1 << 20
"""Bytes of the rest of the body, the over-size array left out, that are parsed to say
where the array is; a larger rest is not parsed (the problem then gives the byte offset)."""
_MARK = "\x00over-size\x00"


def check_arrays(body: bytes, limit: int) -> None:
    """Raise ``TensorError`` (located in the body where it can) if some array of ``body``
    has more than ``limit`` elements, by the count above."""
    if body.count(b",") <= limit:
        return
    commas, start, end = _largest_stretch(body)
    if commas <= limit:
        return
    where = _locate(body, start, end)
    raise TensorError(
        f"tensor has about {commas} elements; the limit is {limit}"
        + ("" if where else f" (the array near byte {start} of the body)"),
        loc=where,
    )


def _largest_stretch(body: bytes) -> tuple[int, int, int]:
    """The most commas between two stops, and where that stretch starts and ends."""
    data = np.frombuffer(body, dtype=np.uint8)
    best = (0, 0, len(body))
    carry, run_start = 0, 0  # the stretch still open at the end of the previous chunk
    for lo in range(0, len(data), _CHUNK):
        part = data[lo : lo + _CHUNK]
        stops = np.flatnonzero((part == _OPEN) | (part == _CLOSE) | (part == _COLON))
        if stops.size == 0:  # the inside of one large array
            carry += int(np.count_nonzero(part == _COMMA))
            continue
        # Stretch i ends at stop i; the first one began before this chunk.
        commas = np.flatnonzero(part == _COMMA)
        per_stretch = np.bincount(np.searchsorted(stops, commas), minlength=stops.size + 1)
        per_stretch[0] += carry
        i = int(per_stretch[:-1].argmax())
        if per_stretch[i] > best[0]:
            start = run_start if i == 0 else lo + int(stops[i - 1]) + 1
            best = (int(per_stretch[i]), start, lo + int(stops[i]))
        carry, run_start = int(per_stretch[-1]), lo + int(stops[-1]) + 1
    if carry > best[0]:
        best = (carry, run_start, len(body))
    return best


def _locate(body: bytes, start: int, end: int) -> tuple[str | int, ...]:
    """Where the array that starts the stretch ``body[start:end]`` sits in the body, as a
    path of keys and indices; () when the rest of the body is too large to parse cheaply or
    does not parse (it is then not JSON, which the route's own parse will say)."""
    first = body.find(b"[", start, end)
    last = body.rfind(b"]", start, end)
    if first < 0 or last < first or body[start:first].strip():
        return ()
    if len(body) - (last + 1 - first) > _LOCATE:
        return ()
    try:
        skeleton = orjson.loads(body[:first] + orjson.dumps(_MARK) + body[last + 1 :])
    except orjson.JSONDecodeError:
        return ()
    return _path_to(skeleton)


def _path_to(root: Any) -> tuple[str | int, ...]:
    """The path to the mark in ``root``, depth first (iterative: orjson nests deeper than
    Python recurses). The {"shape", "data"} form is the tensor, not its "data"."""
    stack: list[tuple[Any, tuple[str | int, ...], Any]] = [(root, (), None)]
    while stack:
        node, path, parent = stack.pop()
        if node == _MARK:
            if path and path[-1] == "data" and isinstance(parent, dict) and "shape" in parent:
                return path[:-1]
            return path
        if isinstance(node, dict):
            stack.extend((child, (*path, key), node) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((child, (*path, i), node) for i, child in enumerate(node))
    return ()
