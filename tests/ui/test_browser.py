"""/ui in a real headless Chromium against a real server: the notebook's step explained, a
live loss curve while the session trains, no request to any other origin, and API keys.

Debian's chromium (``apt-get install -y chromium``) driven by Playwright's Python package;
Playwright's own browser download is not used. Set ``UI_SCREENSHOT=docs/ui.png`` to also
write the screenshot that the README shows.
"""

from __future__ import annotations

import fnmatch
import os
import re
import secrets
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, expect, sync_playwright

from tests.conftest import SEED_STEP
from tests.e2e.server import ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
in_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
UI_DIR = ROOT / "service" / "api" / "ui"

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
LINE = {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0, 7.0]}
KEY = "k1"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def booting() -> Iterator[dict[str, Future[Server]]]:
    """An open server and one with a key, started side by side (each takes seconds)."""
    made = {
        "open": Server("--store", "memory://", "--devices", "cpu"),
        "keyed": Server("--store", "memory://", "--devices", "cpu", "--api-keys", KEY),
    }
    pool = ThreadPoolExecutor(len(made))
    try:
        yield {name: pool.submit(s.start) for name, s in made.items()}
    finally:
        pool.shutdown(wait=True)
        for s in made.values():
            s.stop()


@pytest.fixture(scope="module")
def browser(booting: dict[str, Future[Server]]) -> Iterator[Browser]:
    """Launched while the servers boot."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def servers(booting: dict[str, Future[Server]], browser: Browser) -> dict[str, Server]:
    return {name: started.result() for name, started in booting.items()}


@dataclass
class Tab:
    """A page in a fresh context (its own sessionStorage), with what it asked for and what
    went wrong in it: script errors and console errors (a CSP violation is one)."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def points(self) -> int:
        return int(self.page.locator("#curve").get_attribute("data-points") or 0)

    def wait_for_more_points(self, than: int) -> int:
        self.page.wait_for_function(
            "n => Number(document.querySelector('#curve').dataset.points) > n",
            arg=than,
            timeout=WAIT_MS,
        )
        return self.points()

    def assert_clean(self) -> None:
        assert not self.errors, self.errors


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    opened = Tab(page)

    def on_request(request: Request) -> None:
        opened.requests.append(request.url)

    def on_console(message: Any) -> None:
        # An answer of 4xx is logged as "Failed to load resource"; the page shows it itself.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            opened.errors.append(message.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda error: opened.errors.append(f"script error: {error}"))
    try:
        yield opened
    finally:
        context.close()


