"""gradsvc_client against a real server process, sync and async, and its retries proven safe.

Most tests run one scenario twice, through ``Client`` and through ``AsyncClient``: a scenario
is a coroutine that awaits whatever the client returns when it is awaitable (``aw``) and
collects iterators of either kind (``collect``), so the sync client's calls just block.
Retries are proven through ``Proxy``, a small HTTP proxy that can lose an answer after the
server has committed it, or answer 429/503 itself. Training jobs have no server routes yet:
their methods are tested against ``httpx.MockTransport`` with canned answers and streams.
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any, Literal

import gradsvc_client
import httpx
import numpy as np
import pytest
import torch
from gradsvc_client import (
    ApiError,
    AsyncClient,
    AuthenticationError,
    BatchItem,
    Client,
    ConflictError,
    Gradients,
    Health,
    HistoryItem,
    InvalidInputError,
    Job,
    JobEvent,
    NetworkError,
    NotFoundError,
    PreconditionFailedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
    Session,
    StepManyItem,
    StepResult,
    TraceNode,
    UnavailableError,
    Worker,
)
from gradsvc_client.errors import retry_after as _retry_after
from gradsvc_client.tensors import _Encoder, _to_numpy, _to_torch

from service.engine import tensors as wire
from tests.e2e.server import ROOT, Server, free_port

NOTEBOOK: dict[str, Any] = {
    "type": "expression",
    "expression": "w * x + 1",
    "params": {"w": {"value": [1.0]}},
    "dtype": "float64",
}
SGD = {"type": "sgd", "lr": 0.1}
MODES = ["sync", "async"]
Scenario = Callable[[Any], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# Running one scenario through either client


async def aw(value: Any) -> Any:
    """The sync client's answer as is, the async client's awaited."""
    return await value if inspect.isawaitable(value) else value


async def collect(items: Any) -> list[Any]:
    if hasattr(items, "__aiter__"):
        return [item async for item in items]
    return list(items)


def run(mode: str, url: str, scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        if mode == "sync":
            with Client(url, **options) as gs:
                await scenario(gs)
        else:
            async with AsyncClient(url, **options) as ags:
                await scenario(ags)

    asyncio.run(main())


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def value_of(tensor: Any) -> list[Any]:
    """A tensor's numbers, from torch or numpy alike."""
    out: list[Any] = np.asarray(tensor).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# The notebook, every endpoint, both tensor kinds


@pytest.mark.slow
@pytest.mark.parametrize("tensors", ["torch", "numpy"])
def test_the_notebooks_two_steps(server: Server, mode: str, tensors: str) -> None:
    kind = torch.Tensor if tensors == "torch" else np.ndarray

    async def scenario(gs: Any) -> None:
        first = await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))
        assert isinstance(first, StepResult) and first.step is None and first.etag is None
        assert isinstance(first.params["w"], kind) and isinstance(first.outputs, kind)
        assert (first.loss, value_of(first.grads["w"]), value_of(first.params["w"])) == (
            0.5,
            [-1.0],
            [1.1],
        )
        second_model = {**NOTEBOOK, "params": {"w": {"value": first.params["w"]}}}
        second = await aw(gs.step(second_model, "squared", SGD, 2, 5))
        assert value_of(second.params["w"]) == [1.46] and second.loss == 1.6199999999999997

        s = await aw(gs.create_session(NOTEBOOK, "squared", SGD, name="notebook"))
        one = await aw(gs.session_step(s, x=1, y=3))
        two = await aw(gs.session_step(s, x=2, y=5))
        assert (one.step, one.loss, value_of(one.params["w"])) == (1, 0.5, [1.1])
        assert (two.step, two.loss, value_of(two.params["w"])) == (2, 1.6199999999999997, [1.46])
        assert value_of(two.grads["w"]) == [-3.5999999999999996]
        assert value_of(two.outputs) == 3.2 and two.grad_norm == 3.5999999999999996
        assert two.outputs.shape == ()  # x was one sample, a 0-d tensor
        assert two.etag == f'"{s.id}:3"' and not two.replayed
        assert isinstance(two.params["w"], kind)
        if tensors == "torch":
            assert two.params["w"].dtype == torch.float64
        history = await collect(gs.history(s, page_size=1))  # two pages
        assert all(isinstance(h, HistoryItem) for h in history)
        assert [(h.step, h.loss) for h in history] == [(1, 0.5), (2, 1.6199999999999997)]

    run(mode, server.url, scenario, tensors=tensors)


