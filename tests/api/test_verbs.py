"""The training verbs over HTTP (the shared in-process app on SQLite): the documented
answers, nothing-accumulated, Idempotency-Key replays without adding twice, If-Match, and
bad bodies refused with nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.api import examples
from tests.conftest import SEED_STEP, assert_problem

SEED = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}  # w = 1, SGD, lr 0.1
FIRST = {"batch": {"x": 1, "y": 3}}


def create(client: TestClient) -> str:
    r = client.post("/v1/sessions", json=SEED)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def verb(client: TestClient, sid: str, name: str, body: Any, **headers: str) -> Any:
    return client.post(f"/v1/sessions/{sid}/{name}", json=body, headers=headers)


def test_the_documented_answers_and_nothing_accumulated(client: TestClient) -> None:
    sid = create(client)
    assert_problem(verb(client, sid, "apply", {}), 409)["type"].endswith("nothing-accumulated")
    r = verb(client, sid, "accumulate", FIRST)
    assert r.status_code == 200, r.text
    assert r.json() == examples.SESSION_ACCUMULATE["first"]
    session = client.get(f"/v1/sessions/{sid}").json()
    assert (session["step"], session["version"], session["params"]) == (0, 2, {"w": [1.0]})
    r = verb(client, sid, "apply", {})
    assert r.json() == examples.SESSION_APPLY["sum"]
    rows = client.get(f"/v1/sessions/{sid}/history").json()["items"]
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 0.5)]
    problem = assert_problem(verb(client, sid, "apply", {}), 409)  # the accumulator is empty
    assert problem["type"].endswith("nothing-accumulated") and "accumulate" in problem["detail"]


def test_an_idempotency_key_replays_an_accumulate_without_adding_twice(
    client: TestClient,
) -> None:
    sid = create(client)
    first = verb(client, sid, "accumulate", FIRST, **{"Idempotency-Key": "acc-1"})
    again = verb(client, sid, "accumulate", FIRST, **{"Idempotency-Key": "acc-1"})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json() and first.json()["accumulated"] == 1
    assert verb(client, sid, "accumulate", FIRST).json()["accumulated"] == 2
    applied = verb(client, sid, "apply", {"scale": 0.5}, **{"Idempotency-Key": "apply-1"})
    replayed = verb(client, sid, "apply", {"scale": 0.5}, **{"Idempotency-Key": "apply-1"})
    assert replayed.json() == applied.json() and applied.json()["step"] == 1
    assert applied.json()["params"] == {"w": [1.1]}  # the mean of two equal gradients: -1
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_if_match_stale_is_412_and_changes_nothing(client: TestClient) -> None:
    sid = create(client)
    ok = verb(client, sid, "accumulate", FIRST, **{"If-Match": f'"{sid}:1"'})
    assert ok.status_code == 200, ok.text
    stale = verb(client, sid, "accumulate", FIRST, **{"If-Match": f'"{sid}:1"'})
    assert_problem(stale, 412)
    assert_problem(verb(client, sid, "apply", {}, **{"If-Match": f'"{sid}:1"'}), 412)
    assert verb(client, sid, "apply", {}, **{"If-Match": ok.headers["ETag"]}).json()["applied"] == 1


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("accumulate", {"batch": {"x": 1, "y": 3}, "grad_outputs": 1.0}),
        ("accumulate", {"batch": {"x": 1}, "grad_outputs": [1.0, 2.0]}),
        (
            "accumulate",
            {"batch": {"x": 1}, "grad_outputs": {"dtype": "float64", "shape": [], "data": ["NaN"]}},
        ),
        ("accumulate", {"batch": {"x": 1, "y": [3, 4]}}),
        ("apply", {"scale": "half"}),
        ("apply", {"scale": 1, "extra": True}),
    ],
    ids=["both", "grad-outputs-shape", "grad-outputs-nan", "shape", "scale", "extra"],
)
def test_a_bad_body_is_422_and_changes_nothing(client: TestClient, name: str, body: Any) -> None:
    sid = create(client)
    if name == "apply":
        verb(client, sid, "accumulate", FIRST)
    before = client.get(f"/v1/sessions/{sid}").json()
    problem = assert_problem(verb(client, sid, name, body), 422)
    assert problem["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == before["version"]


LINEAR = {
    "type": "linear",
    "in_features": 3,
    "out_features": 2,
    "dtype": "float64",
    "params": {
        "weight": {"value": [[0.5, -0.25, 0.125], [-0.5, 0.75, 0.25]]},
        "bias": {"value": [0.1, -0.2]},
    },
}
OPTIMIZERS = {"sgd": {"type": "sgd", "lr": 0.1}, "adam": {"type": "adam", "lr": 0.01}}


def log_cosh(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss the service does not have: the client's own, sent as dL/doutputs."""
    return torch.log(torch.cosh(outputs - target)).sum()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_outputs_and_y_batches_then_apply_equal_torchs_backward_calls(
    client: TestClient, name: str
) -> None:
    spec = {"model": LINEAR, "loss": "mse", "optimizer": OPTIMIZERS[name]}
    r = client.post("/v1/sessions", json=spec)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    params = {k: torch.tensor(v["value"], dtype=torch.float64) for k, v in LINEAR["params"].items()}
    w, b = (params[k].requires_grad_() for k in ("weight", "bias"))
    opt = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(
        [w, b], lr=OPTIMIZERS[name]["lr"]
    )
    gen = torch.Generator().manual_seed(7)
    # Round 1 mixes a batch with y and one with grad_outputs; round 2 has grad_outputs only.
    for with_y in ([True, False], [False]):
        opt.zero_grad(set_to_none=True)
        for use_y in with_y:
            x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
            t = torch.randn(2, 2, generator=gen, dtype=torch.float64)
            out = torch.nn.functional.linear(x, w, b)
            if use_y:
                mse = torch.nn.functional.mse_loss(out, t)
                mse.backward()
                body: dict[str, Any] = {"batch": {"x": x.tolist(), "y": t.tolist()}}
            else:
                mine = out.detach().requires_grad_()
                (g,) = torch.autograd.grad(log_cosh(mine, t), mine)
                out.backward(g)
                body = {"batch": {"x": x.tolist()}, "grad_outputs": g.tolist()}
            r = verb(client, sid, "accumulate", body)
            assert r.status_code == 200, r.text
            assert ("loss" in r.json()) is use_y
            torch.testing.assert_close(
                torch.tensor(r.json()["outputs"], dtype=torch.float64),
                out.detach(),
                rtol=1e-12,
                atol=1e-12,
            )
        opt.step()
        applied = verb(client, sid, "apply", {})
        assert applied.status_code == 200, applied.text
        want = mse.item() if True in with_y else None  # the mean of the batches with y
        assert applied.json()["loss"] == want
        for k, v in (("weight", w), ("bias", b)):
            got = torch.tensor(applied.json()["params"][k], dtype=torch.float64)
            torch.testing.assert_close(got, v.detach(), rtol=1e-12, atol=1e-12)
    rows = client.get(f"/v1/sessions/{sid}/history").json()["items"]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["loss"] is not None and rows[1]["loss"] is None
