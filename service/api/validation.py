"""pydantic's validation errors, told the way a learner can act on them.

Three kinds of noise are taken out of pydantic's list:

- union labels in ``loc``: a discriminated union adds its tag (``model.expression.dtype``),
  a plain union the label of each member it tried (``loss.LossSpec.delta``,
  ``loss.literal['squared',...]``). A part of ``loc`` that names nothing in the body is such
  a label, and is dropped: ``loc`` then points into the body as the client wrote it;
- a plain union's other members: ``"loss": {"type": "huber", "delta": -1}`` fails as a
  name and as an object, and only the object's error says what is wrong. Of the members
  that failed, the one that got furthest into the value is kept;
- tag and literal errors (``Input tag 'SGD' found using 'type' does not match any of the
  expected tags``) become ``unknown optimizer type 'SGD'; one of: sgd, adam, ...``.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable
from typing import Any

from service.engine import specs
from service.errors import short

Error = dict[str, Any]
# Errors that only say the value is of the wrong kind: another member of a union explains more.
KIND_ERRORS = frozenset(
    {
        "model_type",
        "model_attributes_type",
        "dict_type",
        "list_type",
        "int_type",
        "float_type",
        "string_type",
        "bool_type",
        "literal_error",
        "none_required",
        "tuple_type",
    }
)
# What a name stands for, by the field that holds it (the last name in ``loc``).
WHAT = {"model": "model type", "optimizer": "optimizer type", "layers": "layer type"}


def _tags(union: Any) -> tuple[str, ...]:
    """The ``type`` names of a discriminated union's members."""
    members = typing.get_args(typing.get_args(union)[0])
    return tuple(n for m in members for n in typing.get_args(m.model_fields["type"].annotation))


TAGS = {
    "model": _tags(specs.ModelSpec),
    "optimizer": _tags(specs.OptimizerSpec),
    "layers": _tags(specs.Layer),
}


def explain(raw: Iterable[Error], body: Any) -> list[Error]:
    """``raw`` (``RequestValidationError.errors()``) with clean locs, one union member's
    errors each, and messages that name the choices; ``body`` is the parsed request body."""
    errors = [_located(e, body) for e in raw]
    kept = _best_members(errors)
    return [
        {"loc": e["loc"], "msg": _message(e), "type": _type(e)} for e in errors if id(e) in kept
    ]


def _located(error: Error, body: Any) -> Error:
    """The error with union labels out of its ``loc``, and where a plain union was (``_union``:
    its loc and the label of the member that failed), for ``_best_members``."""
    loc = list(error["loc"])
    out = {**error, "_union": None}
    if not loc or loc[0] != "body":
        return out
    clean: list[Any] = ["body"]
    node, tagged = body, False
    for i, part in enumerate(loc[1:], 1):
        last = i == len(loc) - 1
        if isinstance(node, dict) and not tagged and part == node.get("type"):
            tagged = True  # a discriminated union's tag: the member for node["type"]
        elif isinstance(node, dict) and part in node:
            node, tagged = node[part], False
            clean.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node, tagged = node[part], False
            clean.append(part)
        elif last and error["type"] == "missing":
            clean.append(part)
        elif out["_union"] is None:
            out["_union"] = (tuple(clean), str(part))  # a plain union's member label
    out["loc"] = clean
    return out


def _best_members(errors: list[Error]) -> set[int]:
    """The errors to keep: all but those of the less telling members of each plain union."""
    groups: dict[tuple[Any, ...], dict[str, list[Error]]] = {}
    for error in errors:
        if error["_union"] is not None:
            where, label = error["_union"]
            groups.setdefault(where, {}).setdefault(label, []).append(error)
    dropped: set[int] = set()
    for members in groups.values():
        best = max(members.values(), key=_telling)
        dropped.update(id(e) for found in members.values() if found is not best for e in found)
    return {id(e) for e in errors} - dropped


def _telling(found: list[Error]) -> tuple[int, bool]:
    """How far one union member got into the value, and whether it said more than "wrong
    kind" (a literal's error names the choices, so it tells)."""
    deepest = max(len(e["loc"]) for e in found)
    return deepest, not all(e["type"] in KIND_ERRORS - {"literal_error"} for e in found)


def _type(error: Error) -> str:
    """pydantic's type, but a name outside the list is an ``unknown_name`` however pydantic
    found it out (a union's tag or a literal), and a union's missing tag is ``missing``."""
    kind = str(error["type"])
    if kind == "union_tag_invalid" or (kind == "literal_error" and _named(error)):
        return "unknown_name"
    return "missing" if kind == "union_tag_not_found" else kind


def _named(error: Error) -> bool:
    expected = str((error.get("ctx") or {}).get("expected", ""))
    return isinstance(error.get("input"), str) and bool(_quoted(expected))


def _message(error: Error) -> str:
    kind, ctx, loc = error["type"], error.get("ctx") or {}, error["loc"]
    what = _what(loc)
    if kind == "union_tag_invalid":
        return _unknown(what, str(ctx.get("tag", "")), _quoted(str(ctx.get("expected_tags", ""))))
    if kind == "union_tag_not_found":
        tags = TAGS.get(_field(loc) or "", ())
        choices = f": one of {', '.join(tags)}" if tags else ""
        return f'{what} is missing: give "type"{choices}'
    if kind == "literal_error":
        names = _quoted(str(ctx.get("expected", "")))
        value = error.get("input")
        if names and isinstance(value, str):
            return _unknown(what, value, names)
        if names:
            return f"{what} is one of: {', '.join(names)}; not {_kind(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"should be a JSON object, not {_kind(error.get('input'))}"
    if kind == "extra_forbidden" and loc:
        return f"unknown field {short(loc[-1])}: this object has no such field (misspelt?)"
    return str(error["msg"])


def _unknown(what: str, value: str, names: list[str]) -> str:
    text = f"unknown {what} {short(value)}; one of: {', '.join(names)}"
    if value != value.lower():
        text += " (names are lower case)"
    close = difflib.get_close_matches(value.lower(), names, n=1, cutoff=0.7)
    if close and close[0] != value.lower():
        text += f"; did you mean {close[0]!r}?"
    return text


def _field(loc: list[Any]) -> str | None:
    """The last field name in ``loc`` ("layers" for layers.0), "loss" for loss.type."""
    names = [p for p in loc[1:] if isinstance(p, str)]
    if names and names[-1] == "type" and len(names) > 1:
        names.pop()
    return names[-1] if names else None


def _what(loc: list[Any]) -> str:
    field = _field(loc)
    return WHAT.get(field, field) if field else "value"


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