def create(server: Server, name: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(
        server.url + "/v1/sessions",
        json={**SEED_SESSION, "name": name},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def screenshot(page: Page, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    wanted = os.environ.get("UI_SCREENSHOT")
    if wanted:
        target = Path(wanted) if Path(wanted).is_absolute() else ROOT / wanted
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)


@pytest.mark.slow
@in_chromium
def test_the_notebook_step_explained_then_a_live_curve(
    servers: dict[str, Server], tab: Tab, tmp_path: Path
) -> None:
    server, page = servers["open"], tab.page
    page.goto(server.url + "/ui")
    expect(page.get_by_role("heading", name="Sessions")).to_be_visible()

    name = f"notebook {secrets.token_hex(3)}"
    sid = create(server, name)
    page.get_by_role("button", name="Refresh").click()
    link = page.get_by_role("link", name=re.compile(re.escape(name)))
    expect(link).to_be_visible()
    link.click()
    expect(page).to_have_url(re.compile(f"#{sid}$"))
    expect(page.locator("#s-name")).to_have_text(name)
    expect(page.locator("#s-summary")).to_contain_text("w * x + 1")

    # The notebook's first step, through the page's form, with the chain rule shown.
    page.locator("#step-x").fill("1")
    page.locator("#step-y").fill("3")
    page.locator("#step-explain").check()
    page.get_by_role("button", name="Step", exact=True).click()
    derivation = page.locator("#derivation")
    expect(derivation).to_contain_text("dL/dŷ = ŷ − y = 2 − 3 = −1")
    expect(derivation.locator("[data-param=w]")).to_contain_text(
        "dL/dw = dL/dŷ · dŷ/dw = −1 · 1 = −1"
    )
    expect(derivation).to_contain_text("w ← w − lr · dL/dw = 1 − 0.1 · (−1) = 1.1")
    expect(page.locator("#curve")).to_have_attribute("data-points", "1")
    expect(page.locator("#params")).to_contain_text("1.1")

    bars = page.locator("#samples-chart rect.bar")
    expect(bars).to_have_count(1)  # one sample: one bar of its gradient's norm

    # A reload keeps the derivation (sessionStorage) and reads the curve back from history.
    page.reload()
    expect(derivation.locator("[data-param=w]")).to_contain_text("= −1 · 1 = −1")
    expect(page.locator("#curve")).to_have_attribute("data-points", "1")
    expect(bars).to_have_count(1)

    # A batch of three, explained: one bar per sample, the last pulling hardest.
    page.locator("#step-x").fill("[1, 2, 3]")
    page.locator("#step-y").fill("[3, 5, 7]")
    page.get_by_role("button", name="Step", exact=True).click()
    expect(bars).to_have_count(3)
    expect(page.locator("#samples-chart rect.hardest")).to_have_attribute("data-sample", "2")
    expect(page.locator("#curve")).to_have_attribute("data-points", "2")

    # Then it trains, driven from outside the page by a job;
    # with a smaller learning rate, so that the curve has a shape to see.
    with httpx.Client(base_url=server.url, timeout=30) as http:
        patched = http.patch(f"/v1/sessions/{sid}", json={"optimizer": {"lr": 0.01}})
        assert patched.status_code == 200, patched.text
        expect(page.locator("#s-summary")).to_contain_text("lr 0.01")
        started = http.post(
            f"/v1/sessions/{sid}/train",
            json={"dataset": LINE, "epochs": 25_000, "batch_size": 1, "seed": 0},
        )
        assert started.status_code == 202, started.text
        job = started.json()
        # The page finds the job on the session, follows its events and shows it.
        expect(page.locator("#job")).to_have_attribute("data-job", job["id"])
        expect(page.locator("#job")).to_have_attribute("data-status", "running")
        _watch_it_grow(tab, job_running=True)
        expect(page.locator("#job-status")).to_have_text("running")
        assert float(page.locator("#job-progress").get_attribute("value") or 0) > 0
        screenshot(page, tmp_path)
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#job-status")).to_have_text("cancelled")
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert (tmp_path / "ui.png").stat().st_size > 10_000
    tab.assert_clean()


def _watch_it_grow(tab: Tab, *, job_running: bool) -> None:
    """The curve gains points three times over while the session trains."""
    seen = [tab.points()]
    for _ in range(3):
        seen.append(tab.wait_for_more_points(seen[-1]))
        if job_running:
            assert tab.page.locator("#job").get_attribute("data-status") in ("queued", "running")
    assert seen == sorted(set(seen)), seen


@pytest.mark.slow
@in_chromium
def test_the_page_asks_nothing_of_any_other_origin(servers: dict[str, Server], tab: Tab) -> None:
    server, page = servers["open"], tab.page
    sid = create(server, "origins")
    httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}})
    answer = page.goto(f"{server.url}/ui#{sid}")
    assert answer is not None
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    expect(page.locator("#s-name")).to_have_text("origins")
    expect(page.locator("#curve")).to_have_attribute("data-points", "1")
    expect(page.locator("#session-list li")).not_to_have_count(0)
    page.wait_for_timeout(1000)  # a few polls' worth
    origin = urlsplit(server.url)
    assert tab.requests
    outside = [u for u in tab.requests if urlsplit(u)[:2] != origin[:2]]
    assert not outside, outside
    tab.assert_clean()


