"""The framing both ends of a worker's socket share: what ``encode`` writes, a ``Decoder``
reads back, however the bytes are split on the way, and ``multiprocessing`` reads too."""

from __future__ import annotations

import multiprocessing.connection
import pickle
import socket
import struct

import pytest

from service.workers import framing
from service.workers.messages import Info, Reply


def test_messages_come_back_whole_however_the_stream_is_cut() -> None:
    sent = [Reply(i, True, b"x" * size, Info()) for i, size in enumerate((0, 1, 70_000, 5))]
    stream = b"".join(piece for reply in sent for piece in framing.encode(reply))
    for cut in (1, 3, 4, 11, 4096, len(stream)):
        decoder = framing.Decoder(Reply)
        got: list[Reply] = []
        for start in range(0, len(stream), cut):
            got += decoder.feed(stream[start : start + cut])
        assert got == sent, cut
        assert not decoder.buffer


def test_a_large_payload_is_written_apart_from_its_header() -> None:
    pieces = framing.encode(b"y" * 100_000)
    assert len(pieces) == 2 and struct.unpack("!i", pieces[0]) == (len(pieces[1]),)
    assert len(framing.encode(b"small")) == 1


def test_the_long_header_is_read() -> None:
    # Payloads of 2 GiB and more get -1 and an 8-byte length; the decoder reads that form.
    payload = pickle.dumps(Reply(7, True, "long", Info()))
    frame = struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    decoder = framing.Decoder(Reply)
    assert decoder.feed(frame[:6]) == []
    assert decoder.feed(frame[6:]) == [Reply(7, True, "long", Info())]


def test_the_frames_are_multiprocessings() -> None:
    mine, theirs = socket.socketpair()
    with mine, theirs:
        connection = multiprocessing.connection.Connection(theirs.detach())
        for piece in framing.encode(Reply(1, False, "big" * 30_000, Info())):
            mine.sendall(piece)
        assert connection.recv() == Reply(1, False, "big" * 30_000, Info())
        connection.send(Reply(2, True, None, Info()))
        assert framing.Decoder(Reply).feed(mine.recv(1 << 16)) == [Reply(2, True, None, Info())]
        connection.close()


def test_a_message_of_another_type_is_refused() -> None:
    with pytest.raises(TypeError, match="expected a Reply"):
        framing.Decoder(Reply).feed(framing.encode("not a reply")[0])
