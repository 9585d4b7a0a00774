"""Schemathesis against the app's own OpenAPI document, in-process, with every check that fits.

Two apps, each fuzzed operation by operation through its ASGI interface with the lifespan
running: the open one (no keys) on a SQLite file, as the service runs by default, and a keyed
one (``--api-keys``) on the memory store, where every case carries the valid key and
``ignored_auth`` replays it without the key and with a wrong one, expecting 401.

Every case is checked for: no 5xx; a status code, content type, headers and body that the
document declares for the operation; schema-invalid requests rejected with a 4xx; schema-valid
ones not refused for their form (a 422 is allowed: the document cannot say that an expression
must parse or that shapes must agree, but a ``validation-error`` problem for a request the
document calls valid is a failure); undeclared methods answered 405 with ``Allow``; and, for
the keyed app, no operation that answers without the key.

Generation is bounded and derandomised (a fixed seed, no example database), so CI and a laptop
send the same requests. Half of the cases on ``/v1/sessions/{session_id}...`` are pointed at a
live session, and half of the ``restore`` bodies are a real checkpoint, intact or with one byte
changed, so that the session code is fuzzed and not only the 404 path.
"""

from __future__ import annotations

import itertools
import re
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.python import asgi

from service.api.preconditions import PATTERN as IF_MATCH_PATTERN
from service.app import create_app
from service.config import Settings
from tests.conftest import SEED_STEP

SEED = 20240607
# Fuzzing-phase examples per operation (the examples and coverage phases add their own). The
# keyed app runs the same code behind the key, so it gets fewer: there, the point is the key.
MAX_EXAMPLES = {"open": 8, "keyed": 3}
KEY = "fuzz-key"

SEED_MODEL: dict[str, Any] = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}

_TMP = tempfile.TemporaryDirectory(prefix="gradsvc-fuzz-")


def _settings(**overrides: Any) -> Settings:
    # A generated training job may ask for up to 2**31 epochs: capped, such a job is the 422 it
    # should be, rather than a worker busy for the rest of the run.
    return Settings(queue_size=16, max_train_steps=20, **overrides)


OPEN_APP = create_app(_settings(store=f"sqlite:///{Path(_TMP.name) / 'fuzz.db'}"))
# Rate limiting off: the fuzzer sends far more than 50 requests a second, and a 429 for every
# case would test nothing else.
KEYED_APP = create_app(_settings(store="memory://", api_keys=KEY, rate_limit=0))


def _config(variant: str, **extra: Any) -> schemathesis.Config:
    checks_on = {"enabled": True}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Each case is a real computation; only the health checks about speed are off.
            "suppress-health-check": ["too_slow"],
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES[variant],
                "deterministic": True,
                "database": "none",
            },
            # examples (the documented seed requests), coverage (boundaries, undeclared
            # methods) and fuzzing; stateful runs need links the document does not declare.
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "not_a_server_error": checks_on,
                "status_code_conformance": checks_on,
                "content_type_conformance": checks_on,
                "response_schema_conformance": checks_on,
                "response_headers_conformance": checks_on,
                # 412 and 413 reject a request too: RFC 9110 lets a precondition fail before
                # the content is processed, and a body over the limit is never read.
                "negative_data_rejection": {
                    "enabled": True,
                    "expected-statuses": [
                        *("400", "401", "403", "404", "405", "406", "409", "412", "413"),
                        *("415", "422", "428", "429", "5xx"),
                    ],
                },
                # 412: a generated If-Match is not the session's ETag. 422: see the docstring.
                "positive_data_acceptance": {
                    "enabled": True,
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "412", "422", "429"],
                },
                "missing_required_header": checks_on,
                "unsupported_method": checks_on,
                "allow_header_conformance": checks_on,
                "ignored_auth": checks_on,
            },
            "output": {"sanitization": {"enabled": False}},
            **extra,
        }
    )


open_schema = schemathesis.openapi.from_dict(OPEN_APP.openapi(), config=_config("open"))
open_schema.app = OPEN_APP
keyed_schema = schemathesis.openapi.from_dict(
    KEYED_APP.openapi(), config=_config("keyed", auth={"openapi": {"apiKey": {"bearer": KEY}}})
)
keyed_schema.app = KEYED_APP


@pytest.fixture(scope="module", autouse=True)
def _lifespans() -> Iterator[None]:
    """Schemathesis starts each app's lifespan on its first request; stop them at the end.
    Before the first case, each app's workers are up (as a load balancer would wait)."""
    for app in (OPEN_APP, KEYED_APP):
        with asgi.get_client(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.05)
    yield
    asgi.shutdown_lifespans()
    _TMP.cleanup()


