"""A session with a convolutional net, over HTTP: it steps, and a batch that does not fit is
a shape-mismatch that names the layer."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import assert_problem

CONV_NET = {
    "type": "sequential",
    "layers": [
        {
            "type": "conv1d",
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": "same",
        },
        {"type": "relu"},
        {"type": "max_pool1d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "in_features": 6, "out_features": 1},
    ],
}


def test_a_conv_net_session_steps(client: TestClient) -> None:
    r = client.post(
        "/v1/sessions", json={"model": CONV_NET, "loss": "mse", "optimizer": {"type": "sgd"}}
    )
    assert r.status_code == 201, r.text
    session = r.json()
    assert set(session["params"]) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    x = [[[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, -1.0, 0.5]]] * 3
    r = client.post(
        f"/v1/sessions/{session['id']}/step", json={"batch": {"x": x, "y": [[1.0]] * 3}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 1
    assert r.json()["params"]["0.weight"] != session["params"]["0.weight"]
    r = client.post(
        f"/v1/sessions/{session['id']}/step", json={"batch": {"x": [[[1.0]]], "y": [[1.0]]}}
    )
    problem = assert_problem(r, 422)
    assert problem["type"].endswith("shape-mismatch")
    assert "layer 0 (conv1d) takes [N, 2, L]" in problem["detail"]
