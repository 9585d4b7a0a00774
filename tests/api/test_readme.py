"""The README's curls, run as written, in order, give the answers it shows.

Each ``curl -s localhost:8000/...`` in an indented block is sent as it stands (its body, its
headers; ``$ID`` is the session the last ``POST /v1/sessions`` made). An answer the README
shows in full must be the answer; a shortened one (with ``...``) must hold every
``"name":value`` it spells out, somewhere in the answer.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

README = Path(__file__).resolve().parents[2] / "README.md"
PAIR = re.compile(r'"([^"]+)":(\[[^\[\]{}]*\]|"[^"]*"|[^,{}\[\]"]+)')


@dataclass
class Curl:
    line: int
    path: str
    headers: dict[str, str]
    body: str | None
    answer: str | None


def curls(text: str) -> list[Curl]:
    """Every curl of the README's code blocks, with the answer shown under it, if any."""
    lines = text.splitlines()
    found: list[Curl] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("    curl "):
            i += 1
            continue
        start, command = i, ""
        while True:  # a command goes on over a trailing backslash or an open quote
            command += lines[i].strip() + "\n"
            i += 1
            if not command.rstrip().endswith("\\") and command.count("'") % 2 == 0:
                break
        tokens = shlex.split(command.replace("\\\n", " "), comments=True)
        url = next(t for t in tokens if t.startswith("localhost:8000"))
        headers = dict(h.split(": ", 1) for flag, h in pairwise(tokens) if flag == "-H")
        body = next((t for flag, t in pairwise(tokens) if flag == "-d"), None)
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        answer = None
        if j < len(lines) and lines[j].startswith("    {"):
            shown = [lines[j].strip()]
            j += 1
            while j < len(lines) and lines[j].startswith("     ") and lines[j].strip():
                shown.append(lines[j].strip())
                j += 1
            answer, i = "".join(shown), j
        found.append(Curl(start + 1, url.removeprefix("localhost:8000"), headers, body, answer))
    return found


def pairs(value: Any) -> list[tuple[str, Any]]:
    """Every (name, value) in a JSON answer, at any depth."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [(k, v), *pairs(v)]]
    if isinstance(value, list):
        return [p for v in value for p in pairs(v)]
    return []


def test_the_readme_shows_its_new_examples() -> None:
    paths = [c.path for c in curls(README.read_text())]
    assert "/v1/sessions/$ID/accumulate" in paths and "/v1/sessions/$ID/apply" in paths
    assert sum(p == "/v1/sessions" for p in paths) >= 4  # sessions, accumulate, scheduler, conv


def test_every_readme_curl_answers_as_shown(client: TestClient) -> None:
    session = ""
    checked = 0
    for curl in curls(README.read_text()):
        headers = dict(curl.headers)
        if "Idempotency-Key" in headers:  # the shared app may have seen these keys already
            headers["Idempotency-Key"] += f"-{uuid.uuid4().hex}"
        path = curl.path.replace("$ID", session)
        if curl.body is None:
            response = client.get(path, headers=headers)
        else:
            response = client.post(path, content=curl.body, headers=headers)
        assert response.is_success, (curl.line, response.text)
        got = response.json()
        if curl.path == "/v1/sessions" and curl.body is not None:
            session = got["id"]
        if curl.answer is None:
            continue
        checked += 1
        if "..." not in curl.answer:
            assert got == json.loads(curl.answer), curl.line
            continue
        have = pairs(got)
        for name, text in PAIR.findall(curl.answer):
            if "..." in text:
                continue
            assert (name, json.loads(text)) in have, (curl.line, name, text, got)
    assert checked >= 9