@pytest.mark.slow
def test_stateless_forward_gradients_and_the_trace(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        outputs = await aw(gs.forward(NOTEBOOK, [1, 2, 3]))
        assert isinstance(outputs, torch.Tensor) and outputs.tolist() == [2.0, 3.0, 4.0]
        grads = await aw(gs.gradients(NOTEBOOK, "squared", np.array(1.0), torch.tensor(3.0)))
        assert isinstance(grads, Gradients) and not isinstance(grads, StepResult)
        assert grads.loss == 0.5 and grads.grads["w"].tolist() == [-1.0] and grads.trace is None
        explained = await aw(gs.step(NOTEBOOK, {"type": "squared"}, SGD, 1, 3, explain=True))
        assert explained.trace is not None
        nodes = {n.node: n for n in explained.trace}
        assert all(isinstance(n, TraceNode) for n in explained.trace)
        assert nodes["w * x + 1"].value.tolist() == 2.0  # ŷ = 2
        assert nodes["w * x + 1"].grad.tolist() == -1.0  # dL/dŷ = ŷ − y
        assert nodes["w * x"].local is not None and nodes["w * x"].local["w"].tolist() == [1.0]
        assert nodes["w"].grad.tolist() == [-1.0]  # dL/dw = −1 · 1
        assert explained.trace[-1].node == "loss" and explained.trace[-1].inputs[-1] == "y"
        # Several inputs by name
        two = {"type": "expression", "expression": "a * u + v", "params": {"a": {"value": 2.0}}}
        assert (await aw(gs.forward(two, {"u": [1.0, 2.0], "v": 1}))).tolist() == [3.0, 5.0]

    run(mode, server.url, scenario)


@pytest.mark.slow
def test_every_session_endpoint(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        s = await aw(gs.create_session(NOTEBOOK, "squared", SGD, name=f"all-{mode}"))
        assert isinstance(s, Session)
        assert (s.name, s.step, s.version, s.etag) == (f"all-{mode}", 0, 1, f'"{s.id}:1"')
        assert s.device == "cpu" and s.loss == "squared" and s.optimizer["lr"] == 0.1
        assert s.model["expression"] == "w * x + 1" and s.created_at.tzinfo is not None
        assert s.params["w"].tolist() == [1.0]

        grads = await aw(gs.session_gradients(s, 1, 3))
        assert grads.grads["w"].tolist() == [-1.0]
        assert (await aw(gs.session_forward(s.id, [1, 2]))).tolist() == [2.0, 3.0]
        assert (await aw(gs.get_session(s))).version == 1  # neither changed anything

        stepped = await aw(gs.session_step(s, 1, 3, if_match=s))
        assert stepped.step == 1 and stepped.etag == f'"{s.id}:2"'
        with pytest.raises(PreconditionFailedError) as stale:
            await aw(gs.session_step(s, 2, 5, if_match=s))
        assert stale.value.status == 412 and stale.value.problem["type"] == "precondition-failed"
        with pytest.raises(PreconditionFailedError):
            await aw(gs.patch_session(s, name="late", if_match=s.etag))

        patched = await aw(
            gs.patch_session(
                s,
                name="renamed",
                optimizer={"lr": 0.5},
                params={"w": torch.tensor([2.0], dtype=torch.float64)},
                if_match=stepped.etag,
            )
        )
        assert (patched.name, patched.optimizer["lr"], patched.step) == ("renamed", 0.5, 1)
        assert patched.params["w"].tolist() == [2.0] and patched.version == 3

        data = await aw(gs.checkpoint(s))
        assert isinstance(data, bytes) and b"gradsvc" in data[:4096]
        restored = await aw(gs.restore(data))
        assert restored.id != s.id and restored.step == 1
        assert restored.params["w"].tolist() == [2.0] and restored.optimizer["lr"] == 0.5

        listed = await collect(gs.sessions(page_size=2))
        ids = [x.id for x in listed]
        assert {s.id, restored.id} <= set(ids) and len(ids) == len(set(ids))

        await aw(gs.delete_session(restored))
        with pytest.raises(NotFoundError):
            await aw(gs.get_session(restored.id))
        with pytest.raises(NotFoundError):
            await aw(gs.delete_session(restored.id))

    run(mode, server.url, scenario)


@pytest.mark.slow
def test_step_many(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        a = await aw(gs.create_session(NOTEBOOK, "squared", SGD))
        b = await aw(gs.create_session(NOTEBOOK, "squared", SGD))
        key = f"{a.id}-first"
        items = [BatchItem(a, 1, 3, idempotency_key=key), (b.id, 2, 5), ("s_nope", 1, 3)]
        got = await aw(gs.step_many(items, include=["loss", "params"]))
        assert all(isinstance(g, StepManyItem) for g in got)
        assert [g.session for g in got] == [a.id, b.id, "s_nope"]
        assert got[0].ok and (got[0].step, got[0].loss, got[0].grad_norm) == (1, 0.5, 1.0)
        assert got[0].params is not None and got[0].params["w"].tolist() == [1.1]
        assert got[0].grads is None and got[0].outputs is None
        assert got[1].loss == 2.0 and got[1].raise_for_error() is got[1]  # ŷ = 3, ½(3 − 5)²
        assert not got[2].ok and got[2].status == 404
        assert isinstance(got[2].error, NotFoundError)
        with pytest.raises(NotFoundError):
            got[2].raise_for_error()
        retry = [BatchItem(a, 1, 3, idempotency_key=key)]
        again = await aw(gs.step_many(retry, include=["loss", "params"]))
        assert again[0].replayed and again[0].step == 1
        # The key names what shaped the answer too: another include is another request.
        other = await aw(gs.step_many(retry))
        assert other[0].status == 422 and not other[0].ok
        assert (await aw(gs.get_session(a))).step == 1

    run(mode, server.url, scenario)


@pytest.mark.slow
def test_a_training_job_end_to_end(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        s = await aw(gs.create_session(NOTEBOOK, "squared", {"type": "sgd", "lr": 0.01}))
        xs, ys = [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0]
        job = await aw(gs.train(s, xs, ys, epochs=2500, batch_size=1))
        assert job.status in ("queued", "running") and job.session == s.id
        seen = []
        async for event in _aiter(gs.events(job.id)):
            seen.append(event)
            if len(seen) == 3:
                cancelled = await aw(gs.cancel(job.id))
                assert cancelled is not None and cancelled.status == "cancelled"
        assert seen[-1].event == "end" and seen[-1].job is not None
        final = seen[-1].job
        assert final.status == "cancelled" and 0 < final.raw["steps_done"] < 10_000
        assert (await aw(gs.get_session(s))).step == final.raw["steps_done"]
        short = await aw(gs.train(s, xs, ys, epochs=2, batch_size=2, shuffle=False))
        events = [e async for e in _aiter(gs.events(short.id))]
        assert events[-1].job is not None and events[-1].job.status == "succeeded"
        assert (await aw(gs.job(short.id))).raw["steps_done"] == 4

    run(mode, server.url, scenario)


async def _aiter(items: Any) -> Any:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


@pytest.mark.slow
def test_workers_health_and_ready(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        workers = await aw(gs.workers())
        assert workers and all(isinstance(w, Worker) for w in workers)
        assert {w.state for w in workers} == {"up"} and workers[0].device == "cpu"
        assert await aw(gs.health()) == Health(True, "ok")
        assert await aw(gs.ready()) == Health(True, "ready")

    run(mode, server.url, scenario)


# ---------------------------------------------------------------------------------------------
# Tensors on the wire


class Recorder(httpx.HTTPTransport):
    """Every request body and answer body that went through."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[bytes, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.exchanges.append((request.content, response.read()))
        return response


class AsyncRecorder(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[bytes, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.exchanges.append((request.content, await response.aread()))
        return response


@pytest.mark.slow
@pytest.mark.parametrize("tensors", ["torch", "numpy"])
def test_large_tensors_travel_as_b64_both_ways(server: Server, mode: str, tensors: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4, dtype=torch.float64, generator=generator)
    y = torch.randn(2048, 1, dtype=torch.float64, generator=generator)
    weight = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
    model = {
        "type": "linear",
        "in_features": 4,
        "out_features": 1,
        "dtype": "float64",
        "params": {"weight": {"value": weight}, "bias": {"value": np.array([0.5])}},
    }
    recorder = Recorder() if mode == "sync" else AsyncRecorder()
    inputs = (x, y) if tensors == "torch" else (x.numpy(), y.numpy())

    async def scenario(gs: Any) -> None:
        got = await aw(gs.gradients(model, "mse", *inputs))
        expected_w = weight.clone().requires_grad_()
        bias = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
        outputs = x @ expected_w.T + bias
        torch.nn.functional.mse_loss(outputs, y).backward()
        assert got.outputs.shape == (2048, 1)
        actual = torch.as_tensor(got.outputs)
        torch.testing.assert_close(actual, outputs.detach(), rtol=1e-12, atol=1e-12)
        assert expected_w.grad is not None
        torch.testing.assert_close(torch.as_tensor(got.grads["weight"]), expected_w.grad)
        assert isinstance(got.outputs, torch.Tensor if tensors == "torch" else np.ndarray)

    run(mode, server.url, scenario, tensors=tensors, transport=recorder)
    request, answer = recorder.exchanges[-1]
    sent, received = json.loads(request), json.loads(answer)
    assert set(sent["batch"]["x"]) == {"dtype", "shape", "b64"}
    assert sent["batch"]["x"]["dtype"] == "float64" and sent["batch"]["x"]["shape"] == [2048, 4]
    assert sent["model"]["params"]["weight"]["value"] == [[0.5, -1.0, 2.0, 0.25]]  # small: a list
    assert sent["encoding"] == "b64"
    assert set(received["outputs"]) == {"dtype", "shape", "b64"}


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
)
def test_wire_forms_agree_with_the_services_own(dtype: torch.dtype) -> None:
    """Client encoding → the service's decoder, and the service's encoder → client decoding."""
    generator = torch.Generator().manual_seed(1)
    if dtype == torch.int64:
        tensor = torch.randint(-(2**40), 2**40, (30, 70), generator=generator)
    else:
        tensor = torch.randn(30, 70, generator=generator).to(dtype)
    big = _Encoder(threshold=1024).tensor(tensor)
    assert set(big) == {"dtype", "shape", "b64"} and big["shape"] == [30, 70]
    assert torch.equal(wire.decode(big, dtype), tensor)
    small = _Encoder(threshold=1024).tensor(tensor[:2, :3])
    assert isinstance(small, list) and torch.equal(wire.decode(small, dtype), tensor[:2, :3])

    answer = wire.encode(tensor, b64=True)
    back = _to_torch(answer)
    assert back.dtype == dtype and torch.equal(back, tensor)
    as_numpy = _to_numpy(answer)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.flags.writeable
    assert np.array_equal(as_numpy, tensor.float().numpy() if dtype == torch.bfloat16 else tensor)
    assert torch.equal(_to_torch(wire.encode(tensor[0, :5])), tensor[0, :5].to(_listed(dtype)))


def _listed(dtype: torch.dtype) -> torch.dtype:
    """What a nested list reads back as: JSON has no dtype."""
    return torch.int64 if dtype == torch.int64 else torch.float64


def test_numpy_inputs_of_other_dtypes_and_lists() -> None:
    encoder = _Encoder(threshold=4)
    assert encoder.tensor(np.arange(6, dtype=np.int32))["dtype"] == "int64"
    assert encoder.tensor(np.ones(6, dtype=np.float32))["dtype"] == "float32"
    assert encoder.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])["shape"] == [2, 3]
    assert encoder.tensor([1, 2]) == [1, 2] and encoder.tensor(np.float32(2.5)) == 2.5
    assert encoder.tensor([[1], [2, 3]]) == [[1], [2, 3]]  # ragged: the service says so
    assert encoder.elements == 6 + 6 + 6 + 2 + 1
    form = {"dtype": "float64", "shape": [2], "data": [1, 2]}
    assert encoder.tensor(form) == form and encoder.batch(form) == {"x": form}
    assert encoder.batch({"u": [1.0], "v": 2}, 3) == {"x": {"u": [1.0], "v": 2}, "y": 3}
    with pytest.raises(TypeError):
        encoder.tensor(np.array(["a"]))


def test_nan_is_refused_before_sending() -> None:
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("sent")

    with Client(transport=httpx.MockTransport(never)) as gs, pytest.raises(ValueError, match="NaN"):
        gs.step(NOTEBOOK, "squared", SGD, float("nan"), 3)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.slow
def test_errors_carry_the_problem_and_are_not_retried(server: Server, mode: str) -> None:
    with Proxy(server.port) as proxy:

        async def scenario(gs: Any) -> None:
            with pytest.raises(NotFoundError) as missing:
                await aw(gs.get_session("s_nope"))
            error = missing.value
            assert isinstance(error, ApiError) and not isinstance(error, ServerError)
            assert (error.status, error.type, error.title) == (404, "not-found", "Not found")
            assert error.detail == "no session s_nope" and error.problem["status"] == 404
            assert str(error) == "404 not-found: no session s_nope"

            bad_sgd = {"type": "sgd", "lr": -1}
            with pytest.raises(InvalidInputError) as invalid:
                await aw(gs.step(NOTEBOOK, "squared", bad_sgd, 1, 3))
            assert invalid.value.status == 422 and invalid.value.type == "validation-error"
            assert any("lr" in e["loc"] for e in invalid.value.errors)
            assert invalid.value.problem["errors"] == invalid.value.errors

            with pytest.raises(InvalidInputError) as expression:
                await aw(gs.forward({**NOTEBOOK, "expression": "w * x +"}, 1))
            assert expression.value.type == "invalid-expression"

        run(mode, proxy.url, scenario, backoff=0.01)
        assert len(proxy.requests("GET", "/s_nope")) == 1
        assert len(proxy.requests("POST", "/v1/step")) == 1
        assert len(proxy.requests("POST", "/v1/forward")) == 1


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    with Server("--store", "memory://", "--api-keys", "k1,k2") as s:
        yield s


@pytest.mark.slow
def test_api_keys(keyed: Server, mode: str) -> None:
    made: list[Session[Any]] = []

    async def owner(gs: Any) -> None:
        made.append(await aw(gs.create_session(NOTEBOOK, "squared", SGD)))
        assert (await aw(gs.session_step(made[0], 1, 3))).step == 1

    async def stranger(gs: Any) -> None:
        with pytest.raises(NotFoundError):  # another key's session does not exist
            await aw(gs.get_session(made[0].id))
        assert [s.id for s in await collect(gs.sessions())] == []

    async def nobody(gs: Any) -> None:
        assert (await aw(gs.health())).ok and (await aw(gs.ready())).ok  # open paths
        with pytest.raises(AuthenticationError) as denied:
            await aw(gs.get_session(made[0].id))
        assert denied.value.status == 401 and denied.value.type == "unauthorized"
        assert "bearer" in denied.value.headers["www-authenticate"].lower()

    run(mode, keyed.url, owner, api_key="k1")
    run(mode, keyed.url, stranger, api_key="k2")
    run(mode, keyed.url, nobody)
    run(mode, keyed.url, nobody, api_key="wrong")


# ---------------------------------------------------------------------------------------------
# Retries, proven safe through a proxy that loses answers


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


Action = Literal["forward", "drop"] | bytes
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def forward_all(seen: Seen) -> Action:
    return "forward"


def once(match: Callable[[Seen], bool], action: Action) -> Callable[[Seen], Action]:
    """``action`` for the first request that matches, then forward everything."""
    fired = threading.Event()

    def rule(seen: Seen) -> Action:
        if not fired.is_set() and match(seen):
            fired.set()
            return action
        return "forward"

    return rule


def problem(status: int, type_: str, retry_after: str | None = None) -> bytes:
    body = json.dumps(
        {"type": type_, "title": type_, "status": status, "detail": f"the proxy says {status}"}
    ).encode()
    head = [
        f"HTTP/1.1 {status} {http.client.responses.get(status, 'Error')}",
        "content-type: application/problem+json",
        f"content-length: {len(body)}",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Proxy:
    """HTTP/1.1 between a client and the server. Its ``rule`` says, for each request:
    ``"forward"``; ``"drop"``: the request reaches the server, the server's whole answer is
    read, and the client's connection is then closed without a byte of it (the answer is lost
    in transit after the server committed); or raw bytes to answer without the server."""

    def __init__(self, upstream_port: int, rule: Callable[[Seen], Action] = forward_all) -> None:
        self.upstream_port, self.rule = upstream_port, rule
        self.seen: list[Seen] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with self.request.makefile("rb") as reader:
                    while proxy._exchange(reader, self.request):
                        pass

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def requests(self, method: str, suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.endswith(suffix)]

    def _exchange(self, reader: BufferedReader, sock: socket.socket) -> bool:
        """One request on a client's connection; False when that connection is done."""
        line = reader.readline()
        if not line:
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while (raw := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        seen = Seen(method, target, lower, reader.read(int(lower.get("content-length", "0"))))
        self.seen.append(seen)
        action = self.rule(seen)
        if isinstance(action, bytes):
            sock.sendall(action)
            return True
        answer = self._forward(seen, headers)
        if action == "drop":
            return False
        sock.sendall(answer)
        return True

    def _forward(self, seen: Seen, headers: list[tuple[str, str]]) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers if k.lower() not in HOP_BY_HOP}
            conn.request(seen.method, seen.path, body=seen.body or None, headers=sent)
            response = conn.getresponse()
            content = response.read()
            head = [f"HTTP/1.1 {response.status} {response.reason}"]
            head += [f"{k}: {v}" for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            head.append(f"content-length: {len(content)}")
            return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + content
        finally:
            conn.close()

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def is_step(seen: Seen) -> bool:
    return seen.method == "POST" and seen.path.endswith("/step")


@pytest.mark.slow
def test_a_lost_answer_is_retried_and_applied_once(server: Server, mode: str) -> None:
    """The first step reaches the server and commits, its answer is lost on the way back: the
    retry carries the same Idempotency-Key, gets the stored answer, and the session is at 1."""
    with Proxy(server.port, once(is_step, "drop")) as proxy:

        async def scenario(gs: Any) -> None:
            s = await aw(gs.create_session(NOTEBOOK, "squared", SGD))
            result = await aw(gs.session_step(s, 1, 3, if_match=s))  # replayed, not a 412
            assert result.replayed and result.step == 1
            assert result.params["w"].tolist() == [1.1] and result.loss == 0.5
            assert (await aw(gs.get_session(s))).step == 1
            assert [h.step for h in await collect(gs.history(s))] == [1]
            again = await aw(gs.session_step(s, 2, 5))  # the next one, fresh: step 2
            assert again.step == 2 and not again.replayed

        run(mode, proxy.url, scenario, backoff=0.01)
    first, retry, _ = proxy.requests("POST", "/step")
    assert first.headers["idempotency-key"] == retry.headers["idempotency-key"]
    assert first.body == retry.body
    keys = [s.headers.get("idempotency-key") for s in proxy.seen if s.method == "POST"]
    assert all(keys) and len(set(keys)) == len(keys) - 1  # one key per call, kept on its retry
    assert not any("idempotency-key" in s.headers for s in proxy.seen if s.method == "GET")


@pytest.mark.slow
@pytest.mark.parametrize(("status", "error"), [(503, "unavailable"), (429, "too-many-requests")])
def test_429_and_503_wait_for_retry_after(
    server: Server, mode: str, status: int, error: str
) -> None:
    with Proxy(server.port, once(is_step, problem(status, error, "1"))) as proxy:
        took: list[float] = []

        async def scenario(gs: Any) -> None:
            started = time.monotonic()
            result = await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))
            took.append(time.monotonic() - started)
            assert result.params["w"].tolist() == [1.1] and not result.replayed

        run(mode, proxy.url, scenario, backoff=0.01)
    assert took[0] >= 1.0  # Retry-After: 1, not the 10 ms backoff
    first, retry = proxy.requests("POST", "/step")
    assert first.headers["idempotency-key"] == retry.headers["idempotency-key"]


@pytest.mark.slow
def test_retries_are_bounded(server: Server, mode: str) -> None:
    always_503 = problem(503, "unavailable", "0")
    with Proxy(server.port, lambda seen: always_503 if is_step(seen) else "forward") as proxy:

        async def scenario(gs: Any) -> None:
            with pytest.raises(UnavailableError) as unavailable:
                await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))
            assert unavailable.value.retry_after == 0.0

        run(mode, proxy.url, scenario, retries=2, backoff=0.01)
    tries = proxy.requests("POST", "/step")
    assert len(tries) == 3 and len({t.headers["idempotency-key"] for t in tries}) == 1


@pytest.mark.slow
def test_a_retry_after_beyond_max_wait_is_raised_at_once(server: Server, mode: str) -> None:
    with Proxy(server.port, once(is_step, problem(429, "too-many-requests", "120"))) as proxy:

        async def scenario(gs: Any) -> None:
            with pytest.raises(RateLimitedError) as limited:
                await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))
            assert limited.value.retry_after == 120.0

        run(mode, proxy.url, scenario, max_wait=5)
    assert len(proxy.requests("POST", "/step")) == 1


