"""multi: named graders combined by a formula, ``calculate_output`` (expression.py), per sample.

Each named grader grades the whole batch once (so a python grader starts one process, a judge generates one
batch); the formula then combines the scores sample by sample. A grader that failed on a sample contributes
its 0, as in OpenAI's multigrader, and its reason is carried in the multi grade's reason, prefixed with its
name. A formula that cannot give a real number for a sample (division by zero...) makes that sample 0.
Every sample's grade carries ``sub_scores``, each named grader's score, for logging reward per grader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .core import Grade, Grader, GraderError, check_batch, check_keys, field, grader_name, pass_threshold, with_pass
from .expression import EvaluationError, Expression, compile_expression


@dataclass(frozen=True)
class MultiGrader:
    name: str
    graders: Mapping[str, Grader]
    calculate_output: Expression
    pass_threshold: float | None = None
    type: str = "multi"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        per_grader = {name: g.grade_batch(samples, items) for name, g in self.graders.items()}
        return [with_pass(self._combine({n: grades[k] for n, grades in per_grader.items()}), self.pass_threshold)
                for k in range(len(samples))]

    def _combine(self, grades: Mapping[str, Grade]) -> Grade:
        scores = {name: g.score for name, g in grades.items()}
        reasons = [f"{name}: {g.reason}" for name, g in grades.items() if g.reason]
        try:
            score = self.calculate_output.evaluate(scores)
        except EvaluationError as e:
            return Grade(0.0, "; ".join([str(e), *reasons]), scores)
        return Grade(score, "; ".join(reasons) or None, scores)


def compile_multi(spec: Mapping[str, Any], where: str, compile_one: Callable[[Any, str], Grader]) -> MultiGrader:
    check_keys(spec, where, ["graders", "calculate_output"], ["pass_threshold"])
    graders = field(spec, "graders", where, dict)
    if not graders:
        raise GraderError(f"{where}.graders: name at least one grader, e.g. {{\"exact\": {{\"type\": "
                          "\"string_check\", ...}}")
    compiled = {}
    for name, sub in graders.items():
        here = f"{where}.graders.{name}"
        if not name.isidentifier():
            raise GraderError(f"{here}: the name {name!r} cannot appear in calculate_output; use letters, digits "
                              "and _ (not starting with a digit)")
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(f"{here}: a multi grader inside a multi grader is not allowed (nor in OpenAI's); "
                              "write one calculate_output over all the graders")
        compiled[name] = compile_one(sub, here)
    formula = compile_expression(field(spec, "calculate_output", where, str), list(compiled),
                                 f"{where}.calculate_output")
    return MultiGrader(grader_name(spec, where), compiled, formula, pass_threshold(spec, where))
