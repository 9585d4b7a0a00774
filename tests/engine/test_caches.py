"""The engine's per-request caches give the answers the uncached path gives, byte for byte.

A parsed expression is remembered by its text and limits (``expression.parsed``): another
text or other limits must parse afresh, a refusal must be raised every time, and a model
built from a remembered expression must hold its own fresh parameters, so two requests
that share one parse each get the answer a cold cache gives.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from service.engine import expression, seed
from service.engine.limits import DEFAULT_LIMITS
from service.engine.specs import StepRequest
from service.engine.step import run
from service.errors import ExpressionError, SpecError


def _answer(body: dict[str, Any]) -> bytes:
    return json.dumps(run("step", StepRequest.model_validate(body)), sort_keys=True).encode()


def _body(text: str = "w * x + 1", dtype: str = "float64", **params: Any) -> dict[str, Any]:
    body = copy.deepcopy(seed.SEED_STEP)
    body["model"]["expression"] = text
    body["model"]["dtype"] = dtype
    if params:
        body["model"]["params"] = params
    return body


def test_the_same_text_is_parsed_once_and_another_text_misses() -> None:
    expression._parsed.cache_clear()
    first = expression.parsed("w * x + 1")
    assert expression.parsed("w * x + 1") is first
    other = expression.parsed("w * x + 2")
    assert other is not first and other.root.text == "w * x + 2"
    tighter = dataclasses.replace(DEFAULT_LIMITS, expression_nodes=50)
    assert expression.parsed("w * x + 1", tighter) is not first
    assert expression._parsed.cache_info().misses == 3


def test_a_refusal_is_raised_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ExpressionError, match=r"\*\*"):
            expression.parsed("w ^ 2")


@pytest.mark.parametrize(
    "body",
    [
        _body(),
        _body("w * x + 2"),
        _body(dtype="float32"),
        _body("w * x + b", w={"value": [1.0]}, b={"value": 0.5}),
        _body("tanh(w * x) * b", dtype="float32", w={"value": 0.3}, b={"value": 2.0}),
    ],
    ids=["seed", "other-text", "float32", "more-params", "tanh-float32"],
)
def test_two_requests_sharing_a_parse_each_get_the_uncached_answer(body: dict[str, Any]) -> None:
    expression._parsed.cache_clear()
    cold = _answer(body)  # a miss: parsed afresh
    warm = [_answer(body) for _ in range(2)]  # hits: one shared Expression, fresh parameters
    assert expression._parsed.cache_info().hits >= 2
    assert warm == [cold, cold]


def test_a_changed_param_set_or_dtype_gets_its_own_answer() -> None:
    seed_answer = json.loads(_answer(_body()))
    with_b = json.loads(_answer(_body("w * x + b", w={"value": [1.0]}, b={"value": 1.0})))
    assert set(with_b["params"]) == {"w", "b"} and set(seed_answer["params"]) == {"w"}
    with pytest.raises(SpecError, match="not used"):
        run("step", StepRequest.model_validate(_body(w={"value": [1.0]}, b={"value": 1.0})))
    float32 = json.loads(_answer(_body(dtype="float32")))
    assert float32["loss"] == pytest.approx(seed_answer["loss"])
