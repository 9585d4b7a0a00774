"""Over HTTP the three tensor forms give identical answers; "encoding": "b64" answers in b64."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

X = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
Y = np.array([[0.5], [-1.0], [2.0], [0.25]])


def _form(array: np.ndarray, form: str, dtype: str) -> Any:
    if form == "list":
        return array.tolist()
    if form == "data":
        return {"dtype": "float64", "shape": list(array.shape), "data": array.ravel().tolist()}
    raw = array.astype(dtype).tobytes()
    return {"dtype": dtype, "shape": list(array.shape), "b64": base64.b64encode(raw).decode()}


def _request(form: str, dtype: str) -> dict[str, Any]:
    return {
        "model": {
            "type": "sequential",
            "dtype": dtype,
            "layers": [
                {"type": "linear", "in_features": 3, "out_features": 5},
                {"type": "tanh"},
                {"type": "linear", "in_features": 5, "out_features": 1},
            ],
            "seed": 7,
        },
        "loss": "mse",
        "optimizer": {"type": "adam", "lr": 0.01},
        "batch": {"x": _form(X, form, dtype), "y": _form(Y, form, dtype)},
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_three_forms_give_identical_results(client: TestClient, dtype: str) -> None:
    answers = [
        client.post("/v1/step", json=_request(f, dtype)).json() for f in ("list", "data", "b64")
    ]
    assert "loss" in answers[0], answers[0]
    assert answers[0] == answers[1] == answers[2]


def _decode(wire: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(wire["b64"])
    return np.frombuffer(raw, dtype=wire["dtype"]).reshape(wire["shape"])


def test_b64_encoding_answers_in_b64(client: TestClient) -> None:
    listed = client.post("/v1/step", json=_request("list", "float64")).json()
    body = {**_request("list", "float64"), "encoding": "b64", "explain": True}
    answer = client.post("/v1/step", json=body).json()
    assert answer["loss"] == listed["loss"]
    assert set(answer["grads"]) == set(listed["grads"])
    for name, wire in answer["params"].items():
        assert set(wire) == {"dtype", "shape", "b64"}
        np.testing.assert_array_equal(_decode(wire), np.asarray(listed["params"][name]))
    for name, wire in answer["grads"].items():
        np.testing.assert_array_equal(_decode(wire), np.asarray(listed["grads"][name]))
    np.testing.assert_array_equal(_decode(answer["outputs"]), np.asarray(listed["outputs"]))
    for node in answer["trace"]:
        assert set(node["value"]) == {"dtype", "shape", "b64"}


def test_several_named_inputs(client: TestClient) -> None:
    body = {
        "model": {
            "type": "expression",
            "expression": "a * u + b * v",
            "params": {"a": {"value": 2.0}, "b": {"value": -1.0}},
            "dtype": "float64",
        },
        "batch": {"x": {"u": [1, 2], "v": {"shape": [2], "data": [3, 4]}}},
    }
    assert client.post("/v1/forward", json=body).json() == {"outputs": [-1.0, 0.0]}
