"""A JSON route takes JSON: any other Content-Type is a 415 that says what to send."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import SEED_STEP, assert_problem

ADVICE = "Content-Type: application/json (curl: -H 'content-type: application/json')"


def _json_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation whose body is JSON, with its path parameters filled in."""
    routes = []
    for path, operations in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                routes.append((method.upper(), re.sub(r"\{[^}]+\}", "s0", path)))
    return routes


def test_every_json_route_refuses_a_body_of_another_type(client: TestClient) -> None:
    routes = _json_routes(client)
    assert len(routes) >= 8, routes  # forward, gradients, step, sessions and their calls, train
    body = json.dumps(SEED_STEP)
    for method, path in routes:
        for headers in (
            {},  # httpx's content= sends no Content-Type
            {"content-type": "application/x-www-form-urlencoded"},  # what curl -d sends
            {"content-type": "text/plain"},
        ):
            response = client.request(method, path, content=body, headers=headers)
            problem = assert_problem(response, 415)
            assert problem["type"] == "unsupported-media-type", (method, path, problem)
            assert ADVICE in problem["detail"], problem


def test_json_is_json_whatever_its_spelling_and_nothing_else_is(client: TestClient) -> None:
    body = json.dumps(SEED_STEP)
    for content_type in (
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; charset=UTF-8",
        "application/problem+json",  # a structured +json type, as FastAPI parses it
    ):
        r = client.post("/v1/step", content=body, headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
    for content_type in ("application/json; charset=latin-1", "application/jsonx", "text/json"):
        r = client.post("/v1/step", content=body, headers={"content-type": content_type})
        assert content_type in assert_problem(r, 415)["detail"]  # latin-1: JSON is UTF-8
    # No body at all: the body is missing (422), whatever the type says.
    missing = assert_problem(client.post("/v1/step"), 422)
    assert missing["type"] == "validation-error", missing
    # A checkpoint is not JSON: restore reads it whatever the Content-Type (a bad one is 422).
    for headers in ({}, {"content-type": "application/octet-stream"}):
        restored = client.post("/v1/sessions/restore", content=b"\0" * 64, headers=headers)
        assert assert_problem(restored, 422)["type"] != "unsupported-media-type"


def test_the_document_declares_what_the_edge_answers(client: TestClient) -> None:
    document: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            declared = set(operation["responses"])
            assert "503" in declared, (method, path)  # --max-connections
            if method in ("post", "patch", "put"):
                assert {"408", "413", "503"} <= declared, (method, path)
            takes_json = "application/json" in operation.get("requestBody", {}).get("content", {})
            assert ("415" in declared) == takes_json, (method, path)
