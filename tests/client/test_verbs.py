"""The client's accumulate and apply, sync and async, against the package's one server."""

from __future__ import annotations

from typing import Any

import pytest
from gradsvc_client import Accumulated, Applied, ConflictError

from tests.client.test_client import MODES, NOTEBOOK, SGD, aw, run
from tests.e2e.server import Server


@pytest.mark.parametrize("mode", MODES)
def test_accumulate_twice_then_apply_their_mean(server: Server, mode: str) -> None:
    async def scenario(gs: Any) -> None:
        s = await aw(gs.create_session(NOTEBOOK, "squared", SGD))
        first = await aw(gs.accumulate(s, 1, 3, if_match=s, idempotency_key=f"acc-{mode}"))
        again = await aw(gs.accumulate(s, 1, 3, idempotency_key=f"acc-{mode}"))
        assert isinstance(first, Accumulated) and first.accumulated == 1 and again.replayed
        second = await aw(gs.accumulate(s, 1, 3, if_match=first.etag))
        assert second.accumulated == 2 and second.grads["w"].tolist() == [-1.0]
        applied = await aw(gs.apply(s, scale=0.5, if_match=second.etag))
        assert isinstance(applied, Applied)
        assert (applied.step, applied.applied, applied.loss) == (1, 2, 0.5)
        assert applied.params["w"].tolist() == [1.1]
        with pytest.raises(ConflictError) as empty:
            await aw(gs.apply(s))
        assert empty.value.problem["type"] == "nothing-accumulated"

    run(mode, server.url, scenario)
