"""Graders for reinforcement fine-tuning, in OpenAI's JSON form: the reward of a reply to a data row.

    from tunesmith.graders import compile_grader, make_sample
    grader = compile_grader({"type": "string_check", "name": "exact", "operation": "eq",
                             "input": "{{sample.output_text}}", "reference": "{{item.answer}}"})
    grades = grader.grade_batch([make_sample("Paris")], [{"answer": "Paris"}])   # [Grade(score=1.0)]

Types (OpenAI's graders guide): string_check, text_similarity, python (run in a sandbox, sandbox.py),
score_model (a judge model passed in by the caller), multi (graders combined by a formula). A library user's
own function is a grader too: "module:function" or the function itself (python_grader.py).

A sample is ``{"output_text": str, "output_json": parsed or None}`` (make_sample builds one; a plain str is
accepted too); an item is the data row, a dict. Every grader grades a batch; a sample that cannot be graded
(a missing template field, a sandbox refusal, a timeout, an unreadable judge reply) scores 0 with a reason.
"""

from .build import TYPES, compile_grader, load_grader_spec, needs_judge
from .core import Grade, Grader, GraderError, make_sample
from .python_grader import batched
from .sandbox import SandboxLimits
from .score_model import LazyModelJudge, make_model_judge, parse_score

__all__ = ["TYPES", "Grade", "Grader", "GraderError", "LazyModelJudge", "SandboxLimits", "batched", "compile_grader",
           "load_grader_spec", "make_model_judge", "make_sample", "needs_judge", "parse_score"]
