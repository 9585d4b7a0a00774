"""Schemathesis against the app's own OpenAPI document, in-process, with every check on."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.python import asgi

from service.app import create_app
from service.config import Settings

SEED = 20240607
MAX_EXAMPLES = 25

_TMP = tempfile.TemporaryDirectory(prefix="gradsvc-fuzz-")
OPEN_APP = create_app(
    Settings(
        store=f"sqlite:///{Path(_TMP.name) / 'fuzz.db'}",
        compute_threads=2,
        queue_size=16,
    )
)


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow"],
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
            "output": {"sanitization": {"enabled": False}},
        }
    )


open_schema = schemathesis.openapi.from_dict(OPEN_APP.openapi(), config=_config())
open_schema.app = OPEN_APP


@pytest.fixture(scope="module", autouse=True)
def _lifespans() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()
    _TMP.cleanup()


@open_schema.parametrize()
def test_open(case: schemathesis.Case) -> None:
    case.call_and_validate()


def _unused(_: Any) -> None:
    pass
