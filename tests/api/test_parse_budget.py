"""A request's share of the parse budget goes back as soon as its body is parsed: the
budget bounds bodies being received and parsed, not computations."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import SEED_STEP


def test_the_share_goes_back_once_the_body_is_parsed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app: Any = client.app
    budget, pool = app.state.parse_budget, app.state.pool
    held: list[int] = []
    stateless = pool.stateless

    async def computing(*args: Any, **kwargs: Any) -> Any:
        held.append(budget.used)  # what is held while this request computes
        return await stateless(*args, **kwargs)

    monkeypatch.setattr(pool, "stateless", computing)
    padded = client.post(
        "/v1/step",
        content=b" " * 100_000 + json.dumps(SEED_STEP).encode(),
        headers={"content-type": "application/json"},
    )
    assert padded.status_code == 200, padded.text
    assert held == [0]
    assert budget.used == 0


def test_a_small_body_is_admitted_even_when_large_ones_hold_the_whole_budget() -> None:
    """Bob's large bodies may spend the budget; Alice's ordinary request still gets in."""
    from service.api.parsebudget import SMALL, ParseBudget

    budget = ParseBudget(1024 * 1024)
    assert budget.lease().take(1024 * 1024)  # Bob's: the whole budget
    assert not budget.lease().take(SMALL + 1)
    assert budget.lease().take(300)  # Alice's step
    grows = budget.lease()
    assert grows.take(SMALL) and not grows.take(1)  # small only while it stays small
