"""A small safe evaluator for the constraint expressions of sweep files.

A constraint such as ``kv_pages_per_block * page_size <= 2048`` is parsed with :mod:`ast`
and checked against a whitelist: numbers, booleans, names, ``+ - * / // % **``, unary
``- + not``, comparisons (chains included), ``and``/``or``, and calls of ``min``/``max``.
Anything else (attribute access, subscripts, other calls, lambdas, strings) is refused when
the expression is parsed, so a sweep file can never run code. Python's ``eval`` is never used.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_FUNCTIONS = {"min": min, "max": max}
# `2 ** 10 ** 10` would take the process down; exponents this large never describe hardware.
_MAX_EXPONENT = 256
_MAX_MAGNITUDE = 2**63


class ExpressionError(ValueError):
    """An expression that is not allowed or cannot be evaluated; the message says why."""


def _check(node: ast.AST) -> None:
    """Raises ExpressionError at the first node outside the whitelist."""
    if isinstance(node, ast.Expression):
        _check(node.body)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (bool, int, float)):
            raise ExpressionError(f"only numbers and booleans are allowed, got {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id in _FUNCTIONS:
            raise ExpressionError(f"{node.id} can only be called, as {node.id}(a, b, ...)")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        _check(node.operand)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise ExpressionError(f"comparison {type(op).__name__} is not allowed")
        _check(node.left)
        for comparator in node.comparators:
            _check(comparator)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise ExpressionError("only min(...) and max(...) may be called")
        if node.keywords or not node.args:
            raise ExpressionError(f"{node.func.id}() takes one or more plain arguments")
        for argument in node.args:
            _check(argument)
    elif isinstance(node, ast.Attribute):
        raise ExpressionError("attribute access (a.b) is not allowed")
    elif isinstance(node, ast.Subscript):
        raise ExpressionError("subscripts (a[b]) are not allowed")
    else:
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")


def _number(value: Any, op: ast.AST) -> Any:
    """Arithmetic only on numbers: `contraction * 10**12` must not build a huge string."""
    if not isinstance(value, (bool, int, float)):
        raise ExpressionError(f"{type(op).__name__} needs numbers, got {value!r}")
    return value


def _bounded(value: Any) -> Any:
    """Every intermediate stays within what hardware sizes need: big integers cost time
    and memory without bound ((9**256)**256 has 62,000 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_MAGNITUDE:
        raise ExpressionError(f"a value beyond 2**{_MAX_MAGNITUDE.bit_length() - 1} in between")
    if isinstance(value, float) and not abs(value) <= float(_MAX_MAGNITUDE):
        raise ExpressionError("a value beyond 2**63 (or not a number) in between")
    return value


def _check_power(base: Any, exponent: Any) -> None:
    if abs(exponent) > _MAX_EXPONENT:
        raise ExpressionError(f"exponent {exponent} is too large (at most {_MAX_EXPONENT})")
    # Refused before computing: the result alone could take minutes.
    if exponent > 0 and abs(base) > 1 and exponent * math.log2(abs(base)) > 64:
        raise ExpressionError(f"{base} ** {exponent} is beyond 2**64")


def _evaluate(node: ast.AST, names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ExpressionError(f"unknown name {node.id!r}")
        return names[node.id]
    if isinstance(node, ast.BinOp):
        left = _number(_evaluate(node.left, names), node.op)
        right = _number(_evaluate(node.right, names), node.op)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except (ZeroDivisionError, TypeError, OverflowError) as error:
            raise ExpressionError(str(error)) from error
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, names)
        if not isinstance(node.op, ast.Not):
            operand = _number(operand, node.op)
        return _UNARY[type(node.op)](operand)
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_evaluate(value, names) for value in node.values)
        return any(_evaluate(value, names) for value in node.values)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, names)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, names)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError as error:
                raise ExpressionError(str(error)) from error
            left = right
        return True
    if isinstance(node, ast.Call):
        return _FUNCTIONS[node.func.id](*(_evaluate(a, names) for a in node.args))
    raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")


@dataclasses.dataclass(frozen=True)
class Expression:
    """A parsed, whitelisted expression; `names` are the variables it reads."""

    text: str
    tree: ast.Expression = dataclasses.field(compare=False, repr=False)
    names: frozenset[str] = dataclasses.field(compare=False)

    def evaluate(self, names: Mapping[str, Any]) -> Any:
        """The value of the expression with these variables (ExpressionError if it fails)."""
        return _evaluate(self.tree, names)


def parse(text: str) -> Expression:
    """Parses and whitelists `text`; ExpressionError names what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("must be a non-empty expression string")
    if len(text) > 1000:
        raise ExpressionError("is longer than 1000 characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"is not a valid expression ({error.msg})") from error
    _check(tree)
    names = frozenset(
        node.id for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id not in _FUNCTIONS
    )
    return Expression(text=text.strip(), tree=tree, names=names)
