"""JSON in and out with orjson: bodies parsed several times faster than the standard
library's parser (which also accepts NaN and Infinity, not JSON), floats written as the
shortest text that reads back exactly. A JSON route's body is checked before it is parsed:
its Content-Type (415) and the size of its arrays (422), and once parsed its bytes leave
the parse budget."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, params
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse, Response

from service.api.bodyscan import check_arrays
from service.api.mediatype import require_json
from service.api.parsebudget import parsed
from service.workers.jobs import Answer


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def respond(answer: Answer) -> Response:
    """An answer as computed, or as stored for an Idempotency-Key (then marked replayed)."""
    headers = dict(answer.headers)
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(answer.body, answer.status, headers, media_type="application/json")


class _FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = orjson.loads(await self.body())
            finally:
                parsed(self.scope)
        return self._json


class FastJSONRoute(APIRoute):
    """A route whose JSON body is parsed with orjson (its errors are JSONDecodeErrors, which
    FastAPI reports as malformed JSON), once its type and its arrays are known to be fine."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        takes_json = field is not None and not isinstance(field.field_info, params.Form)

        async def handle(request: Request) -> Response:
            fast = _FastJSONRequest(request.scope, request.receive)
            if takes_json and (body := await fast.body()):
                require_json(fast.headers.get("content-type"))
                check_arrays(body, request.app.state.limits.tensor_elements)
            return await handler(fast)

        return handle
