"""The remembered session estimate: keyed by everything the estimate reads, equal to it."""

from __future__ import annotations

from service.engine import budget, specs
from service.engine.limits import Limits


def _spec(hidden: int) -> str:
    return specs.SessionSpec.model_validate(
        {
            "model": {
                "type": "sequential",
                "layers": [
                    {"type": "linear", "in_features": 4, "out_features": hidden},
                    {"type": "tanh"},
                    {"type": "linear", "in_features": hidden, "out_features": 1},
                ],
            },
            "loss": "mse",
            "optimizer": {"type": "adam", "lr": 0.01},
        }
    ).model_dump_json()


def _batch(rows: int, b64: bool = False) -> specs.Batch:
    if b64:
        x = {"dtype": "float32", "shape": [rows, 4], "b64": "A" * 4}
        return specs.Batch.model_construct(x=x, y=[[0.0]] * rows)
    return specs.Batch.model_construct(x=[[0.0] * 4] * rows, y=[[0.0]] * rows)


def test_remembered_estimate_equals_the_estimate_and_follows_rows_and_spec() -> None:
    limits = Limits()
    text = _spec(8)
    parsed = specs.SessionSpec.model_validate_json(text)
    for rows in (3, 5):
        for b64 in (False, True):
            batch = _batch(rows, b64)
            assert budget.session_of("step", text, batch, limits) == budget.session(
                "step", parsed, batch, limits
            )
    # same spec, other rows: another estimate; another spec, same shapes: another one
    small, large = (budget.session_of("step", text, _batch(n), limits) for n in (3, 300))
    assert small is not None and large is not None and small.total < large.total
    wider = budget.session_of("step", _spec(64), _batch(3), limits)
    assert wider is not None and wider.total > small.total
    budget._session_by_shapes.cache_clear()
    for _ in range(3):
        budget.session_of("step", text, _batch(3), limits)
    info = budget._session_by_shapes.cache_info()
    assert (info.hits, info.misses) == (2, 1) and info.maxsize is not None
