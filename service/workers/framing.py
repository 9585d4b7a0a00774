"""How messages cross the socket between the pool and a worker, written once for both ends.

A frame is ``multiprocessing.Connection``'s: a 4-byte big-endian length, or -1 and an
8-byte length for payloads of 2 GiB and more, then the payload. The pool writes frames from
the event loop and the worker from its one thread, so neither end can use ``Connection``
itself; both use ``encode`` and a ``Decoder`` fed with whatever bytes have arrived.

The payload is a pickle. That is safe only because of where it travels: a socketpair
between the API process and the workers it spawned itself, which nobody else can reach.
What a client sends is JSON, validated by pydantic into the typed messages of
``service.workers.messages`` before anything is pickled; a client's bytes are never
unpickled.
"""

from __future__ import annotations

import pickle
import struct
from typing import Generic, TypeVar, cast

T = TypeVar("T")
_SMALL = struct.Struct("!i")
_LARGE = struct.Struct("!Q")
_JOINED = 65536
"""Payloads shorter than this are written in one piece with their header; longer ones
separately, rather than copied once more to be joined."""


def encode(message: object) -> list[bytes]:
    """``message`` pickled and framed, as the pieces to write in order.

    Raises whatever pickling raises (an exception that does not pickle, say): the caller
    decides what to send instead."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    size = len(payload)
    head = _SMALL.pack(size) if size <= 0x7FFFFFFF else _SMALL.pack(-1) + _LARGE.pack(size)
    return [head + payload] if size < _JOINED else [head, payload]


class Decoder(Generic[T]):
    """Frames in, messages out: ``feed`` takes any chunk of the byte stream and returns the
    messages it completed, keeping a partial frame for the next chunk.

    Args:
        kinds: what the messages on this stream may be; anything else is a bug, and raises
            ``TypeError`` rather than travel on as the wrong type.
    """

    def __init__(self, *kinds: type) -> None:
        self.kinds = kinds
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[T]:
        buf = self.buffer
        buf += chunk
        messages: list[T] = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = _SMALL.unpack_from(buf, pos)
            start = pos + 4
            if size == -1:
                if end - pos < 12:
                    break
                (size,) = _LARGE.unpack_from(buf, pos + 4)
                start = pos + 12
            if end < start + size:
                break
            # A bytearray slice: one copy of the payload, not two. See the module's doc.
            message = pickle.loads(buf[start : start + size])
            if not isinstance(message, self.kinds):
                names = " or ".join(kind.__name__ for kind in self.kinds)
                raise TypeError(f"expected a {names}, got a {type(message).__name__}")
            messages.append(cast(T, message))
            pos = start + size
        if pos:
            del buf[:pos]  # once per chunk, not once per message
        return messages
