"""The floor: a minimal FastAPI app that answers POST /v1/step with a constant.

It reads the request body (so large batches still cross the socket) but neither parses nor
computes: what HTTP alone costs on this machine, under the same server and driver.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

ANSWER = b'{"loss":0.5,"grads":{"w":[-1.0]},"params":{"w":[1.1]},"outputs":2.0}'

app = FastAPI()


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@app.post("/v1/step")
async def step(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")
