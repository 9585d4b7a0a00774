"""The HTTP edge of a real process against hostile clients: bodies that stall, more
connections than it serves, and many large bodies at once. Raw sockets, because an HTTP
client library would neither stall on purpose nor keep reading while it is still sending."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.client import HTTPResponse
from typing import Any

import httpx
import pytest

from service.api.parsebudget import SMALL
from tests.conftest import SEED_STEP
from tests.e2e.server import Server, status_kib

pytestmark = pytest.mark.slow

BODY_TIMEOUT, MAX_CONNECTIONS, PARSING = 2, 8, 4 * 65536
MiB = 1024 * 1024
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """Small limits, so that a test reaches them in seconds with a few sockets and
    kilobytes; a body limit above the parse budget, so that a body can be too large for the
    budget alone."""
    args = ["--store", "memory://", "--workers-per-device", "1"]
    args += ["--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)]
    args += ["--max-parsing-bytes", str(PARSING), "--max-body-bytes", str(MiB)]
    with Server(*args) as server:
        yield server


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """The sockets a test opens, closed at its end whatever happened."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _start(
    server: Server,
    length: int,
    sent: bytes = b"",
    path: str = "/v1/step",
    opened: list[socket.socket] | None = None,
) -> socket.socket:
    """A request that declares ``length`` bytes of JSON body and sends ``sent`` of them."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    if opened is not None:
        opened.append(sock)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gradsvc\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def _answer(sock: socket.socket) -> tuple[HTTPResponse, dict[str, Any]]:
    """The response and its JSON body; a problem's media type is checked."""
    response = HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read())
    if response.status >= 400:
        content_type = response.getheader("content-type", "")
        assert content_type.startswith("application/problem+json"), body
    return response, body


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _seed(size: int) -> bytes:
    """The seed step, padded with white space to ``size`` bytes."""
    text = json.dumps(SEED_STEP).encode()
    return text + b" " * (size - len(text))


def test_stalled_bodies_get_408_and_connections_over_the_limit_503(
    strict: Server, opened: list[socket.socket]
) -> None:
    stalled = [_start(strict, 1000, b'{"model": ', opened=opened) for _ in range(MAX_CONNECTIONS)]
    # Each one is in the app (waiting for the rest of its body) once the server has read its
    # head; until then a new request may still be served, so try a few.
    for _ in range(50):
        extra = _start(strict, len(_seed(200)), _seed(200), opened=opened)
        response, problem = _answer(extra)
        if response.status == 503:
            break
    assert response.status == 503 and problem["type"] == "unavailable", problem
    assert f"({MAX_CONNECTIONS}, --max-connections)" in problem["detail"]
    assert int(response.getheader("retry-after", "0")) >= 1
    assert _closed(extra)
    for sock in stalled:  # each is answered by the body timeout, then closed
        response, problem = _answer(sock)
        assert response.status == 408 and problem["type"] == "request-timeout", problem
        assert "--body-timeout" in problem["detail"]
        assert _closed(sock)
    r = httpx.post(strict.url + "/v1/step", json=SEED_STEP, timeout=30)
    assert r.status_code == 200, r.text


def test_the_parse_budget_is_shared(strict: Server, opened: list[socket.socket]) -> None:
    # Declares most of the budget, and stalls: its share is held, though nothing arrived.
    holder = _start(strict, PARSING - 1000, b"{", opened=opened)
    for _ in range(50):  # until the server has read the holder's head
        # (larger than the small bodies that are always admitted)
        r = httpx.post(
            strict.url + "/v1/step", content=_seed(SMALL + 2000), headers=JSON, timeout=30
        )
        if r.status_code == 503:
            break
        assert r.status_code == 200, r.text
    assert r.status_code == 503 and r.json()["type"] == "unavailable", r.text
    assert "--max-parsing-bytes" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
    # Larger than the whole budget, though under --max-body-bytes: it could never fit.
    over = _start(strict, PARSING + 1, b" " * (PARSING + 1), opened=opened)
    response, problem = _answer(over)
    assert response.status == 413 and f"{PARSING} bytes" in problem["detail"], problem
    response, problem = _answer(holder)
    assert response.status == 408, problem
    r = httpx.post(strict.url + "/v1/step", content=_seed(2000), headers=JSON, timeout=30)
    assert r.status_code == 200, r.text  # the budget is whole again


def _post_large(server: Server, body: bytes, answers: list[tuple[int, dict[str, Any]]]) -> None:
    """Send ``body`` while reading the answer, which may come before the body is all sent."""
    sock = _start(server, len(body), path="/v1/forward")

    def upload() -> None:
        try:
            sock.sendall(body)
        except OSError:  # answered and closed before the end: fine
            pass

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        response, problem = _answer(sock)
        answers.append((response.status, problem))
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join()


def test_many_large_bodies_at_once_keep_memory_bounded() -> None:
    """8 bodies of 60 MB, one array of 15 million numbers each, all at once. Parsed, each
    would be a list of 15 million Python floats (over 500 MB): the API process took 2.9 GB
    for three. Now at most the parse budget's worth of bodies is held (256 MiB: four), each
    is refused while still bytes, and the rest are told to come back.

    The ceiling on the API process's peak RSS above its RSS before: the budget, plus one
    body more (the route's bytes copy of a buffer about to be freed), plus 32 MiB for the
    interpreter, sockets and the count's scratch. The server has the default limits: a
    body timeout of its own would be a race with the uploads on a loaded machine."""
    numbers = 15_000_000
    body = b'{"model": {"type": "expression", "expression": "x * 2"}, "batch": {"x": ['
    body += b"1.5," * (numbers - 1) + b"1.5]}}"
    answers: list[tuple[int, dict[str, Any]]] = []
    with Server("--store", "memory://", "--workers-per-device", "1") as server:
        assert server.proc is not None
        before = status_kib(server.proc.pid, "VmRSS") * 1024
        senders = [
            threading.Thread(target=_post_large, args=(server, body, answers)) for _ in range(8)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        peak = status_kib(server.proc.pid, "VmHWM") * 1024 - before
        assert peak < 256 * MiB + len(body) + 32 * MiB, f"peak RSS rose by {peak / MiB:.0f} MiB"
        assert len(answers) == 8
        assert {status for status, _ in answers} <= {413, 422, 503}, answers
        refused = [problem for status, problem in answers if status == 422]
        assert refused, answers  # the first one at least fits in the budget
        for problem in refused:
            assert problem["type"] == "invalid-tensor", problem
            assert problem["errors"][0]["loc"] == ["body", "batch", "x"], problem
        assert httpx.post(server.url + "/v1/step", json=SEED_STEP, timeout=30).status_code == 200
