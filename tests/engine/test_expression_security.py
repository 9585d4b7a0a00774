"""Sandbox escapes and resource exhaustion against the expression grammar: all refused.

Every entry of ``REFUSED`` must be rejected twice over: by ``parse`` (an ``ExpressionError``,
never another exception, never a hang) and over HTTP (a 422 problem of type
``invalid-expression``, never a 500). A few positive controls make sure the corpus is not
passing because the parser refuses everything.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.engine.expression import parse
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.errors import ExpressionError
from tests.conftest import assert_problem

LIMITS = DEFAULT_LIMITS
# Generous for a CI machine; a parse that gets near it is a resource problem in itself.
PARSE_SECONDS = 1.0
HTTP_SECONDS = 10.0


def _balanced(leaves: int) -> str:
    """A balanced ``+`` tree over ``leaves`` x's: 2*leaves - 1 nodes, depth ~log2(leaves)."""
    if leaves == 1:
        return "x"
    half = leaves // 2
    return f"({_balanced(half)}+{_balanced(leaves - half)})"


# 255 nodes, about 500 characters and 8 levels: well inside every limit but the node count.
_TREE_255 = _balanced(128)

REFUSED: list[tuple[str, str]] = [
    # --- imports, builtins, introspection -------------------------------------------------
    ("dunder-import", "__import__('os')"),
    ("dunder-import-system", "__import__('os').system('id')"),
    ("subclasses", "().__class__.__bases__[0].__subclasses__()"),
    ("list-class", "[].__class__.__mro__[1].__subclasses__()"),
    ("attribute-dunder-class", "x.__class__"),
    ("attribute-chain", "x.grad.data.numpy"),
    ("attribute-call", "x.numpy()"),
    ("attribute-on-call", "exp(x).real"),
    ("torch-attribute", "torch.exp(x)"),
    ("function-globals", "exp.__globals__"),
    ("os-system", "os.system('id')"),
    ("open", "open('/etc/passwd')"),
    ("eval", "eval('1')"),
    ("exec", "exec('import os')"),
    ("compile", "compile('1', 'f', 'eval')"),
    ("getattr", "getattr(x, 'grad')"),
    ("globals", "globals()"),
    ("locals", "locals()"),
    ("vars", "vars()"),
    ("breakpoint", "breakpoint()"),
    ("type", "type(x)"),
    ("print", "print(x)"),
    ("input", "input()"),
    ("unknown-function", "max(x)"),
    ("builtins-name", "__builtins__"),
    ("dunder-name", "__class__"),
    ("dunder-debug", "__debug__"),
    ("private-name", "_private"),
    ("private-in-expr", "w * _x + 1"),
    ("function-as-name", "exp + 1"),
    # --- calls outside the one-positional-argument form -----------------------------------
    ("exp-two-args", "exp(x, y)"),
    ("exp-no-args", "exp()"),
    ("starred-arg", "sum(*x)"),
    ("double-starred-arg", "sum(**x)"),
    ("keyword-arg", "sum(x, dim=0)"),
    ("keyword-only", "sum(input=x)"),
    ("call-of-call", "exp(x)(y)"),
    ("call-of-subscript", "x[0](y)"),
    # --- functions, comprehensions, assignment --------------------------------------------
    ("lambda", "lambda: 1"),
    ("lambda-called", "(lambda q: q)(x)"),
    ("list-comprehension", "[x for x in y]"),
    ("set-comprehension", "{x for x in y}"),
    ("dict-comprehension", "{x: x for x in y}"),
    ("generator-expression", "(x for x in y)"),
    ("generator-in-call", "sum(x for x in y)"),
    ("walrus", "(a:=1)"),
    ("walrus-in-call", "exp(a := x)"),
    # --- literals that are not finite numbers ---------------------------------------------
    ("f-string", "f'{x}'"),
    ("f-string-escape", "f'{().__class__}'"),
    ("string", "'os'"),
    ("string-hex-escapes", "'\\x5f\\x5fimport\\x5f\\x5f'"),
    ("bytes", "b'os'"),
    ("complex", "1j"),
    ("complex-in-expr", "x * 2j"),
    ("true", "True"),
    ("false-in-expr", "x + False"),
    ("none", "None"),
    ("ellipsis", "..."),
    ("tuple", "(x, y)"),
    ("empty-tuple", "()"),
    ("list", "[x]"),
    ("set", "{x}"),
    ("dict", "{1: 2}"),
    ("float-overflow", "1e999"),
    ("float-overflow-in-expr", "x * 1e999"),
    ("int-overflows-float", "1" + "0" * 400),
    ("huge-int-5000-digits", "9" * 5000),
    # --- subscripts ------------------------------------------------------------------------
    ("subscript", "x[0]"),
    ("slice", "x[0:1]"),
    ("subscript-ellipsis", "x[...]"),
    # --- operators outside + - * / ** @ and unary + - -------------------------------------
    ("conditional", "sum(x) if x else y"),
    ("compare-lt", "x < 1"),
    ("compare-eq", "x == y"),
    ("compare-chain", "0 < x < 1"),
    ("compare-is", "x is None"),
    ("compare-in", "x in y"),
    ("bool-and", "x and y"),
    ("bool-or", "x or y"),
    ("not", "not x"),
    ("invert", "~x"),
    ("lshift", "x << 2"),
    ("rshift", "x >> 2"),
    ("bitand", "x & y"),
    ("bitor", "x | y"),
    ("bitxor", "x ^ y"),
    ("mod", "x % 2"),
    ("floordiv", "x // 2"),
    # --- statements and injection ---------------------------------------------------------
    ("import", "import os"),
    ("from-import", "from os import system"),
    ("assign", "x = 1"),
    ("augassign", "x += 1"),
    ("semicolon", "x; y"),
    ("semicolon-import", "x; __import__('os')"),
    ("del", "del x"),
    ("assert", "assert x"),
    ("raise", "raise x"),
    ("pass", "pass"),
    ("def", "def f(): pass"),
    ("class", "class A: pass"),
    ("global", "global x"),
    ("newline-injection", "x\n__import__('os')"),
    ("crlf-injection", "x\r\n__import__('os')"),
    ("line-continuation", "x + \\\n1"),
    ("vertical-tab", "x\x0b+ 1"),
    ("form-feed", "x\x0c+ 1"),
    ("yield", "yield x"),
    ("yield-parenthesised", "(yield x)"),
    ("yield-from", "(yield from x)"),
    ("await", "await x"),
    ("star-bare", "*x"),
    # --- characters: NUL, non-ASCII lookalikes --------------------------------------------
    ("nul", "x\x00"),
    ("nul-in-name", "__import__\x00('os')"),
    ("nul-only", "\x00"),
    ("fullwidth-exp", "\uff45\uff58\uff50(x)"),  # NFKC folds it to exp
    ("fullwidth-underscores", "\uff3f\uff3fimport\uff3f\uff3f('os')"),  # NFKC: __import__
    ("cyrillic-e", "\u0435xp(x)"),
    ("greek-omicron-os", "\u03bfs"),
    ("zero-width-space", "x\u200b+ 1"),
    ("ligature-fi", "\ufb01"),
    ("nbsp", "x\u00a0+ 1"),
    ("rtl-override", "x\u202e+ 1"),
    ("unicode-minus", "x \u2212 1"),
    # --- empty --------------------------------------------------------------------------------
    ("empty", ""),
    ("blank", "   \t "),
    # --- resource exhaustion ----------------------------------------------------------------
    ("too-long", "x+" * 500 + "x"),
    ("just-over-length", "x" * (LIMITS.expression_length + 1)),
    ("nested-parentheses-10000", "(" * 10_000 + "x" + ")" * 10_000),
    ("nested-brackets-10000", "[" * 10_000),
    ("unbalanced-open-parentheses", "(" * 500),
    ("parentheses-just-over-depth", "(" * 33 + "x" + ")" * 33),
    ("calls-just-over-depth", "exp(" * 33 + "x" + ")" * 33),
    ("unary-just-over-depth", "-" * 33 + "x"),
    ("operator-chain-over-depth", "+".join(["x"] * 40)),
    ("power-tower-over-depth", "**".join(["x"] * 40)),
    ("nodes-257", f"exp(sum({_TREE_255}))"),
    ("operator-chain-long", "+".join(["(x+x)"] * 150)),
]