@pytest.mark.slow
@in_chromium
def test_the_page_works_with_an_api_key(servers: dict[str, Server], tab: Tab) -> None:
    server, page = servers["keyed"], tab.page
    page.goto(server.url + "/ui")  # the page and its assets load without a key...
    error = page.locator("#sessions-error")
    expect(error).to_contain_text("Unauthorized")  # ...the API does not
    expect(error).to_contain_text("a valid API key is required")

    sid = create(server, "keyed", KEY)
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    link = page.get_by_role("link", name=re.compile("keyed"))
    expect(link).to_be_visible()
    expect(error).to_be_hidden()
    link.focus()
    page.keyboard.press("Enter")  # keyboard only
    expect(page.locator("#s-name")).to_have_text("keyed")
    page.locator("#step-explain").uncheck()
    step = page.get_by_role("button", name="Step", exact=True)
    step.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#step-result")).to_contain_text("step 1: loss 0.5")
    expect(page.locator("#curve")).to_have_attribute("data-points", "1")

    # The key is kept for the tab: a reload of the deep link works without typing it again.
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(KEY)
    expect(page.locator("#s-name")).to_have_text("keyed")
    expect(page.locator("#curve")).to_have_attribute("data-points", "1")
    assert page.url.endswith(f"#{sid}")
    tab.assert_clean()


@pytest.mark.slow
@in_chromium
def test_the_docs_pages_work_under_their_security_policy(
    servers: dict[str, Server], tab: Tab
) -> None:
    """/docs and /redoc send a CSP of their own, and still work under it: Swagger UI's inline
    script runs and reads the document; ReDoc renders. What the policy refuses is only what
    would leave the origin (ReDoc's bundle shows a logo from its CDN, and hides it when the
    image does not load)."""
    server, page = servers["open"], tab.page
    for path in ("/docs", "/redoc"):  # the policy is really there
        csp = httpx.get(server.url + path, timeout=10).headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
    page.goto(server.url + "/docs")
    # The title comes from /openapi.json, which the page's inline script fetched.
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("gradsvc")

    page.goto(server.url + "/redoc")
    expect(page.get_by_role("heading", level=1)).to_contain_text("gradsvc")
    page.wait_for_timeout(500)
    origin = urlsplit(server.url)
    for error in tab.errors:
        refused = re.search(r"Loading the \w+ '([^']+)' violates the following Content Sec", error)
        assert refused and urlsplit(refused[1])[:2] != origin[:2], error


