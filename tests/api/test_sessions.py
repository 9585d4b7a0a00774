"""Sessions over HTTP: the notebook kept on the server, ETags, idempotency, checkpoints."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from tests.conftest import SEED_STEP, assert_problem

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}


@pytest.fixture
def session(client: TestClient) -> dict[str, Any]:
    r = client.post("/v1/sessions", json={**copy.deepcopy(SEED_SESSION), "name": "notebook"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_the_notebook_over_a_session(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    assert session["step"] == 0 and session["params"] == {"w": [1.0]}
    first = client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}).json()
    assert (first["step"], first["loss"], first["params"]) == (1, 0.5, {"w": [1.1]})
    second = client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 2, "y": 5}}).json()
    assert second["step"] == 2
    assert second["outputs"] == 3.2 and second["loss"] == 1.6199999999999997
    assert second["grads"] == {"w": [-3.5999999999999996]} and second["params"] == {"w": [1.46]}
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["step"] == 2 and got["params"] == {"w": [1.46]}
    history = client.get(f"/v1/sessions/{sid}/history").json()
    assert [(h["step"], h["loss"]) for h in history["items"]] == [(1, 0.5), (2, 1.6199999999999997)]
    assert history["next"] is None


def test_create_answers_201_location_and_etag(client: TestClient, session: dict[str, Any]) -> None:
    r = client.get(f"/v1/sessions/{session['id']}")
    assert r.headers["etag"] == f'"{session["id"]}:1"'
    assert session["name"] == "notebook" and session["device"] == "cpu"
    assert session["model"]["expression"] == "w * x + 1"
    r = client.post("/v1/sessions", json=SEED_SESSION)
    assert r.headers["location"] == f"/v1/sessions/{r.json()['id']}"


def test_gradients_and_forward_change_nothing(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    grads = client.post(f"/v1/sessions/{sid}/gradients", json={"batch": {"x": 1, "y": 3}}).json()
    assert grads["grads"] == {"w": [-1.0]} and "params" not in grads
    assert client.post(f"/v1/sessions/{sid}/forward", json={"batch": {"x": [1, 2]}}).json() == {
        "outputs": [2.0, 3.0]
    }
    got = client.get(f"/v1/sessions/{sid}")
    assert got.json()["step"] == 0 and got.headers["etag"] == f'"{sid}:1"'


def test_explain_in_a_session(client: TestClient, session: dict[str, Any]) -> None:
    body = {"batch": {"x": 1, "y": 3}, "explain": True}
    trace = client.post(f"/v1/sessions/{session['id']}/step", json=body).json()["trace"]
    nodes = {n["node"]: n for n in trace}
    assert nodes["w * x + 1"]["grad"] == -1.0 and nodes["w"]["grad"] == [-1.0]


def test_idempotency_key_replays_and_applies_once(
    client: TestClient, session: dict[str, Any]
) -> None:
    sid = session["id"]
    url = f"/v1/sessions/{sid}/step"
    headers = {"Idempotency-Key": "step-1"}
    first = client.post(url, json={"batch": {"x": 1, "y": 3}}, headers=headers)
    again = client.post(url, json={"batch": {"x": 1, "y": 3}}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["etag"] == first.headers["etag"]
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1
    other = client.post(url, json={"batch": {"x": 2, "y": 5}}, headers=headers)
    assert assert_problem(other, 422)["type"] == "idempotency-key-reused"
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_idempotency_is_checked_before_if_match(
    client: TestClient, session: dict[str, Any]
) -> None:
    """A retried step that already applied replays rather than failing with 412."""
    sid = session["id"]
    headers = {"Idempotency-Key": "retry-me", "If-Match": f'"{sid}:1"'}
    first = client.post(
        f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}, headers=headers
    )
    retry = client.post(
        f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}, headers=headers
    )
    assert first.status_code == 200 and retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"


def test_if_match(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    url = f"/v1/sessions/{sid}/step"
    ok = client.post(url, json={"batch": {"x": 1, "y": 3}}, headers={"If-Match": f'"{sid}:1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == f'"{sid}:2"'
    stale = client.post(url, json={"batch": {"x": 1, "y": 3}}, headers={"If-Match": f'"{sid}:1"'})
    assert assert_problem(stale, 412)["type"] == "precondition-failed"
    stale = client.patch(
        f"/v1/sessions/{sid}", json={"name": "x"}, headers={"If-Match": f'"{sid}:1"'}
    )
    assert_problem(stale, 412)
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_idempotent_create_and_stateless_calls(client: TestClient) -> None:
    headers = {"Idempotency-Key": "create-once"}
    a = client.post("/v1/sessions", json=SEED_SESSION, headers=headers)
    b = client.post("/v1/sessions", json=SEED_SESSION, headers=headers)
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] == b.json()["id"] and b.headers["idempotent-replayed"] == "true"
    s1 = client.post("/v1/step", json=SEED_STEP, headers={"Idempotency-Key": "stateless"})
    s2 = client.post("/v1/step", json=SEED_STEP, headers={"Idempotency-Key": "stateless"})
    assert s1.json() == s2.json() and s2.headers["idempotent-replayed"] == "true"
    bad = client.post("/v1/step", json=SEED_STEP, headers={"Idempotency-Key": "x" * 256})
    assert_problem(bad, 422)


def test_concurrent_retries_apply_once(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    answers: list[Any] = []

    def send() -> None:
        r = client.post(
            f"/v1/sessions/{sid}/step",
            json={"batch": {"x": 1, "y": 3}},
            headers={"Idempotency-Key": "together"},
        )
        answers.append((r.status_code, r.json()["step"]))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [(200, 1)] * 6
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_patch(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    r = client.patch(
        f"/v1/sessions/{sid}",
        json={"name": "renamed", "optimizer": {"lr": 0.5}, "params": {"w": [2.0]}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "renamed" and body["optimizer"]["lr"] == 0.5
    assert body["params"] == {"w": [2.0]} and r.headers["etag"] == f'"{sid}:2"'
    step = client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}).json()
    assert step["params"] == {"w": [2.0 - 0.5 * 0.0]}  # ŷ = 3 = y: no gradient
    for bad in (
        {"optimizer": {"type": "adam"}},
        {"optimizer": {"lr": -1}},
        {"params": {"nope": [1.0]}},
        {"params": {"w": [1.0, 2.0]}},
        {"unknown": 1},
    ):
        assert_problem(client.patch(f"/v1/sessions/{sid}", json=bad), 422)
    assert client.get(f"/v1/sessions/{sid}").json()["params"] == step["params"]


def test_non_finite_step_changes_nothing(client: TestClient) -> None:
    spec = copy.deepcopy(SEED_SESSION)
    spec["optimizer"] = {"type": "sgd", "lr": 1e308}
    sid = client.post("/v1/sessions", json=spec).json()["id"]
    r = client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1e3, "y": -1e3}})
    assert assert_problem(r, 422)["type"] == "non-finite"
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["step"] == 0 and got["params"] == {"w": [1.0]} and got["version"] == 1


def test_a_learning_rate_beyond_float32_is_non_finite_and_changes_nothing(
    client: TestClient,
) -> None:
    """torch cannot cast lr=1e308 to float32: once a 500 on every step of the session."""
    spec = copy.deepcopy(SEED_SESSION)
    spec["model"]["dtype"] = "float32"
    spec["optimizer"] = {"type": "sgd", "lr": 1e308}
    sid = client.post("/v1/sessions", json=spec).json()["id"]
    r = client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}})
    problem = assert_problem(r, 422)
    assert problem["type"] == "non-finite"
    assert "lr=1e+308 is beyond what float32 can hold" in problem["detail"], problem
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["step"] == 0 and got["params"] == {"w": [1.0]} and got["version"] == 1


def test_delete(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    for r in (
        client.get(f"/v1/sessions/{sid}"),
        client.delete(f"/v1/sessions/{sid}"),
        client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}),
        client.get(f"/v1/sessions/{sid}/history"),
        client.get(f"/v1/sessions/{sid}/checkpoint"),
    ):
        assert assert_problem(r, 404)["type"] == "not-found"


@pytest.mark.parametrize("bad", ["..", "a/b", "%2e%2e", "x" * 65, "s_" + "é", "a b"])
def test_odd_ids_are_not_found(client: TestClient, bad: str) -> None:
    assert_problem(client.get(f"/v1/sessions/{bad}"), 404)


def test_pagination(client: TestClient) -> None:
    made = {client.post("/v1/sessions", json=SEED_SESSION).json()["id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/sessions", params=params).json()
        assert len(page["items"]) <= 2
        seen += [s["id"] for s in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert made <= set(seen) and len(seen) == len(set(seen))
    assert_problem(client.get("/v1/sessions", params={"cursor": "garbage!"}), 422)
    assert_problem(client.get("/v1/sessions", params={"limit": 0}), 422)


def test_history_pagination(client: TestClient, session: dict[str, Any]) -> None:
    sid = session["id"]
    for _ in range(5):
        client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}})
    page = client.get(f"/v1/sessions/{sid}/history", params={"limit": 3}).json()
    assert [h["step"] for h in page["items"]] == [1, 2, 3]
    rest = client.get(f"/v1/sessions/{sid}/history", params={"cursor": page["next"]}).json()
    assert [h["step"] for h in rest["items"]] == [4, 5] and rest["next"] is None


ADAM_MLP = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 3, "out_features": 4},
            {"type": "tanh"},
            {"type": "linear", "in_features": 4, "out_features": 1},
        ],
        "dtype": "float64",
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.05},
}


def test_checkpoint_and_restore(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json=ADAM_MLP).json()["id"]
    batch = {"x": [[1, 2, 3], [0, -1, 2]], "y": [1, -1]}
    for _ in range(3):
        client.post(f"/v1/sessions/{sid}/step", json={"batch": batch})
    ck = client.get(f"/v1/sessions/{sid}/checkpoint")
    assert ck.status_code == 200 and ck.headers["content-type"] == "application/octet-stream"
    tensors = load(ck.content)
    assert {"param.0.weight", "opt.0.exp_avg", "opt.0.step"} <= set(tensors)
    restored = client.post(
        "/v1/sessions/restore",
        content=ck.content,
        headers={"content-type": "application/octet-stream"},
    )
    assert restored.status_code == 201, restored.text
    rid = restored.json()["id"]
    assert rid != sid and restored.json()["step"] == 3
    a = client.post(f"/v1/sessions/{sid}/step", json={"batch": batch}).json()
    b = client.post(f"/v1/sessions/{rid}/step", json={"batch": batch}).json()
    assert a["params"] == b["params"] and a["step"] == b["step"] == 4


def _tampered(content: bytes, **changes: Any) -> bytes:
    tensors = load(content)
    header_len = int.from_bytes(content[:8], "little")
    import json

    metadata = json.loads(content[8 : 8 + header_len])["__metadata__"]
    for key, value in changes.items():
        if key == "tensors":
            tensors = value(tensors)
        else:
            metadata[key] = value
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    "change",
    [
        {"gradsvc.spec": "{not json"},
        {"gradsvc.spec": '{"model": {"type": "eval", "code": "os.system(1)"}}'},
        {"gradsvc.session": '{"step": -1}'},
        {"gradsvc.session": '{"step": 1, "extra": true}'},
        {"optimizer_extra": "[1, 2]"},
        {"tensors": lambda t: {k: v for k, v in t.items() if k != "param.0.weight"}},
        {"tensors": lambda t: {**t, "param.0.weight": torch.zeros(9, 9, dtype=torch.float64)}},
        {"tensors": lambda t: {**t, "param.0.weight": t["param.0.weight"].float()}},
        {
            "tensors": lambda t: {
                **t,
                "param.0.bias": torch.full((4,), float("nan"), dtype=torch.float64),
            }
        },
        {"tensors": lambda t: {**t, "opt.99.exp_avg": torch.zeros(1)}},
        {"tensors": lambda t: {**t, "opt.0.exp_avg": torch.zeros(7, dtype=torch.float64)}},
    ],
)
def test_restore_refuses_a_checkpoint_that_lies(client: TestClient, change: dict[str, Any]) -> None:
    sid = client.post("/v1/sessions", json=ADAM_MLP).json()["id"]
    client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": [[1, 2, 3]], "y": [1]}})
    content = client.get(f"/v1/sessions/{sid}/checkpoint").content
    before = len(client.get("/v1/sessions", params={"limit": 500}).json()["items"])
    r = client.post("/v1/sessions/restore", content=_tampered(content, **change))
    assert_problem(r, 422)
    assert len(client.get("/v1/sessions", params={"limit": 500}).json()["items"]) == before


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"]
)
def test_restore_refuses_garbage(client: TestClient, content: bytes) -> None:
    assert_problem(client.post("/v1/sessions/restore", content=content), 422)


def test_cuda_without_cuda_is_refused(client: TestClient) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = client.post("/v1/sessions", json={**SEED_SESSION, "device": "cuda"})
    assert "CUDA" in assert_problem(r, 422)["detail"]
