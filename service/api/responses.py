"""JSON responses rendered with orjson: floats as the shortest text that reads back exactly."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse, Response

from service.workers.sessions import Answer


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def respond(answer: Answer) -> Response:
    """An answer as computed, or as stored for an Idempotency-Key (then marked replayed)."""
    headers = dict(answer.headers)
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(answer.body, answer.status, headers, media_type="application/json")
