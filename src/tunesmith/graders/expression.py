"""The multi grader's ``calculate_output``: a small arithmetic language, parsed and checked, never eval'd.

OpenAI's grammar: numbers, the names of the multi grader's graders, the operators + - * / and ^ (power),
unary minus, parentheses, and the functions min, max, abs, floor, ceil, exp, sqrt and log (natural). We also
read ``**`` as power, as Python does. Comparisons are not in OpenAI's grammar, so they are refused.

``^`` is rewritten to ``**`` before parsing, which gives it the precedence of a power (tighter than * and
unary minus, right-associative): Python's own ``^`` is XOR, with lower precedence than +. The Python AST is
then walked with an allow-list: any other node (attribute access, a call to any other function, subscripts,
lambdas, strings) is refused when the grader compiles, naming what was found. All arithmetic is in floats,
so no expression can build a huge integer; an exponent written as a constant is limited to
``MAX_EXPONENT``, and a result that overflows or leaves the real numbers fails that sample with a reason.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from .core import GraderError

MAX_LENGTH = 2000  # characters of calculate_output
MAX_EXPONENT = 100.0  # |constant exponent|: e^100 is already far beyond any useful reward
FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {  # name: (function, number of arguments or None: 1+)
    "min": (min, None), "max": (max, None), "abs": (abs, 1), "floor": (math.floor, 1), "ceil": (math.ceil, 1),
    "exp": (math.exp, 1), "sqrt": (math.sqrt, 1), "log": (math.log, 1),
}
_OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


class EvaluationError(Exception):
    """The formula could not give a real number for these scores (division by zero, log(0), overflow)."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.expr
    names: frozenset[str]  # the grader names it uses

    def evaluate(self, values: Mapping[str, float]) -> float:
        try:
            result = _evaluate(self.tree, values)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
            raise EvaluationError(f"calculate_output {self.text!r}: {_describe(e)}{_show(values)}") from None
        if isinstance(result, complex):  # e.g. (-8) ^ (1/3) in Python
            raise EvaluationError(f"calculate_output {self.text!r}: a result outside the real numbers"
                                  f"{_show(values)}")
        if not math.isfinite(result):
            raise EvaluationError(f"calculate_output {self.text!r} gives {result}{_show(values)}, not a finite number")
        return float(result)


def compile_expression(text: str, names: Collection[str], where: str) -> Expression:
    """Parse and check ``text``; ``names`` are the variables it may use (the graders' names)."""
    if not isinstance(text, str) or not text.strip():
        raise GraderError(f"{where}: calculate_output must be a formula such as \"(a + b) / 2\", got {text!r:.60}")
    if len(text) > MAX_LENGTH:
        raise GraderError(f"{where}: calculate_output is {len(text)} characters long; at most {MAX_LENGTH}")
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise GraderError(f"{where}: calculate_output {text!r} is not a formula ({getattr(e, 'msg', e)}); "
                          f"use numbers, grader names, + - * / ^, parentheses and {', '.join(FUNCTIONS)}") from None
    used: set[str] = set()
    _check(tree, set(names), used, f"{where}: calculate_output {text!r}")
    expression = Expression(text, tree, frozenset(used))
    if not used:  # a constant: whatever it fails on, it fails on for every sample
        try:
            expression.evaluate({})
        except EvaluationError as e:
            raise GraderError(f"{where}: {e}") from None
    return expression


def _check(node: ast.AST, names: set[str], used: set[str], where: str) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise GraderError(f"{where}: {node.value!r} is not a number")
        try:
            node.value = float(node.value)  # floats only: no expression can build a huge integer
        except OverflowError:
            raise GraderError(f"{where}: the number {str(node.value)[:20]}... is too large") from None
    elif isinstance(node, ast.Name):
        if node.id not in names:
            hint = " (a function: call it, e.g. abs(x))" if node.id in FUNCTIONS else ""
            raise GraderError(f"{where}: {node.id!r} is not one of the graders: {', '.join(sorted(names))}{hint}")
        used.add(node.id)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        _check_exponent(node, where)
        _check(node.left, names, used, where)
        _check(node.right, names, used, where)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, names, used, where)
    elif isinstance(node, ast.Call):
        _check_call(node, names, used, where)
    else:
        raise GraderError(f"{where}: {_what(node)} is not allowed; a formula has numbers, grader names, "
                          f"+ - * / ^, parentheses and the functions {', '.join(FUNCTIONS)}")


def _check_exponent(node: ast.BinOp, where: str) -> None:
    exponent = node.right.operand if isinstance(node.right, ast.UnaryOp) else node.right
    if isinstance(node.op, ast.Pow) and isinstance(exponent, ast.Constant) and \
            isinstance(exponent.value, (int, float)) and abs(exponent.value) > MAX_EXPONENT:
        raise GraderError(f"{where}: the exponent {exponent.value} is too large (at most {MAX_EXPONENT:g})")


def _check_call(node: ast.Call, names: set[str], used: set[str], where: str) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        called = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise GraderError(f"{where}: calling {called!r} is not allowed; the functions are {', '.join(FUNCTIONS)}")
    arity = FUNCTIONS[node.func.id][1]
    if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args) or \
            (arity is not None and len(node.args) != arity):
        raise GraderError(f"{where}: {node.func.id}() takes {arity or 'one or more'} number(s), "
                          f"got {ast.unparse(node)!r}")
    for arg in node.args:
        _check(arg, names, used, where)


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    fn = FUNCTIONS[node.func.id][0]  # an ast.Call, checked by _check_call
    return float(fn(*(_evaluate(a, values) for a in node.args)))


def _what(node: ast.AST) -> str:
    kinds = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Compare: "a comparison (not in "
             "OpenAI's calculate_output)", ast.BoolOp: "and/or", ast.IfExp: "if/else", ast.Lambda: "lambda",
             ast.BinOp: "this operator (use + - * / ^)", ast.UnaryOp: "this unary operator (use -)"}
    text = ast.unparse(node)
    return f"{kinds.get(type(node), type(node).__name__)} {text[:40]!r}"


def _describe(e: Exception) -> str:
    if isinstance(e, ZeroDivisionError):
        return "division by zero"
    if isinstance(e, OverflowError):
        return "a number too large"
    if isinstance(e, TypeError):
        return "a result outside the real numbers"  # e.g. (-8) ^ (1/3) is complex in Python
    return f"a math domain error ({e})"  # sqrt or log of a negative number, log(0)


def _show(values: Mapping[str, float]) -> str:
    return " for " + ", ".join(f"{k}={v:g}" for k, v in values.items()) if values else ""