@pytest.mark.slow
def test_a_quota_is_raised_at_once(server: Server, mode: str) -> None:
    with Proxy(server.port, once(is_step, problem(429, "quota-exceeded"))) as proxy:

        async def scenario(gs: Any) -> None:
            with pytest.raises(QuotaExceededError) as refused:
                await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))
            assert refused.value.type == "quota-exceeded" and refused.value.retry_after is None

        run(mode, proxy.url, scenario, backoff=0.01)
    assert len(proxy.requests("POST", "/step")) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("status", "error"), [(409, ConflictError), (400, InvalidInputError)])
def test_other_4xx_are_not_retried(
    server: Server, mode: str, status: int, error: type[ApiError]
) -> None:
    with Proxy(server.port, once(is_step, problem(status, "canned"))) as proxy:

        async def scenario(gs: Any) -> None:
            with pytest.raises(error):
                await aw(gs.step(NOTEBOOK, "squared", SGD, 1, 3))

        run(mode, proxy.url, scenario, backoff=0.01)
    assert len(proxy.requests("POST", "/step")) == 1


@pytest.mark.slow
def test_lost_answers_to_get_delete_and_patch(server: Server, mode: str) -> None:
    """A GET is sent again; a DELETE too, and its retry's 404 means the first went through;
    a PATCH, which no key protects, is not sent again once it may have reached the server."""

    def lose(method: str) -> Callable[[Seen], bool]:
        return lambda seen: seen.method == method and "/v1/sessions/s_" in seen.path

    rules = [once(lose(method), "drop") for method in ("GET", "DELETE", "PATCH")]

    def rule(seen: Seen) -> Action:
        actions = [r(seen) for r in rules]
        return "drop" if "drop" in actions else "forward"

    with Proxy(server.port, rule) as proxy:

        async def scenario(gs: Any) -> None:
            s = await aw(gs.create_session(NOTEBOOK, "squared", SGD))
            assert (await aw(gs.get_session(s))).id == s.id
            with pytest.raises(NetworkError) as lost:
                await aw(gs.patch_session(s, name="x"))
            assert isinstance(lost.value.__cause__, httpx.RemoteProtocolError)
            assert (await aw(gs.get_session(s))).name == "x"  # it did go through
            await aw(gs.delete_session(s))
            with pytest.raises(NotFoundError):
                await aw(gs.get_session(s))

        run(mode, proxy.url, scenario, backoff=0.01)
    assert len(proxy.requests("PATCH", "")) == 1
    assert len(proxy.requests("DELETE", "")) == 2
    assert len([s for s in proxy.requests("GET", "") if "/v1/sessions/s_" in s.path]) == 4