def validation_agrees_with_document(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A request generated valid by the document must pass the app's own request validation:
    FastAPI validates with the models the document is made from, so a disagreement means the
    document declares something the app does not accept."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    body = response.json()
    if isinstance(body, dict) and body.get("type") == "validation-error":
        raise AssertionError(
            f"a request the document declares valid failed validation: {body.get('detail')}"
        )
    return None


class Live:
    """A session that exists, made through the app itself and made again if a case deleted it."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.app, self.headers = app, headers
        self.id: str | None = None
        self.etag = ""

    def ready(self) -> None:
        """Wait for the app's workers (a case may have been the one that timed one out)."""
        with asgi.get_client(self.app) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.05)

    def session_id(self) -> str:
        """The live session's id, its current ETag in ``self.etag``."""
        with asgi.get_client(self.app) as client:
            if self.id is not None:
                got = client.get(f"/v1/sessions/{self.id}", headers=self.headers)
                if got.status_code == 200:
                    self.etag = got.headers["ETag"]
                    return self.id
            created = client.post("/v1/sessions", json=SEED_MODEL, headers=self.headers)
            assert created.status_code == 201, created.text
            self.id = str(created.json()["id"])
            stepped = client.post(
                f"/v1/sessions/{self.id}/step",
                json={"batch": {"x": 1, "y": 3}},
                headers=self.headers,
            )
            assert stepped.status_code == 200, stepped.text
            self.etag = stepped.headers["ETag"]
            return self.id

    def checkpoint(self) -> bytes:
        session = self.session_id()
        with asgi.get_client(self.app) as client:
            got = client.get(f"/v1/sessions/{session}/checkpoint", headers=self.headers)
            assert got.status_code == 200, got.text
            return got.content


OPEN_LIVE = Live(OPEN_APP, {})
KEYED_LIVE = Live(KEYED_APP, {"Authorization": f"Bearer {KEY}"})
_KEYS = itertools.count()


def _crc(value: object) -> int:
    """A deterministic choice from what Hypothesis generated (``hash`` is salted per process)."""
    return zlib.crc32(repr(value).encode())


def _prepare(case: schemathesis.Case, live: Live) -> None:
    """Point part of the cases at real state, and keep Idempotency-Keys from colliding."""
    live.ready()
    headers = dict(case.headers or {})
    if "session_id" in (case.path_parameters or {}) and _crc(case.path_parameters) % 2 == 0:
        case.path_parameters = {**case.path_parameters, "session_id": live.session_id()}
        # A generated If-Match never matches, and a 412 comes before anything else is looked at.
        if "If-Match" in headers and _crc((case.body, headers["If-Match"])) % 2 == 0:
            headers["If-Match"] = live.etag
    # The coverage phase fills an optional header with a placeholder ("0") whatever its declared
    # pattern; where it calls the case positive, the If-Match is made well formed (and stale),
    # since an unquoted one is a 400 by contract.
    match = headers.get("If-Match")
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if isinstance(match, str) and positive and not re.fullmatch(IF_MATCH_PATTERN, match):
        headers["If-Match"] = '"s_stale:0"'
    if case.path == "/v1/sessions/restore" and case.media_type == "application/octet-stream":
        choice = _crc(getattr(case.body, "data", case.body))  # generated bytes come wrapped
        if choice % 2 == 0:
            data = bytearray(live.checkpoint())
            if choice % 4 == 2:  # one byte changed: header, metadata or tensor data
                data[(choice >> 2) % len(data)] ^= 0x5A
            case.body = bytes(data)
    # The same key with another body is a 422 by contract (API.md); the fuzzer reuses a few
    # generated keys across unrelated requests. A well-formed key gets a unique suffix, so the
    # replay logic still runs but only ever sees fresh keys; a malformed one is left malformed.
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and 1 <= len(key) <= 255 and key.isascii() and key.isprintable():
        suffix = f"~{next(_KEYS)}"
        headers["Idempotency-Key"] = key[: 255 - len(suffix)] + suffix
    if headers != (case.headers or {}):
        case.headers = headers


@open_schema.parametrize()
def test_open_app(case: schemathesis.Case) -> None:
    _prepare(case, OPEN_LIVE)
    case.call_and_validate(additional_checks=[validation_agrees_with_document])


@keyed_schema.parametrize()
def test_keyed_app(case: schemathesis.Case) -> None:
    _prepare(case, KEYED_LIVE)
    case.call_and_validate(additional_checks=[validation_agrees_with_document])
