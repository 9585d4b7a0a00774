"""What a learner most likely meant by an expression that is outside the grammar.

Each function looks at text or an ``ast`` node that ``expression.parse`` has refused and
returns the sentence to add to the refusal: the usual spelling from maths or another
language (``x^2``, ``2w``, ``x²``, ``w(x)``, ``torch.exp(x)``) turned into this grammar's.
Nothing here evaluates anything: the text is only tokenized and the tree only unparsed.
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from typing import Any

from service.errors import short

GRAMMAR = (
    "an expression uses numbers, names, + - * / ** @, unary -, parentheses, and the "
    "functions {functions}"
)

# Characters a formula copied from a text book or a chat carries, and what to type instead.
LOOKALIKES: dict[str, str] = {
    "²": "**2",
    "³": "**3",
    "×": "*",
    "·": "*",
    "⋅": "*",
    "∗": "*",
    "−": "-",
    "–": "-",
    "÷": "/",
    "\u00a0": " ",
}
# Other names for the allowed functions, and the operator some names stand for.
ALIASES: dict[str, str] = {
    "ln": "log(x)",
    "log10": "log(x) / log(10)",
    "pow": "x ** y",
    "square": "x ** 2",
    "sqr": "x ** 2",
    "logistic": "sigmoid(x)",
    "expit": "sigmoid(x)",
    "fabs": "abs(x)",
}
OPERATORS: dict[type[Any], tuple[str, str]] = {
    ast.BitXor: ("^", "use ** for powers"),
    ast.FloorDiv: ("//", "use / to divide"),
    ast.Mod: ("%", "there is no remainder operator"),
    ast.BitAnd: ("&", ""),
    ast.BitOr: ("|", ""),
    ast.LShift: ("<<", ""),
    ast.RShift: (">>", ""),
    ast.Invert: ("~", ""),
    ast.Not: ("not", ""),
    ast.And: ("and", ""),
    ast.Or: ("or", ""),
}


def non_ascii(text: str) -> str:
    """The refusal of a character outside printable ASCII, with the text as it should be."""
    bad = next(c for c in text if not c.isascii() or not (c.isprintable() or c in " \t"))
    where = text.index(bad)
    if all(c.isascii() or c in LOOKALIKES for c in text) and bad in LOOKALIKES:
        fixed = "".join(LOOKALIKES.get(c, c) for c in text)
        if fixed.isprintable():
            return (
                f"the expression may use printable ASCII characters only: {bad!r} at "
                f"position {where}; write {short(fixed, 120)}"
            )
    return (
        f"the expression may use printable ASCII characters only: {short(bad)} at position "
        f"{where} (powers are written x ** 2, products w * x)"
    )


def syntax(text: str, message: str) -> str:
    """The refusal of text that Python's parser rejects: its message, and the likely fix."""
    tokens = _tokens(text)
    for before, after in zip(tokens, tokens[1:], strict=False):
        if _operand_end(before) and _operand_start(after):
            written = text[before.start[1] : after.end[1]]  # one line: parse() refuses others
            return (
                f"not a valid expression: {_cut(written, 40)} needs an operator; "
                f"to multiply, write {_left(before)} * {_cut(after.string, 20)}"
            )
    if any(t.type == tokenize.OP and t.string == "=" for t in tokens):
        return (
            "not a valid expression: it is a formula, not an equation or an assignment; "
            "write only its right-hand side, e.g. w * x + 1"
        )
    return f"not a valid expression: {message}"


def _left(token: tokenize.TokenInfo) -> str:
    return "(...)" if token.string == ")" else _cut(token.string, 20)


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    kinds = (tokenize.NAME, tokenize.NUMBER, tokenize.OP)
    found: list[tokenize.TokenInfo] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in kinds:
                found.append(token)
    except (tokenize.TokenError, SyntaxError):
        pass  # what was read so far is all there is to go on
    return found


def _operand_end(token: tokenize.TokenInfo) -> bool:
    if token.type == tokenize.OP:
        return token.string == ")"
    return token.type == tokenize.NUMBER or not keyword.iskeyword(token.string)