def test_the_page_ships_in_the_package() -> None:
    """A wheel (and so the Docker image) carries only the package data that pyproject.toml
    names: every file of the page must match one of its patterns."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config.get("package-data", {}).get("service.api", [])
    files = [p.relative_to(UI_DIR.parent).as_posix() for p in UI_DIR.iterdir() if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f'add to [tool.setuptools.package-data] "service.api": {missing}'


MLP_SESSION = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 3, "out_features": 4},
            {"type": "tanh"},
            {"type": "linear", "in_features": 4, "out_features": 1},
        ],
    },
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 0.1},
}

# Each box's and each edge's place, read from the drawing as the browser laid it out.
GEOMETRY = """svg => {
  const box = (n) => {
    const r = n.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom];
  };
  const nodes = {};
  for (const g of svg.querySelectorAll('g.node')) {
    nodes[g.dataset.node] = box(g.querySelector('rect'));
  }
  const edges = [...svg.querySelectorAll('path.edge')].map((p) => [p.dataset.from, p.dataset.to]);
  return { nodes, edges };
}"""


def _explain_in_page(page: Page, x: str, y: str) -> list[dict[str, Any]]:
    page.locator("#step-x").fill(x)
    page.locator("#step-y").fill(y)
    page.locator("#step-explain").check()
    page.get_by_role("button", name="Step", exact=True).click()
    expect(page.locator("#graph svg")).to_be_visible()
    saved = page.evaluate(
        "() => JSON.parse(sessionStorage.getItem('gradsvc.ui.explain.' + location.hash.slice(1)))"
    )
    trace: list[dict[str, Any]] = saved["trace"]
    return trace


def _assert_drawn(page: Page, trace: list[dict[str, Any]]) -> dict[str, Any]:
    """One box per node of the trace and per input it names only as an input, one edge per
    input, each edge left to right, no two boxes overlapping; returns the geometry."""
    graph = page.locator("#graph svg")
    names = {n["node"] for n in trace} | {i for n in trace for i in n["inputs"]}
    inputs = [(i, n["node"]) for n in trace for i in n["inputs"]]
    expect(graph).to_have_attribute("role", "img")
    expect(graph.locator("g.node")).to_have_count(len(names))
    expect(graph.locator("g.node > title")).to_have_count(len(names))
    expect(graph.locator("path.edge")).to_have_count(len(inputs))
    assert "computation graph" in (graph.get_attribute("aria-label") or "")
    drawn = graph.evaluate(GEOMETRY)
    boxes = drawn["nodes"]
    assert set(boxes) == names
    assert sorted(map(tuple, drawn["edges"])) == sorted(inputs)
    for source, target in inputs:
        assert boxes[source][2] < boxes[target][0], (source, target)  # left of it, wholly
    placed = list(boxes.items())
    for i, (a, p) in enumerate(placed):
        for b, q in placed[i + 1 :]:
            apart = p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
            assert apart, (a, b)
    return drawn


@pytest.mark.slow
@in_chromium
def test_the_notebook_step_drawn_as_a_graph(
    servers: dict[str, Server], tab: Tab, tmp_path: Path
) -> None:
    server, page = servers["open"], tab.page
    sid = create(server, "drawn")
    page.goto(f"{server.url}/ui#{sid}")
    expect(page.locator("#s-name")).to_have_text("drawn")
    trace = _explain_in_page(page, "1", "3")
    drawn = _assert_drawn(page, trace)
    # x, w → w·x → ŷ → L: the notebook's derivation, with −1 flowing back from L.
    graph = page.locator("#graph svg")

    def node(name: str, line: str) -> Locator:  # the box's line: heading, op, value, grad
        return graph.locator(f'g.node[data-node="{name}"] text.{line}')

    def edge(a: str, b: str) -> Locator:
        return graph.locator(f'text.edge-label[data-from="{a}"][data-to="{b}"]')

    expect(node("w * x + 1", "value")).to_have_text("ŷ = 2")
    expect(node("w * x + 1", "grad")).to_have_text("dL/dŷ = −1")
    expect(node("loss", "value")).to_have_text("L = 0.5")
    expect(node("w", "value")).to_have_text("value = 1")
    expect(node("w", "grad")).to_have_text("dL/dw = −1")
    expect(node("1", "op")).to_have_text("const")
    expect(edge("w", "w * x")).to_have_text("x = 1")
    expect(edge("w * x + 1", "loss")).to_have_text("−1")
    boxes = drawn["nodes"]
    assert boxes["x"][0] == boxes["w"][0] < boxes["w * x"][0] < boxes["w * x + 1"][0]
    assert boxes["w * x + 1"][0] < boxes["loss"][0]
    expect(page.locator("#derivation table")).to_be_visible()  # the table stays
    page.locator("#graph").screenshot(path=str(tmp_path / "graph.png"))
    wanted = os.environ.get("GRAPH_SCREENSHOT")
    if wanted:
        target = Path(wanted) if Path(wanted).is_absolute() else ROOT / wanted
        page.locator("#graph").screenshot(path=str(target))
    assert (tmp_path / "graph.png").stat().st_size > 5_000

    # A sequential MLP's trace: layers and their parameters, each edge still left to right.
    r = httpx.post(server.url + "/v1/sessions", json={**MLP_SESSION, "name": "mlp"}, timeout=30)
    assert r.status_code == 201, r.text
    page.goto(f"{server.url}/ui#{r.json()['id']}")
    expect(page.locator("#s-name")).to_have_text("mlp")
    trace = _explain_in_page(page, "[[1, 2, 3], [4, 5, 6]]", "[[1], [2]]")
    boxes = _assert_drawn(page, trace)["nodes"]
    assert boxes["0.weight"][0] < boxes["0"][0] < boxes["1"][0] < boxes["2"][0] < boxes["loss"][0]
    expect(node("0.weight", "value")).to_contain_text("value = 4×3 [")
    tab.assert_clean()
