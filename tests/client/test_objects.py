"""What a result can do with the client that fetched it (``Session.refresh``, ``Job.wait``),
the paginating iterators, bulk creation, and torch missing, said at construction."""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any

import httpx
import pytest
from gradsvc_client import SGD, AsyncClient, Client, Expression, SquaredLoss, Value

from tests.e2e.server import Server

NOTEBOOK = Expression("w * x + 1", params={"w": Value([1.0])}, dtype="float64")
LINE = ([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])


def mock(handler: Any) -> Client[Any]:
    return Client("http://gradsvc.test", tensors="numpy", transport=httpx.MockTransport(handler))


@pytest.mark.slow
def test_job_wait_and_session_refresh_sync(server: Server) -> None:
    with Client(server.url, tensors="numpy") as gs:
        s = gs.create_session(NOTEBOOK, SquaredLoss(), SGD(lr=0.01))
        job = gs.train(s, *LINE, epochs=3, batch_size=2, shuffle=False)
        final = job.wait(timeout=60, poll=0.05)
        assert final.status == "succeeded" and final.done and final.raw["steps_done"] == 6
        assert final.client is gs and final.wait() == final  # a done job answers at once
        assert s.step == 0 and s.refresh().step == 6
        with pytest.raises(TypeError, match=r"use refresh\(\)"):
            asyncio.run(s.refresh_async())


@pytest.mark.slow
def test_job_wait_and_session_refresh_async(server: Server) -> None:
    async def main() -> None:
        async with AsyncClient(server.url, tensors="numpy") as gs:
            made = await gs.create_sessions(3, NOTEBOOK, SquaredLoss(), SGD(lr=0.01), name="bulk")
            assert [m.name for m in made] == ["bulk-0", "bulk-1", "bulk-2"]
            assert len({m.id for m in made}) == 3
            job = await gs.train(made[0], *LINE, epochs=1, batch_size=4)
            final = await job.wait_async(timeout=60, poll=0.05)
            assert final.status == "succeeded"
            assert (await made[0].refresh_async()).step == 1
            with pytest.raises(TypeError, match=r"use await refresh_async\(\)"):
                made[0].refresh()
            listed = [x.id async for x in gs.sessions(page_size=1)]
            assert {m.id for m in made} <= set(listed) and len(listed) == len(set(listed))

    asyncio.run(main())


def test_wait_times_out_on_a_job_that_runs_on() -> None:
    looks: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        looks.append(request)
        return httpx.Response(200, json={"id": "j_1", "status": "running", "progress": 0.5})

    with Client(
        "http://gradsvc.test", tensors="numpy", transport=httpx.MockTransport(handler)
    ) as gs:
        with pytest.raises(TimeoutError, match="j_1 is still running"):
            gs.wait("j_1", timeout=0.2, poll=0.05)
    assert 2 <= len(looks) and all(r.url.path == "/v1/jobs/j_1" for r in looks)


def test_iterators_follow_next_cursors_lazily() -> None:
    seen: list[httpx.Request] = []
    at = "2025-01-01T00:00:00+00:00"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        page = int(request.url.params.get("cursor", "0"))
        if request.url.path.endswith("/history"):
            rows = [{"step": page * 2 + i + 1, "loss": 1.0, "grad_norm": 1.0, "at": at}
                    for i in range(2)]  # fmt: skip
        else:
            rows = [{"id": f"s_{page}", "name": None, "model_type": "expression", "step": 0,
                     "job": None, "updated_at": at}]  # fmt: skip
        return httpx.Response(
            200, json={"items": rows, "next": str(page + 1) if page < 2 else None}
        )

    with Client(
        "http://gradsvc.test", tensors="numpy", transport=httpx.MockTransport(handler)
    ) as gs:
        history = gs.history("s_1", page_size=2)
        assert seen == []  # lazy: nothing fetched before the first item is asked for
        assert [h.step for h in history] == [1, 2, 3, 4, 5, 6]
        assert [r.url.params.get("cursor") for r in seen] == [None, "1", "2"]
        assert seen[0].url.params["limit"] == "2"
        seen.clear()
        assert [s.id for s in gs.sessions(page_size=1, with_params=True)] == ["s_0", "s_1", "s_2"]
        assert len(seen) == 3 and seen[0].url.params["include"] == "params"


def test_torch_missing_is_said_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if it were not installed
    for make in (Client, AsyncClient):
        with pytest.raises(ImportError, match=r"pip install 'gradsvc-client\[torch\]'"):
            make("http://gradsvc.test")
    numpy_only: Any = Client("http://gradsvc.test", tensors="numpy")
    numpy_only.close()
    with pytest.raises(ValueError, match="'torch' or 'numpy'"):
        Client("http://gradsvc.test", tensors="jax")  # type: ignore[call-overload]


def test_help_shows_the_options_and_every_public_method_has_a_docstring() -> None:
    for cls in (Client, AsyncClient):
        options = inspect.signature(cls.__init__).parameters
        assert {"api_key", "timeout", "retries", "backoff", "max_wait", "encoding",
                "b64_threshold", "headers", "transport", "tensors"} <= set(options)  # fmt: skip
        assert "Args:" in (cls.__init__.__doc__ or "")
        for name, member in vars(cls).items():
            if name.startswith("_") or not callable(member) or name in ("close", "aclose"):
                continue
            assert "Raises:" in (member.__doc__ or ""), f"{cls.__name__}.{name}"
