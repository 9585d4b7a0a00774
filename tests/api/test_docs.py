"""/docs and /redoc work offline: every asset they reference is served by the service itself."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest
from fastapi.testclient import TestClient

BASE = "http://testserver"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append(value)


def _external(url: str) -> bool:
    parsed = urlparse(urljoin(BASE + "/", url))
    return parsed.scheme not in ("http", "https", "data") or (
        parsed.scheme != "data" and parsed.netloc != urlparse(BASE).netloc
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    html = r.text
    parser = _Refs()
    parser.feed(html)
    # URLs inside the inline scripts (the OpenAPI document's, the oauth2 redirect) too.
    inline = re.findall(
        r"""(?:url|openapi_url|oauth2RedirectUrl)\s*[:=]\s*['"]([^'"]+)['"]""", html
    )
    refs = parser.refs + inline
    assert refs, "the page references nothing: the test would pass vacuously"
    assert "cdn" not in html.lower()
    for ref in refs:
        assert not _external(ref), f"{page} references {ref}, outside the service"
        asset = client.get(urljoin(BASE + page, ref))
        assert asset.status_code == 200, ref
        if ref.endswith(".css"):
            for inner in re.findall(r"url\(\s*['\"]?([^'\")]+)", asset.text):
                assert inner.startswith("data:") or not _external(inner), inner


def test_swagger_ui_has_no_validator_badge(client: TestClient) -> None:
    """Swagger UI fetches a badge from validator.swagger.io unless told not to."""
    assert '"validatorUrl": null' in client.get("/docs").text


def test_every_endpoint_carries_the_notebooks_example(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/forward", "/v1/gradients", "/v1/step"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "examples"
        ]
        first = next(iter(examples.values()))["value"]
        assert first["model"]["expression"] == "w * x + 1"
        assert first["batch"]["x"] == 1


def test_try_it_out_reproduces_the_first_step(client: TestClient) -> None:
    """What "Try it out" → "Execute" sends: the first example, as is."""
    spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/v1/step"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    body = client.post("/v1/step", json=next(iter(examples.values()))["value"]).json()
    assert (body["loss"], body["grads"], body["params"], body["outputs"]) == (
        0.5,
        {"w": [-1.0]},
        {"w": [1.1]},
        2.0,
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_carry_the_security_headers(client: TestClient, page: str) -> None:
    """As /ui: this origin only, no framing, no sniffing, no referrer; of inline script only
    the page's own, by its hash."""
    r = client.get(page)
    assert r.status_code == 200
    for name in ("x-content-type-options", "referrer-policy"):
        assert r.headers[name] == client.get("/ui").headers[name], name
    assert r.headers["x-frame-options"] == "DENY"
    directives = {
        d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")
    }
    for name, value in [("default-src", "'self'"), ("frame-ancestors", "'none'")]:
        assert directives[name] == [value], name
    assert directives["object-src"] == directives["base-uri"] == ["'none'"]
    inline = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in inline
    ]
    assert directives["script-src"] == ["'self'", *hashes]
