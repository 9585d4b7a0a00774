"""A job's event stream, followed: ``text/event-stream`` is read by httpx-sse; this keeps
what one ``events()`` iteration needs across its connections.

It reconnects with ``Last-Event-ID`` after a dropped stream, or after a server that shut
down ended it with ``interrupted`` (the job goes on, and the next server follows it); it
ends after the stream ends or a job's state says it is done.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from gradsvc_client import _answers
from gradsvc_client._core import Call, Core, Wait, _seg
from gradsvc_client.errors import error_from_response
from gradsvc_client.results import JobEvent

INTERRUPTED_WAIT = 0.5
"""Seconds before following a job again after its stream's server shut down."""


class EventStream:
    """The state of one ``events()`` iteration, between and across its connections."""

    def __init__(self, core: Core[Any], job_id: str) -> None:
        self.core, self.job_id = core, job_id
        self.last_id: str | None = None
        self.attempt = 0
        self.finished = False
        self.interrupted = False
        self.call: Call[None] = Call("GET", f"/v1/jobs/{_seg(job_id)}/events", _answers.nothing)

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        return headers

    def timeout(self) -> httpx.Timeout:
        # Progress comes every second or step, but a queued job may be quiet for long.
        return httpx.Timeout(self.core.timeout, read=None)

    def feed(self, sse: ServerSentEvent) -> JobEvent | None:
        """One event as httpx-sse read it: a ``JobEvent``, or None for one to skip."""
        if sse.id:
            self.last_id = sse.id
        if not sse.data:
            # A keep-alive after an id: httpx-sse dispatches it, the WHATWG reading does not.
            return None
        self.attempt = 0  # events flow again: a later drop gets every retry anew
        try:
            data: Any = json.loads(sse.data)
        except ValueError:
            data = sse.data
        job = None
        if isinstance(data, dict) and "status" in data:
            job = _answers.job(data, self.job_id, self.core.answers.client)
        if job is not None and job.done:
            self.finished = True
        if sse.event == "end" and job is not None and job.status == "interrupted":
            self.interrupted = True  # not the job's end: follow it on, elsewhere
            return None
        return JobEvent(sse.event, data, self.last_id, job)

    def ended(self) -> float | None:
        """The stream ended: None if that is the iteration's end, else the wait before
        following the job again."""
        if not self.interrupted:
            return None
        self.interrupted = False
        return INTERRUPTED_WAIT

    def failed(self, response: httpx.Response) -> float:
        """An error answer instead of a stream: the wait before trying again, or raise."""
        outcome = self.core.on_response(self.call, response, self.attempt)
        if not isinstance(outcome, Wait):  # an error status that parse took: none does here
            raise error_from_response(response)
        self.attempt += 1
        return outcome.seconds

    def dropped(self, exc: httpx.TransportError) -> float:
        """The connection failed or dropped: the wait before trying again, or raise."""
        wait = self.core.on_transport_error(self.call, exc, self.attempt)
        self.attempt += 1
        return wait.seconds
