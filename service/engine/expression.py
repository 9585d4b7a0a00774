"""Expression models: client text parsed into a tree of whitelisted torch operations.

The text is never evaluated. It is measured (length, bracket depth) before Python's parser
sees it, parsed with ``ast.parse(mode="eval")``, and then every node is checked against an
allowlist: numbers, names, ``+ - * / ** @``, unary ``-``/``+``, and calls of the functions in
``FUNCTIONS`` by bare name with one positional argument. No attributes, subscripts,
keywords, comparisons, lambdas, comprehensions or names starting with ``_``. Constants
become floats and must be finite. The tree is then bounded in depth and node count.

A refusal says what to write instead (``x^2``: use ``**``; ``2w``: write ``2 * w``): see
``engine.hints``.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from service.engine import hints
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.errors import ExpressionError, short

Fn = Callable[..., torch.Tensor]

BINARY: dict[type[ast.operator], tuple[str, Fn]] = {
    ast.Add: ("add", torch.add),
    ast.Sub: ("sub", torch.sub),
    ast.Mult: ("mul", torch.mul),
    ast.Div: ("div", torch.div),
    ast.Pow: ("pow", torch.pow),
    ast.MatMult: ("matmul", torch.matmul),
}
UNARY: dict[type[ast.unaryop], tuple[str, Fn]] = {
    ast.USub: ("neg", torch.neg),
    ast.UAdd: ("pos", torch.positive),
}
FUNCTIONS: dict[str, Fn] = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "softplus": F.softplus,
    "sum": torch.sum,
    "mean": torch.mean,
}
NOT_ELEMENTWISE = frozenset({"matmul", "sum", "mean"})
_OPS: dict[str, Fn] = {
    **dict(BINARY.values()),
    **dict(UNARY.values()),
    **FUNCTIONS,
}


@dataclass(frozen=True)
class Node:
    """One node of a parsed expression; ``text`` is its canonical source."""

    op: str  # "name", "const", or a key of _OPS
    text: str
    children: tuple[Node, ...] = ()
    constant: float = 0.0

    @property
    def elementwise(self) -> bool:
        return self.op not in NOT_ELEMENTWISE

    def apply(self, *args: torch.Tensor) -> torch.Tensor:
        return _OPS[self.op](*args)

    def shape(self, *shapes: Sequence[int]) -> tuple[int, ...]:
        """The shape this node computes from arguments of ``shapes``, without computing it:
        broadcasting for elementwise operations (numpy's rules, torch's too, a tenth of
        ``torch.broadcast_shapes``'s time), torch's own rules on meta tensors for the rest.
        ValueError or RuntimeError if they do not fit."""
        if self.elementwise:
            return tuple(np.broadcast_shapes(*(tuple(s) for s in shapes)))
        return tuple(self.apply(*(torch.empty(tuple(s), device="meta") for s in shapes)).shape)


@dataclass(frozen=True)
class Expression:
    root: Node
    names: tuple[str, ...]
    """Every name the expression uses, in order of first appearance."""
    size: int = field(default=0)


def parse(text: str, limits: Limits = DEFAULT_LIMITS) -> Expression:
    """Parse and check ``text``; raise ExpressionError for anything outside the grammar."""
    if not isinstance(text, str):
        raise ExpressionError("the expression must be a string")
    if len(text) > limits.expression_length:
        raise ExpressionError(
            f"expression is {len(text)} characters long; the limit is {limits.expression_length}"
        )
    if not text.strip():
        raise ExpressionError("the expression is empty")
    if not text.isascii() or any(not (c.isprintable() or c in " \t") for c in text):
        raise ExpressionError(hints.non_ascii(text))
    _check_brackets(text, limits.expression_depth)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExpressionError(hints.syntax(text, getattr(exc, "msg", str(exc)))) from None
    builder = _Builder(limits, text)
    root = builder.build(tree.body, 1)
    return Expression(root=root, names=tuple(builder.names), size=builder.count)


@functools.lru_cache(maxsize=1024)
def _parsed(text: str, limits: Limits) -> Expression:
    return parse(text, limits)


def parsed(text: str, limits: Limits = DEFAULT_LIMITS) -> Expression:
    """``parse``, remembered by text and limits: a session's (and a repeated stateless
    request's) expression is parsed and checked once, not at every step. The Expression is
    immutable (frozen dataclasses and tuples), so every model built from it may share it; a
    refusal is not remembered and is raised afresh each time.

    Args:
        text: The client's expression.
        limits: The limits it is checked against.

    Returns:
        The parsed, checked expression.

    Raises:
        ExpressionError: for anything outside the grammar or over the limits.
    """
    if not isinstance(text, str):  # unhashable or not text: parse says what is wrong
        return parse(text, limits)
    return _parsed(text, limits)


def _check_brackets(text: str, max_depth: int) -> None:
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
            if depth > max_depth:
                raise ExpressionError(f"expression nests deeper than {max_depth} levels")
        elif char in ")]}":
            depth -= 1


class _Builder:
    def __init__(self, limits: Limits, source: str) -> None:
        self.limits, self.source = limits, source
        self.names: list[str] = []
        self.count = 0

    def build(self, node: ast.AST, depth: int) -> Node:
        self.count += 1
        if self.count > self.limits.expression_nodes:
            raise ExpressionError(f"expression has more than {self.limits.expression_nodes} nodes")
        if depth > self.limits.expression_depth:
            raise ExpressionError(
                f"expression nests deeper than {self.limits.expression_depth} levels"
            )
        text = ast.unparse(node)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            op = BINARY[type(node.op)][0]
            left, right = self.build(node.left, depth + 1), self.build(node.right, depth + 1)
            return Node(op, text, (left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            return Node(UNARY[type(node.op)][0], text, (self.build(node.operand, depth + 1),))
        if isinstance(node, ast.Call):
            return self._call(node, text, depth)
        if isinstance(node, ast.Name):
            return self._name(node.id, text)
        if isinstance(node, ast.Constant):
            return self._constant(node.value, text)
        raise ExpressionError(hints.construct(node, self.source, sorted(FUNCTIONS)))

    def _call(self, node: ast.Call, text: str, depth: int) -> Node:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise ExpressionError(hints.call(node, sorted(FUNCTIONS)))
        name = node.func.id
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise ExpressionError(f"{name}() takes exactly one positional argument")
        return Node(name, text, (self.build(node.args[0], depth + 1),))

    def _name(self, name: str, text: str) -> Node:
        if name.startswith("_"):
            raise ExpressionError(f"names may not start with '_': {short(name)}")
        if name in FUNCTIONS:
            raise ExpressionError(f"{short(name)} is a function; call it as {name}(...)")
        if name not in self.names:
            self.names.append(name)
        return Node("name", text)

    def _constant(self, value: object, text: str) -> Node:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ExpressionError(f"only numeric constants are allowed, not {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ExpressionError(f"constant {text[:40]} is too large")
        return Node("const", text, constant=number)
