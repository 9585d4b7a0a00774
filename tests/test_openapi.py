"""openapi/openapi.json is the app's own document: any change to the contract is a diff."""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.app import create_app

DOCUMENT = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_openapi_json_is_in_sync() -> None:
    committed = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    assert committed == create_app().openapi(), "run `make openapi` and commit the result"


def test_every_problem_reference_resolves() -> None:
    spec = create_app().openapi()
    text = json.dumps(spec)
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in spec["components"]["schemas"], ref
