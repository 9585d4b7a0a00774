"""The mistakes a learner makes first, each answered with what to do instead.

One table: a mistake (a request) → its status, problem type, and a piece of the detail that
holds the hint. Every validation problem is also free of pydantic's union noise (member
labels in ``loc``, "Input should be ...", the other members' errors). Through the shared
in-process app, on one session.
"""

from __future__ import annotations

import ast
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.problems import TITLES
from service.errors import GradsvcError
from tests.conftest import SEED_STEP, assert_problem

SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
BATCH = {"batch": {"x": 1, "y": 3}}
NOISE = ("valid dictionary", "union_tag", "literal", "LossSpec", "function-before", "Input tag")


def step(**changes: Any) -> dict[str, Any]:
    """The notebook's first step with top-level fields replaced."""
    return {**copy.deepcopy(SEED_STEP), **changes}


def model(**changes: Any) -> dict[str, Any]:
    """The notebook's first step with fields of its model replaced."""
    body = copy.deepcopy(SEED_STEP)
    body["model"].update(changes)
    return body


@dataclass(frozen=True)
class Mistake:
    name: str
    status: int
    type: str
    hint: str
    body: Any = None
    path: str = "/v1/step"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    loc: tuple[str | int, ...] | None = None
    """Where the one error points, when the body has one: nothing else is listed."""


