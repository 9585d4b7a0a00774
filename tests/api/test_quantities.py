"""Quantities beyond the gradient over HTTP: their shapes, their encoding, a session left as
it was, and the limits that refuse what cannot or should not be computed."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_problem

NOTEBOOK = {
    "model": {
        "type": "expression",
        "expression": "w * x + 1",
        "params": {"w": {"value": [1.0]}},
        "dtype": "float64",
    },
    "loss": "squared",
    "batch": {"x": [1, 2, 3], "y": [3, 5, 7]},
}
MLP = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 2, "out_features": 3},
            {"type": "tanh"},
            {"type": "linear", "in_features": 3, "out_features": 2},
        ],
        "dtype": "float64",
    },
    "loss": "cross_entropy",
    "batch": {"x": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]], "y": [0, 1, 1, 0]},
}
SHAPES = {"0.weight": [3, 2], "0.bias": [3], "2.weight": [2, 3], "2.bias": [2]}
ALL = [
    "per_sample_grads",
    "per_sample_l2",
    "sum_grad_squared",
    "variance",
    "diag_hessian",
    "diag_ggn",
    "hvp",
    "hessian",
    "jacobian",
]


def _shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def test_every_quantity_with_its_shape(client: TestClient) -> None:
    vector = {
        name: [[1.0] * s[1]] * s[0] if len(s) == 2 else [1.0] * s[0] for name, s in SHAPES.items()
    }
    r = client.post("/v1/gradients", json={**MLP, "quantities": ALL, "vector": vector})
    assert r.status_code == 200, r.text
    body = r.json()
    got = body["quantities"]
    assert list(got) == ALL
    for name, shape in SHAPES.items():
        assert _shape(got["per_sample_grads"][name]) == [4, *shape]
        assert _shape(got["per_sample_l2"][name]) == [4]
        assert _shape(got["jacobian"][name]) == [4, 2, *shape]
        for same in ("sum_grad_squared", "variance", "diag_hessian", "diag_ggn", "hvp"):
            assert _shape(got[same][name]) == shape, same
    assert _shape(got["hessian"]["*"]) == [17, 17]  # 6 + 3 + 6 + 2 parameters
    assert set(body) >= {"loss", "grads", "outputs"}


def test_the_notebook_by_hand(client: TestClient) -> None:
    """gₙ = (ŷₙ − yₙ)·xₙ / N at w = 1: (−1·1, −2·2, −3·3) / 3; summed, the gradient."""
    body = {**NOTEBOOK, "quantities": ["per_sample_grads", "variance"]}
    r = client.post("/v1/gradients", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    per_sample = answer["quantities"]["per_sample_grads"]["w"]
    assert per_sample == [[-1 / 3], [-4 / 3], [-3.0]]
    assert sum(g[0] for g in per_sample) == pytest.approx(answer["grads"]["w"][0], abs=1e-12)
    mean = sum(g[0] for g in per_sample) / 3
    expected = sum(g[0] ** 2 for g in per_sample) / 3 - mean**2
    assert answer["quantities"]["variance"]["w"][0] == pytest.approx(expected, abs=1e-12)


def test_b64_like_grads(client: TestClient) -> None:
    r = client.post(
        "/v1/gradients",
        json={**NOTEBOOK, "quantities": ["per_sample_grads", "hessian"], "encoding": "b64"},
    )
    assert r.status_code == 200, r.text
    got = r.json()["quantities"]
    form = got["per_sample_grads"]["w"]
    assert form["dtype"] == "float64" and form["shape"] == [3, 1]
    assert len(base64.b64decode(form["b64"])) == 3 * 8
    assert got["hessian"]["*"]["shape"] == [1, 1]


def test_a_session_is_left_as_it_was(client: TestClient) -> None:
    created = client.post(
        "/v1/sessions",
        json={"model": NOTEBOOK["model"], "loss": "squared", "optimizer": {"type": "sgd"}},
    )
    assert created.status_code == 201, created.text
    sid, etag = created.json()["id"], created.headers["etag"]
    for quantities in (["per_sample_grads", "diag_hessian", "jacobian"], ["hessian"]):
        r = client.post(
            f"/v1/sessions/{sid}/gradients",
            json={"batch": NOTEBOOK["batch"], "quantities": quantities},
        )
        assert r.status_code == 200, r.text
        assert list(r.json()["quantities"]) == quantities
    refused = client.post(
        f"/v1/sessions/{sid}/gradients",
        json={"batch": NOTEBOOK["batch"], "quantities": ["hvp"], "vector": {"v": [1.0]}},
    )
    assert_problem(refused, 422)
    step = client.post(
        f"/v1/sessions/{sid}/step", json={"batch": NOTEBOOK["batch"], "quantities": ["variance"]}
    )
    assert_problem(step, 422)  # a step answers no quantities: the field is unknown there
    after = client.get(f"/v1/sessions/{sid}")
    assert after.headers["etag"] == etag
    assert after.json()["step"] == 0 and after.json()["params"] == {"w": [1.0]}
    assert client.get(f"/v1/sessions/{sid}/history").json()["items"] == []


LINEAR_4160 = {"type": "linear", "in_features": 64, "out_features": 64}  # 4160 parameters


@pytest.mark.parametrize(
    ("change", "status", "kind", "says"),
    [
        ({"quantities": ["gradient_norm"]}, 422, "validation-error", "per_sample_grads"),
        ({"quantities": ["hvp"]}, 422, "validation-error", "vector"),
        ({"vector": {"w": [1.0]}}, 422, "validation-error", "hvp"),
        ({"quantities": ["hvp"], "vector": {"w": [1.0], "b": [2.0]}}, 422, "shape-mismatch", "b"),
        ({"quantities": ["hvp"], "vector": {"w": [1.0, 2.0]}}, 422, "shape-mismatch", "shape"),
        (
            {"quantities": ["hvp"], "vector": {"w": [[1.0], "x"]}},
            422,
            "invalid-tensor",
            "",
        ),
        (
            {"model": {**LINEAR_4160}, "batch": {"x": [[0.0] * 64], "y": [[0.0] * 64]}},
            422,
            "too-large",
            "--max-hessian-params",
        ),
        (
            {
                "model": {
                    "type": "sequential",
                    "layers": [
                        {"type": "linear", "in_features": 1, "out_features": 2},
                        {"type": "dropout"},
                    ],
                },
                "quantities": ["diag_ggn"],
            },
            422,
            "invalid-spec",
            "dropout",
        ),
        (
            {
                "model": {"type": "linear", "in_features": 1024, "out_features": 1024},
                "batch": {"x": [[0.0] * 1024] * 8, "y": [[0.0] * 1024] * 8},
                "quantities": ["jacobian"],
            },
            422,
            "too-large",
            "quantities",
        ),
    ],
    ids=[
        "unknown-name",
        "hvp-without-vector",
        "vector-without-hvp",
        "vector-unknown-name",
        "vector-wrong-shape",
        "vector-not-a-tensor",
        "hessian-over-limit",
        "dropout-second-order",
        "over-the-budget",
    ],
)
def test_refused(
    client: TestClient, change: dict[str, Any], status: int, kind: str, says: str
) -> None:
    body = {**NOTEBOOK, "quantities": ["hessian"], **change}
    if body["model"]["type"] != "expression":
        body["loss"] = "mse"
        body.setdefault("batch", NOTEBOOK["batch"])
        if "batch" not in change:
            body["batch"] = {"x": [[1.0], [2.0]], "y": [[1.0, 0.0], [0.0, 1.0]]}
    problem = assert_problem(client.post("/v1/gradients", json=body), status)
    assert problem["type"].endswith(kind), problem
    assert says in problem["detail"], problem
