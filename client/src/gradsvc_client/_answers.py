"""Answers to results: each parser reads one kind of answer into the dataclasses of
``results``, with the client's tensor decoder and a reference to the client itself."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx

from gradsvc_client.errors import error_from_problem
from gradsvc_client.results import (
    Accumulated,
    Applied,
    Gradients,
    Health,
    HistoryItem,
    Job,
    Session,
    SessionSummary,
    StepManyItem,
    StepResult,
    TraceNode,
    Worker,
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Page(Generic[R]):
    """One page of a listing and the cursor of the next (None on the last)."""

    items: list[R]
    next: str | None


def body(response: httpx.Response) -> Any:
    return json.loads(response.content)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _replayed(response: httpx.Response) -> bool:
    value: str = response.headers.get("idempotent-replayed", "")
    return value.lower() == "true"


def job(data: Mapping[str, Any], job_id: str | None = None, client: Any = None) -> Job:
    """A job's state from its JSON view (a GET's body, or an event's data)."""

    def num(key: str, kind: Callable[[Any], Any]) -> Any:
        value = data.get(key)
        return kind(value) if value is not None else None

    return Job(
        id=str(data.get("id") or job_id or ""),
        status=str(data.get("status", "")),
        progress=num("progress", float),
        epoch=num("epoch", int),
        step=num("step", int),
        loss=num("loss", float),
        error=data.get("error"),
        session=data.get("session"),
        raw=dict(data),
        client=client,
    )


def nothing(response: httpx.Response) -> None:
    return None


def content(response: httpx.Response) -> bytes:
    return response.content


def _loss(value: Any) -> float | None:
    """A loss, or None where the batches came with grad_outputs and so had none."""
    return None if value is None else float(value)


def history_page(response: httpx.Response) -> Page[HistoryItem]:
    data = body(response)
    items = [
        HistoryItem(
            int(h["step"]), _loss(h["loss"]), float(h["grad_norm"]), _time(h["at"]), h.get("lr")
        )
        for h in data["items"]
    ]
    return Page(items, data.get("next"))


def workers(response: httpx.Response) -> list[Worker]:
    return [
        Worker(
            index=int(w["index"]),
            device=str(w["device"]),
            pid=w.get("pid"),
            state=str(w["state"]),
            queue_depth=int(w["queue_depth"]),
            sessions_held=int(w["sessions_held"]),
            requests_done=int(w["requests_done"]),
            restarts=int(w["restarts"]),
        )
        for w in body(response)["items"]
    ]


def health(response: httpx.Response) -> Health:
    data = body(response)
    if response.status_code == 200:
        return Health(True, str(data.get("status", "ok")))
    return Health(False, str(data.get("type", "unavailable")), data.get("detail"))