LOSSES = "squared, mse, l1, huber, smooth_l1, bce_with_logits, cross_entropy"
MISTAKES = [
    # --- the body is JSON, but not said to be ---------------------------------------------
    *(
        Mistake(f"no-content-type-{name}", 415, "unsupported-media-type", hint, body, path, method)
        for name, path, method, body in (
            ("step", "/v1/step", "POST", SEED_STEP),
            ("session-step", "/v1/sessions/{sid}/step", "POST", BATCH),
            ("bulk-step", "/v1/sessions/step", "POST", {"items": []}),
            ("patch", "/v1/sessions/{sid}", "PATCH", {"name": "n"}),
            ("train", "/v1/sessions/{sid}/train", "POST", {"epochs": 1}),
        )
        for hint in ["send it with Content-Type: application/json"]
    ),
    # --- expressions -----------------------------------------------------------------------
    Mistake(
        "caret-power",
        422,
        "invalid-expression",
        "use ** for powers",
        model(expression="w * x^2 + 1"),
    ),
    Mistake(
        "unknown-function",
        422,
        "invalid-expression",
        "the functions are abs, cos, exp, log",
        model(expression="max(w, x)"),
    ),
    Mistake(
        "implicit-product", 422, "invalid-expression", "write 2 * w", model(expression="2w * x + 1")
    ),
    Mistake(
        "superscript",
        422,
        "invalid-expression",
        "write 'w * x**2 + 1'",
        model(expression="w * x² + 1"),
    ),
    Mistake(
        "attribute",
        422,
        "invalid-expression",
        "for a product write w * x",
        model(expression="w.x + 1"),
    ),
    Mistake(
        "param-called",
        422,
        "invalid-expression",
        "to multiply, write w * x",
        model(expression="w(x) + 1"),
    ),
    Mistake(
        "module-function",
        422,
        "invalid-expression",
        "by their bare names: exp(...)",
        model(expression="torch.exp(w * x)"),
    ),
    Mistake(
        "equation",
        422,
        "invalid-expression",
        "write only its right-hand side",
        model(expression="y = w * x + 1"),
    ),
    Mistake(
        "forgotten-param",
        422,
        "shape-mismatch",
        "`b` is not in params, so it is an input the batch must supply; "
        "add it to params to make it a parameter",
        model(expression="w * x + b"),
    ),
    Mistake(
        "forgotten-param-named-inputs",
        422,
        "shape-mismatch",
        "`b` is not in params, so it is an input the batch must supply",
        {**model(expression="w * x + b"), "batch": {"x": {"x": 1}, "y": 3}},
    ),
    # --- params ------------------------------------------------------------------------------
    Mistake(
        "bare-param",
        422,
        "validation-error",
        'write {"value": 1.0}',
        model(params={"w": 1.0}),
        loc=("body", "model", "params", "w"),
    ),
    Mistake(
        "bare-param-list",
        422,
        "validation-error",
        'write {"value": [1.0]}',
        model(params={"w": [1.0]}),
    ),
    # --- names: one sentence with the choices, no union noise --------------------------------
    Mistake(
        "loss-case",
        422,
        "validation-error",
        f"unknown loss 'MSE'; one of: {LOSSES} (names are lower case)",
        step(loss="MSE"),
        loc=("body", "loss"),
    ),
    Mistake(
        "loss-object-case",
        422,
        "validation-error",
        f"unknown loss 'MSE'; one of: {LOSSES}",
        step(loss={"type": "MSE"}),
        loc=("body", "loss", "type"),
    ),
    Mistake("loss-typo", 422, "validation-error", "did you mean 'huber'?", step(loss="hubber")),
    Mistake(
        "loss-bad-delta",
        422,
        "validation-error",
        "greater than 0",
        step(loss={"type": "huber", "delta": -1}),
        loc=("body", "loss", "delta"),
    ),
    Mistake(
        "optimizer-case",
        422,
        "validation-error",
        "unknown optimizer type 'SGD'; one of: sgd, adam, adamw, rmsprop, adagrad "
        "(names are lower case)",
        step(optimizer={"type": "SGD", "lr": 0.1}),
        loc=("body", "optimizer"),
    ),
    Mistake(
        "optimizer-untyped",
        422,
        "validation-error",
        'give "type": one of sgd, adam',
        step(optimizer={"lr": 0.1}),
    ),
    Mistake(
        "model-type",
        422,
        "validation-error",
        "unknown model type 'mlp'; one of: expression, linear, sequential",
        model(type="mlp"),
    ),
    Mistake(
        "layer-type",
        422,
        "validation-error",
        "unknown layer type 'Linear'; one of: linear, relu, tanh, sigmoid, gelu",
        step(model={"type": "sequential", "layers": [{"type": "Linear"}]}),
        loc=("body", "model", "layers", 0),
    ),
    Mistake(
        "init",
        422,
        "validation-error",
        "unknown init 'he'; one of: zeros, ones, normal, uniform, xavier_uniform",
        model(params={"w": {"shape": [1], "init": "he"}}),
        loc=("body", "model", "params", "w", "init"),
    ),
    Mistake(
        "dtype",
        422,
        "validation-error",
        "unknown dtype 'double'; one of: float32, float64, float16, bfloat16",
        model(dtype="double"),
        loc=("body", "model", "dtype"),
    ),
    # --- If-Match: ETags are quoted ------------------------------------------------------------
    Mistake(
        "if-match-number",
        400,
        "invalid-header",
        'If-Match: "3"',
        BATCH,
        "/v1/sessions/{sid}/step",
        headers={"If-Match": "3"},
    ),
    Mistake(
        "if-match-word",
        400,
        "invalid-header",
        'If-Match: "abc"',
        BATCH,
        "/v1/sessions/{sid}/step",
        headers={"If-Match": "abc"},
    ),
    Mistake(
        "if-match-patch",
        400,
        "invalid-header",
        "ETag in double quotes",
        {"name": "n"},
        "/v1/sessions/{sid}",
        "PATCH",
        headers={"If-Match": "3"},
    ),
    Mistake(
        "if-match-bulk",
        400,
        "invalid-header",
        "does not apply to POST /v1/sessions/step",
        {"items": [{"session": "{sid}", **BATCH}]},
        "/v1/sessions/step",
        headers={"If-Match": '"3"'},
    ),
]


