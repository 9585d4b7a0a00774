"""Page cursors: opaque to clients, and checked like any input when they come back.

A cursor is base64url JSON of where the last page ended: ``[created_at, id]`` for the
sessions listing, a step for a session's history. A client can send anything as one, so a
cursor is read back only if it is a value this service could have given out: a finite time
and a well-formed id, a step that fits the stores' 64-bit integers. Anything else is a 422
that says where to get a good one, never a driver's overflow (a 500).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from service.errors import InvalidInput
from service.store.base import Cursor

MAX_LENGTH = 512
MAX_STEP = 2**63 - 1
"""The largest integer SQLite and Redis sorted-set bounds take exactly."""
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def encode(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def sessions_after(cursor: str | None) -> Cursor | None:
    """Where a sessions page starts: after this (created_at, id); None for the first page."""
    if cursor is None:
        return None
    value = _decode(cursor)
    if not (isinstance(value, list) and len(value) == 2):
        raise _bad()
    created, session_id = value
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise _bad()
    try:
        created = float(created)  # an integer past a float's range is an OverflowError
    except OverflowError:
        raise _bad() from None
    if not math.isfinite(created) or not _is_id(session_id):
        raise _bad()
    return created, session_id


def history_after(cursor: str | None) -> int:
    """Where a history page starts: after this step; 0 for the first page."""
    if cursor is None:
        return 0
    value = _decode(cursor)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEP:
        raise _bad()
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 64 and set(value) <= ID_CHARS


def _decode(cursor: str) -> Any:
    try:
        if len(cursor) > MAX_LENGTH:
            raise ValueError("too long")
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _bad() from None


def _bad() -> InvalidInput:
    return InvalidInput(
        "cursor is not one this service gave out: pass the `next` of the previous page "
        "unchanged, or no cursor for the first page",
        loc=("query", "cursor"),
    )