def _operand_start(token: tokenize.TokenInfo) -> bool:
    if token.type == tokenize.OP:
        return False  # "w (x)" is a call, refused with its own hint
    return token.type == tokenize.NUMBER or not keyword.iskeyword(token.string)


def operator(node: ast.AST, text: str) -> str:
    """The refusal of an operator outside ``+ - * / ** @``; ``text`` is the whole expression."""
    op = getattr(node, "op", None)
    symbol, advice = OPERATORS.get(type(op), (type(op).__name__, ""))
    if isinstance(op, ast.BitXor):
        advice = f"{advice}, write {short(text.replace('^', '**'), 120)}"
    advice = f": {advice}" if advice else ""
    return (
        f"the operator {symbol} is not allowed in an expression{advice}; "
        "the operators are + - * / ** @"
    )


def call(node: ast.Call, functions: list[str]) -> str:
    """The refusal of a call of something other than an allowed function by its bare name."""
    names = ", ".join(functions)
    listed = f"the functions are {names}"
    func, args = node.func, node.args
    if isinstance(func, ast.Attribute):
        if func.attr in functions:
            return (
                f"call functions by their bare names: {func.attr}(...), not "
                f"{_cut(ast.unparse(func), 40)}(...)"
            )
        return f"{_cut(ast.unparse(func), 40)}(...) is not allowed; {listed}"
    if isinstance(func, ast.Name):
        name = func.id
        if name.lower() in functions:
            return f"unknown function {short(name)}: names are lower case, {name.lower()}(...)"
        hint = f"unknown function {short(name)}; {listed}"
        if name in ALIASES:
            return f"{hint}: write {ALIASES[name]}"
        if len(args) == 1 and not node.keywords:
            return f"{hint}; to multiply, write {_product(func, args[0])}"
        return hint
    only = f"only the functions {names} can be called, by their bare names"
    if len(args) == 1 and not node.keywords:
        return f"to multiply, write {_product(func, args[0])}; {only}"
    return only


def _product(left: ast.expr, right: ast.expr) -> str:
    def operand(node: ast.expr) -> str:
        text = ast.unparse(node)
        return text if isinstance(node, ast.Name | ast.Constant) else f"({text})"

    return _cut(f"{operand(left)} * {operand(right)}", 80)


def _cut(text: str, limit: int) -> str:
    """Client text inside a sentence: a little of it, never a megabyte."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def construct(tree: ast.AST, text: str, functions: list[str]) -> str:
    """The refusal of any other kind of node (``text`` is the whole expression): what it
    is, and what to write instead."""
    grammar = GRAMMAR.format(functions=", ".join(functions))
    if isinstance(tree, ast.Attribute):
        part, value = _cut(ast.unparse(tree), 40), _cut(ast.unparse(tree.value), 20)
        return (
            f"attribute access ({part}) is not allowed in an expression; for a product write "
            f"{value} * {tree.attr} (or {value} @ {tree.attr} for a matrix product)"
        )
    if isinstance(tree, ast.Subscript):
        return (
            "indexing (x[i]) is not allowed in an expression; send each input under its "
            f"own name in the batch; {grammar}"
        )
    if isinstance(tree, ast.Tuple | ast.List | ast.Set):
        return f"an expression is one formula, not several separated by commas; {grammar}"
    if isinstance(tree, ast.Compare):
        return f"comparisons are not allowed in an expression; {grammar}"
    if isinstance(tree, ast.BoolOp | ast.UnaryOp | ast.BinOp):
        return operator(tree, text)
    return f"{type(tree).__name__} is not allowed in an expression; {grammar}"


def unsupplied(names: list[str]) -> str:
    """Why an expression wants inputs that the batch does not give: a name that is not a
    parameter is an input, and a forgotten parameter is the usual cause."""
    quoted = ", ".join(f"`{_cut(n, 40)}`" for n in names[:5])
    if len(names) == 1:
        return (
            f"{quoted} is not in params, so it is an input the batch must supply; "
            "add it to params to make it a parameter"
        )
    return (
        f"{quoted} are not in params, so they are inputs the batch must supply; "
        "add them to params to make them parameters"
    )
