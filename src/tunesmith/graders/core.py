"""What every grader shares: the Grade it returns, the error for a bad spec, the sample's shape, spec checks.

A grader is any object with a ``name``, a ``type`` and ``grade_batch(samples, items) -> list[Grade]`` (the
``Grader`` protocol); there is no base class. Each grader type compiles from OpenAI's JSON dict, checking
every field once, so that grading a batch never meets a bad spec, only bad samples (which score 0 with a
reason, as OpenAI's graders do).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence


class GraderError(ValueError):
    """A grader spec that cannot be compiled, worded for the user: the field, the value, what is allowed."""


@dataclass(frozen=True)
class Grade:
    """One sample's grade.

    score: the reward. reason: why the score is 0 when something failed (a sandbox refusal, a timeout, a
    missing template field, an unparsable judge reply); None when the grader ran normally. For a multi
    grader, the reasons of its failed sub-graders, joined. sub_scores: a multi grader's per-grader scores
    (the training loop logs reward per grader). passed: score >= pass_threshold where the spec has one.
    """

    score: float
    reason: str | None = None
    sub_scores: dict[str, float] | None = None
    passed: bool | None = None


def failed(reason: str) -> Grade:
    return Grade(0.0, reason)


class Grader(Protocol):
    name: str
    type: str

    def grade_batch(self, samples: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]]) -> list[Grade]:
        ...


# ---------------------------------------------------------------- samples


def make_sample(output_text: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's sample: output_text, and output_json when the text is a JSON document (else None).

    extra: any other sample field the caller has (output_tools, choices).
    """
    return {"output_text": output_text, "output_json": parse_json_output(output_text)} | extra


def parse_json_output(text: str) -> Any:
    """The reply parsed as JSON, or None when it is not JSON (OpenAI fills output_json the same way)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


def as_sample(sample: Any) -> Mapping[str, Any]:
    """A str becomes make_sample(str); a dict without output_json gets it parsed from output_text."""
    if isinstance(sample, str):
        return make_sample(sample)
    if not isinstance(sample, Mapping) or not isinstance(sample.get("output_text"), str):
        raise TypeError(f"a sample must be a str or a dict with an 'output_text' string, got {sample!r:.80}")
    if "output_json" in sample:
        return sample
    return dict(sample) | {"output_json": parse_json_output(sample["output_text"])}


def check_batch(samples: Sequence[Any], items: Sequence[Any]) -> tuple[list[Mapping], list[Mapping]]:
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items: grade_batch pairs them up one to one")
    bad = next((i for i, item in enumerate(items) if not isinstance(item, Mapping)), None)
    if bad is not None:
        raise TypeError(f"item {bad} is a {type(items[bad]).__name__}; an item is the data row, a dict")
    return [as_sample(s) for s in samples], list(items)


def as_score(value: Any) -> float | str:
    """A finite float, or the reason the value is not one (a str)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"returned {value!r:.60} ({type(value).__name__}), not a number"
    value = float(value)
    return value if math.isfinite(value) else f"returned {value}, not a finite number"


# ---------------------------------------------------------------- spec checks


def check_keys(spec: Mapping, where: str, required: Sequence[str], optional: Sequence[str]) -> None:
    """Every required key present, no key outside required + optional (a misspelling must not pass)."""
    allowed = ["type", "name", *required, *optional]
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise GraderError(f"{where}: unknown field {unknown[0]!r}; a {spec['type']} grader has: {', '.join(allowed)}")
    missing = [k for k in required if k not in spec]
    if missing:
        raise GraderError(f"{where}: missing field {missing[0]!r} (a {spec['type']} grader needs: "
                          f"{', '.join(['type', *required])})")


def field(spec: Mapping, key: str, where: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = spec.get(key, default)
    if key not in spec:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(dict.fromkeys("number" if k in (int, float) else k.__name__ for k in kinds))
        raise GraderError(f"{where}.{key}: expected a {names}, got {value!r:.60}")
    return value


def choice(spec: Mapping, key: str, where: str, allowed: Sequence[str], hint: str = "") -> str:
    value = spec[key]
    if value not in allowed:
        raise GraderError(f"{where}.{key}: {value!r:.60} is not one of: {', '.join(allowed)}{hint}")
    return value


def grader_name(spec: Mapping, where: str) -> str:
    """OpenAI requires a name; we default it to the type, since nothing here depends on it."""
    return field(spec, "name", where, str, spec["type"])


def pass_threshold(spec: Mapping, where: str) -> float | None:
    value = field(spec, "pass_threshold", where, (int, float))
    return None if value is None else float(value)


def with_pass(grade: Grade, threshold: float | None) -> Grade:
    """passed = score >= pass_threshold (OpenAI's "greater than or equal indicates a passing grade")."""
    if threshold is None:
        return grade
    return Grade(grade.score, grade.reason, grade.sub_scores, grade.score >= threshold)
