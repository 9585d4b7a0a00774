"""The notebook over HTTP: API.md's curl, its second step, and the chain rule explained."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def test_first_step_is_the_notebooks(client: TestClient, seed_step: dict[str, Any]) -> None:
    r = client.post("/v1/step", json=seed_step)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loss"] == 0.5
    assert body["grads"] == {"w": [-1.0]}
    assert body["params"] == {"w": [1.1]}
    assert body["outputs"] == 2.0
    assert "trace" not in body


def test_second_step_is_the_notebooks(client: TestClient, seed_step: dict[str, Any]) -> None:
    seed_step["model"]["params"]["w"]["value"] = [1.1]
    seed_step["batch"] = {"x": 2, "y": 5}
    body = client.post("/v1/step", json=seed_step).json()
    # Bit for bit what torch computes in the notebook (1.62 and -3.6 to float64 rounding).
    assert body["outputs"] == 3.2
    assert body["loss"] == 1.6199999999999997
    assert body["grads"] == {"w": [-3.5999999999999996]}
    assert body["params"] == {"w": [1.46]}


def test_explain_shows_the_chain_rule(client: TestClient, seed_step: dict[str, Any]) -> None:
    seed_step["explain"] = True
    body = client.post("/v1/step", json=seed_step).json()
    nodes = {n["node"]: n for n in body["trace"]}
    y_hat = nodes["w * x + 1"]
    assert y_hat["value"] == 2.0  # ŷ = 2
    assert y_hat["grad"] == -1.0  # dL/dŷ = ŷ − y = −1
    assert nodes["w * x"]["local"]["w"] == [1.0]  # dŷ/dw = x = 1 (through w·x, d(w·x+1)/d(w·x) = 1)
    assert y_hat["local"]["w * x"] == 1.0
    assert nodes["w"]["grad"] == [-1.0]  # dL/dw = −1 · 1
    assert nodes["w"]["value"] == [1.0]  # shown as it was before the update
    assert body["trace"][-1]["node"] == "loss"
    assert body["trace"][-1]["value"] == 0.5
    assert body["trace"][-1]["inputs"] == ["w * x + 1", "y"]
    order = [n["node"] for n in body["trace"]]
    assert order.index("w * x") < order.index("w * x + 1") < order.index("loss")


def test_gradients_and_forward_give_the_same_numbers(
    client: TestClient, seed_step: dict[str, Any]
) -> None:
    seed_step.pop("optimizer")
    grads = client.post("/v1/gradients", json=seed_step).json()
    assert grads["loss"] == 0.5 and grads["grads"] == {"w": [-1.0]} and grads["outputs"] == 2.0
    assert "params" not in grads
    forward = {"model": seed_step["model"], "batch": {"x": [1, 2, 3]}}
    assert client.post("/v1/forward", json=forward).json() == {"outputs": [2.0, 3.0, 4.0]}