@pytest.fixture(scope="module")
def sid(client: TestClient) -> str:
    r = client.post("/v1/sessions", json=SESSION)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _send(client: TestClient, mistake: Mistake, sid: str) -> Any:
    content = json.dumps(mistake.body).replace("{sid}", sid).encode()
    headers = dict(mistake.headers)
    if mistake.status != 415:
        headers["content-type"] = "application/json"
    return client.request(
        mistake.method, mistake.path.format(sid=sid), content=content, headers=headers
    )


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_is_answered_with_what_to_do(
    client: TestClient, sid: str, mistake: Mistake
) -> None:
    problem = assert_problem(_send(client, mistake, sid), mistake.status)
    assert problem["type"] == mistake.type, problem
    assert mistake.hint in problem["detail"], problem
    assert problem["title"] == TITLES[mistake.type], problem
    if mistake.type == "validation-error":
        text = json.dumps(problem["errors"]) + problem["detail"]
        assert not [n for n in NOISE if n in text], problem
    if mistake.loc is not None:
        assert [e["loc"] for e in problem["errors"]] == [list(mistake.loc)], problem


def test_the_mistakes_changed_nothing(client: TestClient, sid: str) -> None:
    got = client.get(f"/v1/sessions/{sid}")
    assert (got.json()["step"], got.json()["name"]) == (0, None), got.text


def test_if_match_compares_strongly(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json=SESSION).json()["id"]
    url = f"/v1/sessions/{sid}/gradients"
    etag = client.get(f"/v1/sessions/{sid}").headers["etag"]
    patch = f"/v1/sessions/{sid}"
    weak = client.patch(patch, json={"name": "weak"}, headers={"If-Match": f"W/{etag}"})
    assert assert_problem(weak, 412)["type"] == "precondition-failed"
    comma = client.patch(patch, json={"name": "comma"}, headers={"If-Match": 'W/"0U,>0"'})
    assert assert_problem(comma, 412)["type"] == "precondition-failed"  # a comma is etagc
    several = client.patch(patch, json={"name": "two"}, headers={"If-Match": f'{etag}, "b:2"'})
    assert "several ETags" in assert_problem(several, 400)["detail"]
    listed = client.patch(patch, json={"name": "one"}, headers={"If-Match": f'W/"a:1", {etag}'})
    assert listed.status_code == 200, listed.text  # the weak tags never match; the strong one does
    anything = client.patch(patch, json={"name": None}, headers={"If-Match": "*"})
    assert anything.status_code == 200, anything.text
    assert client.post(url, json=BATCH).status_code == 200  # reads take no If-Match


def test_one_title_per_problem_type(client: TestClient) -> None:
    """Every problem of one type has one title: the domain errors, the problems the edge
    writes by hand (found in the source), and Starlette's own 404 and 405."""
    titles: dict[str, set[str]] = {}
    classes: list[type[GradsvcError]] = [GradsvcError]
    while classes:
        cls = classes.pop()
        titles.setdefault(cls.type, set()).add(cls.title)
        classes.extend(cls.__subclasses__())
    service = Path(__file__).parents[2] / "service"
    for source in service.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
                "problem",
                "send_problem",
            ):
                args = node.args[1:4] if node.func.id == "send_problem" else node.args[:3]  # type: ignore[attr-defined]
                if len(args) == 3 and all(isinstance(a, ast.Constant) for a in args[1:]):
                    kind, title = args[1].value, args[2].value  # type: ignore[attr-defined]
                    titles.setdefault(kind, set()).add(title)
    unknown = client.get("/v1/no-such-route")
    wrong_method = client.put("/v1/step")
    missing = client.get("/v1/sessions/s_missing")
    hidden = TestClient(client.app, client=("203.0.113.9", 1)).get("/metrics")  # not loopback
    for response in (unknown, wrong_method, missing, hidden):
        problem = assert_problem(response)
        titles.setdefault(problem["type"], set()).add(problem["title"])
    several = {kind: names for kind, names in titles.items() if len(names) > 1}
    assert not several, several
    assert {k: TITLES[k] for k in titles if k in TITLES} == {
        k: next(iter(v)) for k, v in titles.items() if k in TITLES
    }
    assert assert_problem(unknown, 404)["title"] == assert_problem(missing, 404)["title"]
    assert assert_problem(hidden, 404)["title"] == "Not found"
    assert assert_problem(wrong_method, 405)["title"] == "Method not allowed"
