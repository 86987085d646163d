"""compile_grader: an OpenAI grader dict (or a "module:function" string, or a function) to a Grader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .core import Grader, GraderError
from .multi import compile_multi
from .python_grader import FunctionGrader, compile_python, import_function
from .sandbox import SandboxLimits
from .score_model import Judge, compile_score_model
from .text import Embed, compile_string_check, compile_text_similarity

TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


def compile_grader(spec: Mapping[str, Any] | str | Callable, *, judge: Judge | None = None,
                   embed: Embed | None = None, limits: SandboxLimits | None = None) -> Grader:
    """A grader ready for grade_batch(samples, items).

    spec: OpenAI's JSON form as a dict; or "module:function", a function(sample, item) -> float imported now
    (mark a batched one with @batched); or such a function itself. judge: for score_model graders, a callable
    conversations -> replies (score_model.make_model_judge builds one from a local model). embed: for
    text_similarity's cosine, a callable texts -> vectors. limits: the python grader's sandbox limits.
    Raises GraderError, naming the field, the value and what is allowed, for any problem in the spec.
    """
    if isinstance(spec, str):
        return import_function(spec)
    if callable(spec) and not isinstance(spec, Mapping):
        return FunctionGrader(getattr(spec, "__name__", "function"), spec)

    def compile_one(sub: Any, where: str) -> Grader:
        if not isinstance(sub, Mapping):
            raise GraderError(f"{where}: a grader is a JSON object with a \"type\", got {json.dumps(sub)[:60]}")
        kind = sub.get("type")
        if kind == "string_check":
            return compile_string_check(sub, where)
        if kind == "text_similarity":
            return compile_text_similarity(sub, where, embed)
        if kind == "python":
            return compile_python(sub, where, limits)
        if kind == "score_model":
            return compile_score_model(sub, where, judge)
        if kind == "multi":
            return compile_multi(sub, where, compile_one)
        hint = " (label_model is OpenAI's, not supported here: use score_model)" if kind == "label_model" else ""
        raise GraderError(f"{where}.type: {kind!r} is not one of: {', '.join(TYPES)}{hint}")

    return compile_one(spec, "grader")


def needs_judge(spec: Any) -> bool:
    """Whether the spec has a score_model grader anywhere (so a judge model must be loaded)."""
    if not isinstance(spec, Mapping):
        return False
    if spec.get("type") == "score_model":
        return True
    graders = spec.get("graders")
    return isinstance(graders, Mapping) and any(needs_judge(g) for g in graders.values())


def load_grader_spec(path: str | Path) -> dict:
    """A grader JSON file, with the line and column of a syntax error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraderError(f"{path}: cannot read the grader file ({e})") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise GraderError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(spec, dict):
        raise GraderError(f"{path}: a grader file holds one JSON object with a \"type\", got a {type(spec).__name__}")
    return spec