def test_connection_refused_is_retried_then_raised(mode: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def scenario(gs: Any) -> None:
        started = time.monotonic()
        with pytest.raises(NetworkError, match="3 tries") as refused:
            await aw(gs.session_step("s_any", 1, 3))
        assert isinstance(refused.value.__cause__, httpx.ConnectError)
        assert time.monotonic() - started < 5

    run(mode, url, scenario, retries=2, backoff=0.01)


def test_retry_after_forms() -> None:
    assert _retry_after("3") == 3.0 and _retry_after(None) is None
    assert _retry_after("soon") is None and _retry_after("-1") == 0.0
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    got = _retry_after(later)
    assert got is not None and 25 < got <= 30


# ---------------------------------------------------------------------------------------------
# Training jobs: the requests they make and the answers they read (no server routes yet)


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body in chunks, then optionally a dropped connection."""

    def __init__(self, data: bytes, size: int = 7, fail: bool = False) -> None:
        self.chunks = [data[i : i + size] for i in range(0, len(data), size)]
        self.fail = fail

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail:
            raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.fail:
            raise httpx.ReadError("connection reset")


def run_mock(
    mode: str, handler: Callable[[httpx.Request], httpx.Response], scenario: Scenario
) -> None:
    transport = httpx.MockTransport(handler)
    run(mode, "http://gradsvc.test", scenario, transport=transport, backoff=0.001)


def test_train_job_and_cancel(mode: str) -> None:
    sent: list[httpx.Request] = []
    x = np.linspace(0, 1, 3000).reshape(1500, 2)
    job = {"id": "j_1", "session": "s_1", "status": "queued", "progress": 0.0}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        path = request.url.path
        if (request.method, path) == ("POST", "/v1/sessions/s_1/train"):
            return httpx.Response(202, headers={"location": "/v1/jobs/j_1"}, json=job)
        if (request.method, path) == ("POST", "/v1/sessions/s_2/train"):
            return httpx.Response(202, headers={"location": "/v1/jobs/j_2"})
        if (request.method, path) == ("GET", "/v1/jobs/j_1"):
            running = {"status": "running", "progress": 0.25, "epoch": 1, "step": 10, "loss": 0.5}
            return httpx.Response(200, json={**job, **running})
        if (request.method, path) == ("DELETE", "/v1/jobs/j_1"):
            return httpx.Response(200, json={**job, "status": "cancelled", "step": 12})
        if (request.method, path) == ("DELETE", "/v1/jobs/j_2"):
            return httpx.Response(204)
        return httpx.Response(404, json={"type": "not-found", "title": "Not found", "status": 404})

    async def scenario(gs: Any) -> None:
        started = await aw(gs.train("s_1", x, x[:, :1], 3, 32, shuffle=False, seed=7))
        assert isinstance(started, Job) and (started.id, started.status) == ("j_1", "queued")
        assert started.session == "s_1" and not started.done
        bare = await aw(gs.train("s_2", [[1.0]], [1.0], epochs=1, batch_size=1))
        assert (bare.id, bare.status) == ("j_2", "queued")
        running = await aw(gs.job(started))
        assert (running.progress, running.epoch, running.step, running.loss) == (0.25, 1, 10, 0.5)
        cancelled = await aw(gs.cancel("j_1"))
        assert cancelled is not None and cancelled.done and cancelled.status == "cancelled"
        assert await aw(gs.cancel("j_2")) is None
        with pytest.raises(NotFoundError):
            await aw(gs.job("j_9"))

    run_mock(mode, handler, scenario)
    body = json.loads(sent[0].content)
    assert body["dataset"]["x"]["shape"] == [1500, 2] and "b64" in body["dataset"]["x"]
    assert body["dataset"]["y"]["shape"] == [1500, 1]
    assert (body["epochs"], body["batch_size"], body["shuffle"], body["seed"]) == (3, 32, False, 7)
    assert "shuffle" not in json.loads(sent[1].content)  # the service's default
    assert sent[0].headers["idempotency-key"] != sent[1].headers["idempotency-key"]


STREAM = (
    b": ping\r\n\r\n"
    b"retry: 100\r\n"
    b"event: progress\r\nid: 1\r\n"
    b'data: {"status": "running", "progress": 0.5, "epoch": 0, "step": 2, "loss": 0.25}\r\n\r\n'
    b"data: line one\ndata:line two\n\n"
    b'event: progress\nid: 2\ndata: {"status": "running", "progress": 0.75}\n\n'
    b'event: done\nid: 3\ndata: {"id": "j_1", "status": "succeeded", "progress": 1.0}\n\n'
    b'event: never\ndata: {"after": "the end"}\n\n'
)


def test_events_parse_a_stream(mode: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j_1/events"
        assert request.headers["accept"] == "text/event-stream"
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Chunks(STREAM)
        )

    async def scenario(gs: Any) -> None:
        events = await collect(gs.events("j_1"))
        assert all(isinstance(e, JobEvent) for e in events)
        assert [(e.event, e.id) for e in events] == [
            ("progress", "1"),
            ("message", "1"),  # an event without an id keeps the last one
            ("progress", "2"),
            ("done", "3"),
        ]
        assert events[0].data["loss"] == 0.25 and events[0].job is not None
        assert (events[0].job.id, events[0].job.step, events[0].job.progress) == ("j_1", 2, 0.5)
        assert events[1].data == "line one\nline two" and events[1].job is None
        assert events[-1].job is not None and events[-1].job.done

    run_mock(mode, handler, scenario)


def test_events_reconnect_with_last_event_id(mode: str) -> None:
    calls: list[httpx.Request] = []
    cut = STREAM.index(b"data: line one")

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        headers = {"content-type": "text/event-stream"}
        if len(calls) == 1:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"status": 503})
        if len(calls) == 2:
            return httpx.Response(200, headers=headers, stream=Chunks(STREAM[:cut], fail=True))
        return httpx.Response(200, headers=headers, stream=Chunks(STREAM[cut:]))

    async def scenario(gs: Any) -> None:
        events = await collect(gs.events(Job("j_1", "running")))
        assert [e.id for e in events] == ["1", "1", "2", "3"]

    run_mock(mode, handler, scenario)
    assert "last-event-id" not in calls[1].headers
    assert calls[2].headers["last-event-id"] == "1"


def test_events_of_an_unknown_job(mode: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"type": "not-found", "title": "Not found", "status": 404, "detail": "no job j_9"}
        return httpx.Response(404, json=body)

    async def scenario(gs: Any) -> None:
        with pytest.raises(NotFoundError, match="no job j_9"):
            await collect(gs.events("j_9"))

    run_mock(mode, handler, scenario)


# ---------------------------------------------------------------------------------------------
# docs/client.md


@pytest.mark.slow
def test_the_quick_start_in_the_docs_runs(server: Server) -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000", server.url)
    assert len(source.strip().splitlines()) <= 12
    namespace: dict[str, Any] = {}
    exec(compile(source, str(Path("docs/client.md")), "exec"), namespace)
    assert namespace["second"].params["w"].tolist() == [1.46]


def test_every_public_name_is_documented() -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    missing = [n for n in gradsvc_client.__all__ if not re.search(rf"(?<![\w.]){n}\b", text)]
    assert missing == []