class Answers(Generic[T]):
    """The parsers that need the client: its tensor decoder, and itself for ``Session``
    and ``Job`` (``refresh``, ``wait``). ``sizes`` remembers each session's parameter count,
    which decides whether its answers should come in b64."""

    def __init__(self, decode: Callable[[Any], T], client: Any) -> None:
        self.decode = decode
        self.client = client
        self.sizes: dict[str, int] = {}

    def tensors(self, value: Mapping[str, Any] | None) -> dict[str, T]:
        return {k: self.decode(v) for k, v in (value or {}).items()}

    def outputs(self, response: httpx.Response) -> T:
        return self.decode(body(response)["outputs"])

    def trace(self, value: Any) -> list[TraceNode[T]] | None:
        if value is None:
            return None
        return [
            TraceNode(
                node=n["node"],
                op=n["op"],
                inputs=list(n["inputs"]),
                value=self.decode(n["value"]),
                grad=self.decode(n["grad"]) if n.get("grad") is not None else None,
                local=self.tensors(n["local"]) if n.get("local") is not None else None,
            )
            for n in value
        ]

    def gradients(self, response: httpx.Response) -> Gradients[T]:
        data = body(response)
        return Gradients(
            loss=float(data["loss"]),
            grads=self.tensors(data["grads"]),
            grad_norm=float(data["grad_norm"]),
            outputs=self.decode(data["outputs"]),
            trace=self.trace(data.get("trace")),
        )

    def step(self, response: httpx.Response) -> StepResult[T]:
        data = body(response)
        return StepResult(
            loss=float(data["loss"]),
            grads=self.tensors(data["grads"]),
            grad_norm=float(data["grad_norm"]),
            outputs=self.decode(data["outputs"]),
            trace=self.trace(data.get("trace")),
            params=self.tensors(data["params"]),
            step=data.get("step"),
            lr=data.get("lr"),
            replayed=_replayed(response),
            etag=response.headers.get("etag"),
        )

    def accumulated(self, response: httpx.Response) -> Accumulated[T]:
        data = body(response)
        return Accumulated(
            loss=_loss(data.get("loss")),
            grads=self.tensors(data["grads"]),
            grad_norm=float(data["grad_norm"]),
            outputs=self.decode(data["outputs"]),
            accumulated=int(data["accumulated"]),
            replayed=_replayed(response),
            etag=response.headers.get("etag"),
        )

    def applied(self, response: httpx.Response) -> Applied[T]:
        data = body(response)
        return Applied(
            step=int(data["step"]),
            lr=float(data["lr"]),
            applied=int(data["applied"]),
            loss=_loss(data.get("loss")),
            grads=self.tensors(data["grads"]),
            grad_norm=float(data["grad_norm"]),
            params=self.tensors(data["params"]),
            replayed=_replayed(response),
            etag=response.headers.get("etag"),
        )

    def session(self, response: httpx.Response) -> Session[T]:
        data = body(response)
        etag = response.headers.get("etag")
        params = self.tensors(data["params"])
        self.sizes[data["id"]] = sum(math.prod(getattr(p, "shape", ())) for p in params.values())
        return Session(
            id=data["id"],
            name=data.get("name"),
            step=int(data["step"]),
            version=int(data["version"]),
            etag=etag or f'"{data["id"]}:{data["version"]}"',
            params=params,
            buffers=self.tensors(data.get("buffers") or {}),
            model=data["model"],
            loss=data["loss"],
            optimizer=data["optimizer"],
            device=data["device"],
            created_at=_time(data["created_at"]),
            updated_at=_time(data["updated_at"]),
            scheduler=data.get("scheduler"),
            lr=data.get("lr"),
            raw=data,
            client=self.client,
        )

    def session_page(self, response: httpx.Response) -> Page[SessionSummary[T]]:
        data = body(response)
        items = [
            SessionSummary(
                id=s["id"],
                name=s.get("name"),
                model_type=s["model_type"],
                step=int(s["step"]),
                job=s.get("job"),
                updated_at=_time(s["updated_at"]),
                params=self.tensors(s["params"]) if "params" in s else None,
            )
            for s in data["items"]
        ]
        return Page(items, data.get("next"))

    def step_many(self, response: httpx.Response) -> list[StepManyItem[T]]:
        out: list[StepManyItem[T]] = []
        for item in body(response)["items"]:
            problem = item.get("problem")
            error = None
            if isinstance(problem, dict):
                error = error_from_problem(int(problem.get("status", item["status"])), problem)
            out.append(
                StepManyItem(
                    session=item["session"],
                    status=int(item["status"]),
                    step=item.get("step"),
                    lr=item.get("lr"),
                    loss=item.get("loss"),
                    grad_norm=item.get("grad_norm"),
                    grads=self.tensors(item["grads"]) if "grads" in item else None,
                    params=self.tensors(item["params"]) if "params" in item else None,
                    outputs=self.decode(item["outputs"]) if "outputs" in item else None,
                    replayed=bool(item.get("replayed", False)),
                    error=error,
                )
            )
        return out

    def job(self, job_id: str) -> Callable[[httpx.Response], Job]:
        return lambda response: job(body(response), job_id, self.client)

    def started_job(self, response: httpx.Response) -> Job:
        location = response.headers.get("location", "")
        job_id = location.rstrip("/").rsplit("/", 1)[-1] or None
        data = body(response) if response.content else None
        state = {"status": "queued", **(data if isinstance(data, dict) else {})}
        return job(state, job_id, self.client)

    def cancelled_job(self, job_id: str) -> Callable[[httpx.Response], Job | None]:
        def parse(response: httpx.Response) -> Job | None:
            data = body(response) if response.content else None
            return job(data, job_id, self.client) if isinstance(data, dict) else None

        return parse
