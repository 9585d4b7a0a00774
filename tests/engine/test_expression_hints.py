"""An expression outside the grammar is refused with the spelling that is inside it, and
the spelling it suggests is accepted."""

from __future__ import annotations

import re

import pytest

from service.engine.expression import parse
from service.errors import ExpressionError

FUNCTIONS = "the functions are abs, cos, exp, log, mean, relu, sigmoid, sin, softplus, sqrt"

CASES = [
    # (text, a substring of the refusal, the text it suggests, if it suggests a whole one)
    ("w * x^2 + 1", "use ** for powers, write 'w * x**2 + 1'", "w * x**2 + 1"),
    ("w * x² + 1", "write 'w * x**2 + 1'", "w * x**2 + 1"),
    ("w × x − 1", "write 'w * x - 1'", "w * x - 1"),
    ("2w + 1", "to multiply, write 2 * w", None),
    ("2.5w", "write 2.5 * w", None),
    ("w x + 1", "w x needs an operator; to multiply, write w * x", None),
    ("(w + 1)x", "write (...) * x", None),
    ("max(w, x)", f"unknown function 'max'; {FUNCTIONS}", None),
    ("w(x) + 1", "unknown function 'w'; the functions are abs", None),
    ("w(x) + 1", "to multiply, write w * x", None),
    ("2(x + 1)", "to multiply, write 2 * (x + 1)", None),
    ("(w + 1)(x + 1)", "write (w + 1) * (x + 1)", None),
    ("torch.exp(x)", "call functions by their bare names: exp(...), not torch.exp(...)", None),
    ("np.maximum(x, w)", "np.maximum(...) is not allowed; the functions are abs", None),
    ("Exp(x)", "names are lower case, exp(...)", None),
    ("ln(x)", "write log(x)", None),
    ("pow(x, 2)", "write x ** y", None),
    ("w.x + 1", "for a product write w * x (or w @ x for a matrix product)", None),
    ("x // 2", "the operator // is not allowed in an expression: use / to divide", None),
    ("x % 2", "the operator % is not allowed", None),
    ("x[0] * w", "indexing (x[i]) is not allowed", None),
    ("w, x", "one formula, not several separated by commas", None),
    ("x < w", "comparisons are not allowed", None),
    ("y = w * x + 1", "write only its right-hand side", None),
]


@pytest.mark.parametrize(("text", "hint", "suggested"), CASES, ids=[c[0] for c in CASES])
def test_a_refusal_says_what_to_write(text: str, hint: str, suggested: str | None) -> None:
    with pytest.raises(ExpressionError) as refused:
        parse(text)
    assert hint in refused.value.detail
    if suggested is not None:
        assert parse(suggested).names  # what it suggests is in the grammar


def test_a_suggestion_never_echoes_much_of_the_text() -> None:
    long = "x^" + "w + " * 240 + "1"  # within the length limit, so the hint is what refuses it
    with pytest.raises(ExpressionError) as refused:
        parse(long)
    assert len(refused.value.detail) < 300
    assert re.search(r"use \*\* for powers", refused.value.detail)
