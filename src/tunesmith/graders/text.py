"""string_check and text_similarity: graders of the reply's text against a reference, both templated.

string_check (0 or 1): eq / ne, case-sensitive equality and inequality; like, the input contains the
reference; ilike, the same ignoring case. Nothing is stripped or normalised, as in OpenAI's graders.

text_similarity: one of similarity.METRICS (see there for each metric's definition), or cosine of two
embeddings, which needs an embedding model (``embed``: texts -> vectors) passed in by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .core import (Grade, GraderError, check_batch, check_keys, choice, failed, field, grader_name, pass_threshold,
                   with_pass)
from .similarity import METRICS
from .template import Template, TemplateError, compile_template

OPERATIONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda text, ref: text == ref,
    "ne": lambda text, ref: text != ref,
    "like": lambda text, ref: ref in text,
    "ilike": lambda text, ref: ref.lower() in text.lower(),
}
Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]


@dataclass(frozen=True)
class StringCheckGrader:
    name: str
    input: Template
    reference: Template
    operation: str
    type: str = "string_check"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        return [self._grade(s, i) for s, i in zip(samples, items)]

    def _grade(self, sample: Mapping, item: Mapping) -> Grade:
        try:
            text, ref = self.input.render(sample, item), self.reference.render(sample, item)
        except TemplateError as e:
            return failed(str(e))
        return Grade(float(OPERATIONS[self.operation](text, ref)))


def compile_string_check(spec: Mapping[str, Any], where: str) -> StringCheckGrader:
    check_keys(spec, where, ["input", "reference", "operation"], [])
    op = choice(spec, "operation", where, list(OPERATIONS),
                " (eq/ne: equal or not, case-sensitive; like: contains; ilike: contains, ignoring case)")
    return StringCheckGrader(grader_name(spec, where), _template(spec, "input", where),
                             _template(spec, "reference", where), op)


@dataclass(frozen=True)
class TextSimilarityGrader:
    name: str
    input: Template
    reference: Template
    metric: str
    pass_threshold: float | None = None
    embed: Embed | None = None
    type: str = "text_similarity"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        pairs: list[tuple[str, str] | Grade] = []
        for sample, item in zip(samples, items):
            try:
                pairs.append((self.input.render(sample, item), self.reference.render(sample, item)))
            except TemplateError as e:
                pairs.append(failed(str(e)))
        texts = [p for p in pairs if isinstance(p, tuple)]
        scores = iter(self._cosines(texts) if self.metric == "cosine" else [METRICS[self.metric](*p) for p in texts])
        return [with_pass(p if isinstance(p, Grade) else Grade(next(scores)), self.pass_threshold) for p in pairs]

    def _cosines(self, pairs: list[tuple[str, str]]) -> list[float]:
        """One embedding call for the whole batch: inputs first, then references."""
        if not pairs:
            return []
        vectors = list(self.embed([p[0] for p in pairs] + [p[1] for p in pairs]))
        if len(vectors) != 2 * len(pairs):
            raise ValueError(f"the embedding model returned {len(vectors)} vectors for {2 * len(pairs)} texts")
        return [_cosine(vectors[k], vectors[k + len(pairs)]) for k in range(len(pairs))]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def compile_text_similarity(spec: Mapping[str, Any], where: str, embed: Embed | None = None) -> TextSimilarityGrader:
    check_keys(spec, where, ["input", "reference", "evaluation_metric"], ["pass_threshold"])
    metric = choice(spec, "evaluation_metric", where, ["cosine", *METRICS])
    if metric == "cosine" and embed is None:
        raise GraderError(f"{where}.evaluation_metric: 'cosine' compares embeddings, and no embedding model was "
                          "given (OpenAI uses text-embedding-3-large; tunesmith has none built in): pass "
                          "embed=fn(texts) -> vectors to compile_grader, or choose one of: " + ", ".join(METRICS))
    return TextSimilarityGrader(grader_name(spec, where), _template(spec, "input", where),
                                _template(spec, "reference", where), metric, pass_threshold(spec, where),
                                embed if metric == "cosine" else None)


def _template(spec: Mapping, key: str, where: str) -> Template:
    return compile_template(field(spec, key, where, str), f"{where}.{key}")