ACCEPTED: list[tuple[str, str, dict[str, Any]]] = [
    ("seed", "w * x + 1", {"w": [1.0], "x": [1.0]}),
    ("sigmoid-matmul", "sigmoid(w @ x + b)", {"w": [1.0, 2.0], "x": [3.0, 4.0], "b": 0.5}),
    ("sum-of-squares", "sum((w*x - 1)**2)", {"w": [1.0, 2.0], "x": [3.0, 4.0]}),
    ("every-function", "exp(log(sqrt(abs(sin(cos(tanh(relu(softplus(mean(x))))))))))", {"x": 1.0}),
    ("parentheses-at-depth", "(" * 32 + "x" + ")" * 32, {"x": 1.0}),
    ("unary-at-depth", "-" * 31 + "x", {"x": 1.0}),
    ("nodes-256", f"sum({_TREE_255})", {"x": 1.0}),
    ("tab", "x\t+ 1", {"x": 1.0}),
    ("exact-length", "x" * LIMITS.expression_length, {"x" * LIMITS.expression_length: 1.0}),
]

assert len(REFUSED) >= 40
assert len({name for name, _ in REFUSED}) == len(REFUSED), "duplicate case ids"


def _forward(client: TestClient, expression: str, x: Any = 1.0) -> Any:
    body = {"model": {"type": "expression", "expression": expression}, "batch": {"x": x}}
    return client.post("/v1/forward", json=body)


