"""An update that overflows its dtype is a 422 ``non-finite`` naming the likely cause, and
changes nothing: alone (a session's step, as a worker runs it) and in a batch of sessions."""

from __future__ import annotations

from typing import Any

import pytest

from service.engine import specs
from service.errors import NonFinite, SpecError
from tests.engine.test_batching import (
    assert_same_result,
    assert_same_session,
    batched,
    build,
    reloaded,
    unbatched,
)

GOOD = ([[0.5, -1.0]], [[1.0]])


def _spec(optimizer: dict[str, Any], seed: int = 0) -> specs.SessionSpec:
    model = {"type": "linear", "in_features": 2, "out_features": 1, "seed": seed}
    return specs.SessionSpec.model_validate(
        {"model": {**model, "dtype": "float32"}, "loss": "mse", "optimizer": optimizer}
    )


@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        ({"type": "sgd", "lr": 1e308}, "lr=1e+308"),
        ({"type": "sgd", "lr": 0.1, "weight_decay": 1e300}, "weight_decay=1e+300"),
        ({"type": "rmsprop", "lr": 0.1, "alpha": 1e300}, "alpha=1e+300"),
    ],
)
def test_a_hyper_parameter_beyond_float32_is_non_finite_naming_it(
    optimizer: dict[str, Any], named: str
) -> None:
    """torch cannot cast such a number to float32 and raised, once a 500."""
    sessions = [build(_spec(optimizer, seed=i)) for i in range(3)]
    before = [reloaded(s) for s in sessions]
    alone = unbatched("step", sessions[0], *GOOD)
    assert isinstance(alone, NonFinite), alone
    assert named in alone.detail and "float32" in alone.detail and "(lr)" in alone.detail
    got = batched("step", sessions, [GOOD] * 3)
    for i, (session, snapshot) in enumerate(zip(sessions, before, strict=True)):
        assert_same_result(got[i], alone, f"entry {i}")
        assert_same_session(session, snapshot, f"entry {i}")


def test_an_initial_accumulator_beyond_float32_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="initial_accumulator_value=1e\\+300 is beyond"):
        build(_spec({"type": "adagrad", "initial_accumulator_value": 1e300}))


def test_a_square_that_overflows_is_refused_like_a_parameter() -> None:
    """Adagrad's sum of squares overflows while the parameters stay finite: committed, it
    would be a session that can never be restored. Entry 1's step is refused as it is
    alone, the others go through, and entry 1 is as it was."""
    group = [_spec({"type": "adagrad", "lr": 0.1}, seed=i) for i in range(3)]
    batch = [GOOD, ([[1e15, 1e15]], [[1.0]]), GOOD]
    mine, theirs = [build(s) for s in group], [build(s) for s in group]
    snapshot = reloaded(mine[1])
    got = batched("step", mine, batch)
    for i, (session, (x, y)) in enumerate(zip(theirs, batch, strict=True)):
        want = unbatched("step", session, x, y)
        assert isinstance(want, NonFinite) == (i == 1), want
        assert_same_result(got[i], want, f"entry {i}")
        assert_same_session(mine[i], session, f"entry {i}")
    assert isinstance(got[1], NonFinite)
    assert "the optimizer's sum of weight not finite" in got[1].detail
    assert_same_session(mine[1], snapshot, "the refused entry")
    assert_same_session(reloaded(mine[1]), snapshot, "the refused entry, reloaded")
