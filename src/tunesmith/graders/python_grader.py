"""Python graders: OpenAI's ``python`` type (untrusted source, run in the sandbox) and, for library users, a
function of their own ("module:function" or the callable itself), run in this process like any library call.

OpenAI's python grader: ``source`` defines ``grade(sample, item) -> float``; an exception or a result that
is not a number makes the sample's grade 0 (OpenAI: "marked as invalid and return a 0 grade"); the source
must be under 256 kB. ``image_tag`` (OpenAI's choice of runtime image) is accepted and has no effect here:
the grader runs on this Python, with whatever packages it has.

A function grader is ``function(sample, item) -> float``, or, marked with ``@batched``,
``function(samples, items) -> list[float]`` (one call per batch, e.g. to run a model once).
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Callable, Mapping

from .core import (Grade, GraderError, as_score, check_batch, check_keys, failed, field, grader_name, pass_threshold,
                   with_pass)
from .sandbox import SandboxLimits, run_sandboxed

MAX_SOURCE_BYTES = 256 * 1024  # OpenAI's limit


@dataclass(frozen=True)
class PythonGrader:
    name: str
    source: str
    limits: SandboxLimits = dataclass_field(default_factory=SandboxLimits)
    pass_threshold: float | None = None
    type: str = "python"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        if not samples:
            return []
        return [with_pass(g, self.pass_threshold) for g in run_sandboxed(self.source, samples, items, self.limits)]


def compile_python(spec: Mapping[str, Any], where: str, limits: SandboxLimits | None = None) -> PythonGrader:
    check_keys(spec, where, ["source"], ["image_tag", "pass_threshold"])
    source = field(spec, "source", where, str)
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise GraderError(f"{where}.source: {len(source.encode()) // 1024} kB; OpenAI's limit, kept here, is 256 kB")
    check_defines_grade(source, f"{where}.source")
    return PythonGrader(grader_name(spec, where), source, limits or SandboxLimits(), pass_threshold(spec, where))


def check_defines_grade(source: str, where: str) -> None:
    """Syntax errors and a missing grade() are found now, not as a 0 for every sample."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise GraderError(f"{where}: line {e.lineno}: {e.msg} ({(e.text or '').strip()[:60]!r})") from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "grade":
            positional = len(node.args.posonlyargs) + len(node.args.args)
            if positional >= 2 or node.args.vararg:
                return
            raise GraderError(f"{where}: grade() takes {positional} argument(s); it must take (sample, item)")
    raise GraderError(f"{where}: no top-level 'def grade(sample, item):' (the function OpenAI's python grader calls)")


# ---------------------------------------------------------------- functions of the library user


def batched(fn: Callable) -> Callable:
    """Mark a grader function as batched: fn(samples, items) -> list of scores, one call per batch."""
    fn.batched = True
    return fn


@dataclass(frozen=True)
class FunctionGrader:
    name: str
    fn: Callable
    type: str = "function"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        if getattr(self.fn, "batched", False):
            return self._batch(samples, items)
        return [self._one(s, i) for s, i in zip(samples, items)]

    def _one(self, sample: Mapping, item: Mapping) -> Grade:
        try:
            score = as_score(self.fn(sample, item))
        except Exception as e:  # noqa: BLE001 - as OpenAI's python grader: the sample's 0, with the reason
            return failed(f"{self.name} raised {type(e).__name__}: {e}")
        return Grade(score) if isinstance(score, float) else failed(f"{self.name} {score}")

    def _batch(self, samples: list, items: list) -> list[Grade]:
        try:
            scores = list(self.fn(samples, items))
        except Exception as e:  # noqa: BLE001
            return [failed(f"{self.name} raised {type(e).__name__}: {e}")] * len(samples)
        if len(scores) != len(samples):
            return [failed(f"{self.name} returned {len(scores)} scores for {len(samples)} samples")] * len(samples)
        checked = [as_score(s) for s in scores]
        return [Grade(s) if isinstance(s, float) else failed(f"{self.name} {s}") for s in checked]


def import_function(spec: str) -> FunctionGrader:
    """ "module:function" (also "module:Class.method"), imported now."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise GraderError(f"grader {spec!r}: a function grader is written 'module:function' (e.g. 'my_rewards:exact')")
    try:
        fn: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise GraderError(f"grader {spec!r}: cannot import module {module_name!r} ({e}); make sure it is on "
                          "PYTHONPATH (the current directory is not always)") from e
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise GraderError(f"grader {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise GraderError(f"grader {spec!r}: {attr!r} is a {type(fn).__name__}, not a function (sample, item) -> float")
    return FunctionGrader(spec, fn)