@pytest.mark.parametrize("text", [t for _, t in REFUSED], ids=[n for n, _ in REFUSED])
def test_parser_refuses(text: str) -> None:
    start = time.monotonic()
    with pytest.raises(ExpressionError) as info:
        parse(text)
    assert time.monotonic() - start < PARSE_SECONDS
    assert info.value.status == 422
    assert info.value.type == "invalid-expression"
    assert "Traceback" not in info.value.detail


@pytest.mark.parametrize("text", [t for _, t in REFUSED], ids=[n for n, _ in REFUSED])
def test_http_refuses(client: TestClient, text: str) -> None:
    start = time.monotonic()
    response = _forward(client, text)
    assert time.monotonic() - start < HTTP_SECONDS
    body = assert_problem(response, 422)
    assert body["type"] == "invalid-expression", body
    assert body["errors"][0]["loc"] == ["body", "model", "expression"], body
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("text", "x"), [(t, x) for _, t, x in ACCEPTED], ids=[n for n, _, _ in ACCEPTED]
)
def test_positive_controls_are_accepted(client: TestClient, text: str, x: Any) -> None:
    expression = parse(text)
    assert expression.size <= LIMITS.expression_nodes
    response = _forward(client, text, x)
    assert response.status_code == 200, response.text
    assert "outputs" in response.json()


def test_limits_are_the_documented_ones() -> None:
    # The corpus is sized against these; if they move, the boundary cases must move too.
    assert LIMITS.expression_length == 1_000
    assert LIMITS.expression_depth == 32
    assert LIMITS.expression_nodes == 256


def test_nesting_is_refused_before_pythons_parser_even_when_length_allows_it() -> None:
    # With the length limit out of the way, 10,000 open brackets would drive ast.parse into
    # its recursion limit (or worse); the bracket count must stop it first, and cheaply.
    roomy = Limits(expression_length=100_000)
    start = time.monotonic()
    with pytest.raises(ExpressionError, match="deeper"):
        parse("(" * 10_000 + "x" + ")" * 10_000, roomy)
    with pytest.raises(ExpressionError, match="deeper"):
        parse("-(" * 10_000 + "x" + ")" * 10_000, roomy)
    assert time.monotonic() - start < PARSE_SECONDS


def test_unary_chains_are_bounded_even_when_length_allows_them() -> None:
    roomy = Limits(expression_length=100_000)
    start = time.monotonic()
    with pytest.raises(ExpressionError):
        parse("-" * 50_000 + "x", roomy)
    assert time.monotonic() - start < 5 * PARSE_SECONDS


def test_huge_integer_literal_is_refused_even_when_length_allows_it() -> None:
    # 5000 digits is past CPython's int-string conversion limit (4300): an error either way,
    # but it must be an ExpressionError, never a ValueError escaping the parser.
    with pytest.raises(ExpressionError):
        parse("9" * 5000, Limits(expression_length=10_000))
    with pytest.raises(ExpressionError):
        parse("x * " + "9" * 5000, Limits(expression_length=10_000))


def test_node_limit_is_enforced_within_the_length_limit() -> None:
    text = f"exp(sum({_TREE_255}))"
    assert len(text) <= LIMITS.expression_length
    with pytest.raises(ExpressionError, match="nodes"):
        parse(text)
    assert parse(f"sum({_TREE_255})").size == LIMITS.expression_nodes


def test_power_tower_parses_but_does_not_hang_or_500(client: TestClient) -> None:
    # 9**9**9 is grammatical: the constants are floats, never Python ints raised to a power,
    # so parsing is instant; evaluating it in float32 gives inf, which JSON cannot carry.
    start = time.monotonic()
    expression = parse("9**9**9")
    assert time.monotonic() - start < PARSE_SECONDS
    assert expression.root.op == "pow"
    start = time.monotonic()
    response = _forward(client, "x * 9**9**9")
    assert time.monotonic() - start < HTTP_SECONDS
    body = assert_problem(response, 422)
    assert body["type"] == "non-finite", body


def test_power_tower_without_inputs_does_not_hang_or_500(client: TestClient) -> None:
    start = time.monotonic()
    response = _forward(client, "9**9**9**9**9", {})
    assert time.monotonic() - start < HTTP_SECONDS
    body = assert_problem(response, 422)
    assert body["type"] == "non-finite", body


def test_non_string_expression_is_a_validation_error(client: TestClient) -> None:
    for value in (123, None, ["x"], {"__class__": 1}):
        response = client.post(
            "/v1/forward",
            json={"model": {"type": "expression", "expression": value}, "batch": {"x": 1}},
        )
        body = assert_problem(response, 422)
        assert body["type"] == "validation-error", body


def test_parse_refuses_non_strings() -> None:
    for value in (123, None, b"x", ["x"]):
        with pytest.raises(ExpressionError):
            parse(value)  # type: ignore[arg-type]
