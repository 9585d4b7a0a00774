"""The count of a JSON body's arrays before it is decoded: no valid request refused, every
over-size array refused, and the refusal located in the body."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from service.api import bodyscan
from service.api.bodyscan import check_arrays
from service.errors import TensorError


def _array(rng: random.Random, numbers: int) -> Any:
    """``numbers`` numbers as a flat or nested array (no empty array), or the data form."""
    flat = [rng.choice([0, 1.5, -2e-3, 12345678901, 3]) for _ in range(numbers)]
    kind = rng.choice(["flat", "rows", "data"])
    if kind == "rows" and numbers % 2 == 0 and numbers:
        return [flat[i : i + 2] for i in range(0, numbers, 2)]
    if kind == "data":
        return {"dtype": "float32", "shape": [numbers], "data": flat}
    return flat


def _request(rng: random.Random) -> tuple[dict[str, Any], int]:
    """A request-like body with several tensors among other members; the most numbers in
    any one of its tensors."""
    sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
    inputs = {f"in{i}": _array(rng, n) for i, n in enumerate(sizes)}
    body = {
        "model": {
            "type": "expression",
            "expression": "sum(w * in0) + 1 : 2, {3}",  # punctuation in a string counts for nothing
            "params": {"w": {"value": _array(rng, rng.randint(1, 40))}, "b": {"shape": [2, 3]}},
            "frozen": ["b"],
        },
        "batch": {"x": inputs, "y": _array(rng, rng.randint(1, 40))},
        "items": [{"session": "s", "batch": {"x": _array(rng, 3)}} for _ in range(3)],
        "optimizer": {"type": "adam", "lr": 0.01, "betas": [0.9, 0.999]},
    }
    return body, _most_numbers(body)


def _most_numbers(node: Any) -> int:
    """The reference count: the most numbers in one array value, nested arrays included."""
    if isinstance(node, dict):
        return max((_most_numbers(v) for v in node.values()), default=0)
    if isinstance(node, list):
        if all(isinstance(v, int | float | list) for v in node):
            inner = [v for v in node if isinstance(v, list)]
            numbers = len(node) - len(inner) + sum(_numbers(v) for v in inner)
            return max(numbers, *(_most_numbers(v) for v in node))
        return max((_most_numbers(v) for v in node), default=0)
    return 0


def _numbers(node: Any) -> int:
    return sum(_numbers(v) for v in node) if isinstance(node, list) else 1


def test_a_tensor_at_the_limit_passes_and_one_over_it_is_refused() -> None:
    rng = random.Random(11)
    for case in range(200):
        body, most = _request(rng)
        text = json.dumps(body, indent=rng.choice([None, 2])).encode()
        check_arrays(text, most)  # every array within the limit: never refused
        if most < 3:
            continue
        try:  # the count may be one more or one less than the elements ("about")
            check_arrays(text, most - 2)
        except TensorError:
            continue
        pytest.fail(f"case {case}: an array of {most} numbers passed a limit of {most - 2}")


def _refusal(body: Any, limit: int = 10) -> TensorError:
    with pytest.raises(TensorError) as caught:
        check_arrays(json.dumps(body).encode(), limit)
    assert f"the limit is {limit}" in caught.value.detail
    return caught.value


BIG = [1.5] * 50


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"model": {"type": "linear"}, "batch": {"x": BIG, "y": [1]}}, ("batch", "x")),
        ({"batch": {"x": [BIG[:25], BIG[:25]]}}, ("batch", "x")),
        ({"batch": {"x": {"dtype": "float32", "shape": [50], "data": BIG}}}, ("batch", "x")),
        ({"batch": {"x": {"data": BIG}}}, ("batch", "x", "data")),  # an input named "data"
        ({"model": {"params": {"w": {"value": BIG}}}}, ("model", "params", "w", "value")),
        ({"items": [{"batch": {"x": [1]}}, {"batch": {"x": BIG}}]}, ("items", 1, "batch", "x")),
        ({"dataset": {"x": [1], "y": BIG}}, ("dataset", "y")),
    ],
)
def test_the_refusal_points_at_the_array(body: Any, loc: tuple[str | int, ...]) -> None:
    error = _refusal(body)
    assert error.loc == loc
    assert error.type == "invalid-tensor"


def test_an_array_in_a_large_rest_is_refused_by_its_byte_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bodyscan, "_LOCATE", 100)  # the rest is too large to parse for a path
    error = _refusal({"name": "n" * 200, "batch": {"x": BIG}})
    assert error.loc == ()
    assert "near byte" in error.detail


def test_large_arrays_across_chunks_are_counted_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodyscan, "_CHUNK", 7)  # every stretch crosses chunk boundaries
    body = {"a": [1] * 9, "b": {"c": [2] * 10}, "d": [3] * 8}
    check_arrays(json.dumps(body).encode(), 10)
    assert _refusal({**body, "e": [4] * 13}).loc == ("e",)


def test_a_body_with_few_commas_is_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(body: bytes) -> None:
        raise AssertionError("scanned")

    monkeypatch.setattr(bodyscan, "_largest_stretch", fail)
    check_arrays(b'{"x": [1, 2, 3], "b64": "' + b"A" * 10_000 + b'"}', 10)


def test_b64_tensors_and_strings_do_not_count() -> None:
    b64 = {"dtype": "float32", "shape": [1000], "b64": "AAAA" * 1000}
    check_arrays(json.dumps({"batch": {"x": b64}, "name": "a:b{c}" * 100}).encode(), 10)
