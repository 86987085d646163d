"""Reinforcement jobs: OpenAI's ``method.reinforcement`` (a grader and hyperparameters) onto objective grpo, and the
checks of the grader against the job's prompt files before it is queued.

    method.reinforcement.grader    -> objective.grpo.grader, compiled at creation (a bad spec: a 400 naming the field);
                                      a score_model grader asks the server's --judge-model (objective.grpo.judge_model),
                                      never the model its spec names, and is refused when the server has none
    n_epochs, batch_size,          -> as for supervised jobs; batch_size counts prompts, each answered
    learning_rate_multiplier          num_generations times
    compute_multiplier             -> objective.grpo.num_generations = round(configured x multiplier), at least 2.
                                      OpenAI: "multiplier on amount of compute used for exploring search space
                                      during training"; here exploring is sampling answers to each prompt, and the
                                      configured count is 4 unless --set or tunesmith_config says otherwise
    eval_interval                  -> eval.every_steps; "auto": once per epoch, resolved to that many steps
    eval_samples                   -> 1 only ("auto" is 1): each held-out prompt is answered once, greedily, so a
                                      second sample would be the same answer (refused at the request, routes_jobs)
    reasoning_effort               -> "default" only ("auto" is "default"): tunesmith's models have no effort setting

While the job is ``validating_files`` (supervisor.py), every ``{{item.FIELD}}`` the grader reads must exist in every
row of both files (a missing one fails the job with file and line: its answers would all score 0), and the grader
is run on the first rows with an empty answer, which says what an answer that missed everything scores, and fails
the job when a python grader's own code cannot start.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .jobs import JobRequestError

PROBE_ROWS = 3  # rows graded with an empty answer during validation
MAX_ITEM_ISSUES = 20  # missing-field issues reported per file (the rest are counted)
# The issue code of a row without a field the grader reads: not an E0xx code, as `tunesmith check` has no grader.
MISSING_FIELD = "missing_item_field"
# What sandbox.run_sandboxed says when a python grader's module-level code fails: every sample gets it.
CODE_FAILED = "the grader's code failed before grading"
_SURROGATES = re.compile(r"(\\+)u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


# ---------------------------------------------------------------- the grader at creation


def compile_spec(spec: Any, judge: Any = None, judge_name: str | None = None):
    """The compiled grader, or GraderError naming the field. A score_model grader needs the server's judge; at
    creation a stand-in is passed when one is configured (compiling never calls it)."""
    from ..graders import GraderError, compile_grader, needs_judge

    if not isinstance(spec, dict):  # a str would be 'module:function', imported in the server: never from a client
        raise GraderError(f"grader: a grader is a JSON object with a \"type\", got {json.dumps(spec)[:60]}")
    if needs_judge(spec) and judge is None and judge_name is None:
        raise GraderError("grader: a score_model grader needs a judge model, and this server has none: its operator "
                          "can start it with `tunesmith serve --judge-model NAME`; or grade with string_check, "
                          "text_similarity or python")
    return compile_grader(spec, judge=judge or _never_called)


def _never_called(conversations, **params):
    raise RuntimeError("the stand-in judge of a grader compiled only to be checked was called")


def grader_param(message: str, prefix: str) -> str:
    """'grader.graders.exact.reference: ...' -> prefix + 'grader.graders.exact.reference' (OpenAI's error param)."""
    head = message.split(":", 1)[0].strip()
    return prefix + (head if head.startswith("grader") and " " not in head else "grader")


def method_overrides(spec: dict, judge_ref: str | None) -> list[str]:
    """The grader as an override; a score_model's judge is the server's, so a client never names a model to load."""
    from ..graders import needs_judge

    out = [f"objective.grpo.grader={as_yaml_json(spec)}"]
    if needs_judge(spec):
        out.append(f"objective.grpo.judge_model={json.dumps(judge_ref)}")
    return out


def as_yaml_json(value: Any) -> str:
    """JSON that YAML (how --set values are read) reads back the same: a character beyond U+FFFF, which JSON
    writes as a surrogate pair (\\ud83d\\ude00) that YAML would read as two broken characters, is written as
    YAML's \\U0001f600."""

    def join(m: re.Match) -> str:
        slashes, high, low = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
        if len(slashes) % 2 == 0:  # an escaped backslash followed by the letters "ud83d": text, not an escape
            return m.group(0)
        return f"{slashes[:-1]}\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08x}"

    return _SURROGATES.sub(join, json.dumps(value))


def finish_overrides(cfg, hyper: dict, train_rows: int, has_valid: bool) -> list[str]:
    """Overrides that need the configured values: answers per prompt (compute_multiplier) and eval_interval."""
    out = []
    mult = hyper.get("compute_multiplier", "auto")
    if mult != "auto":
        configured = cfg.objective.grpo.num_generations
        answers = round(configured * float(mult))
        if answers < 2:
            raise JobRequestError(
                f"compute_multiplier {mult} gives {configured} x {mult} = {configured * float(mult):g} answers per "
                f"prompt; a group needs at least 2 (its mean is each answer's baseline): use a multiplier of at least "
                f"{2 / configured:g}", "method.reinforcement.hyperparameters.compute_multiplier")
        out.append(f"objective.grpo.num_generations={answers}")
    interval = hyper.get("eval_interval", "auto")
    if interval != "auto":
        out.append(f"eval.every_steps={int(interval)}")
    elif cfg.eval.every_steps is None:  # resolved now, so the job echoes the number it will use
        out.append(f"eval.every_steps={steps_per_epoch(cfg, train_rows, has_valid)}")
    return out


def steps_per_epoch(cfg, rows: int, has_valid: bool) -> int:
    """As train.optim.plan_steps counts them, after the held-out split that data.valid_fraction takes without a
    validation file (data.loading.holdout_split)."""
    fraction = cfg.data.valid_fraction
    held = 0 if has_valid or fraction <= 0 or rows == 0 else max(1, round(rows * fraction))
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(max(0, rows - held) / per_step))


def resolved(cfg, hyper: dict) -> dict:
    """The reinforcement hyperparameters the job really uses, "auto" replaced."""
    mult = hyper.get("compute_multiplier", "auto")
    return {"compute_multiplier": 1.0 if mult == "auto" else float(mult), "eval_interval": cfg.eval.every_steps,
            "eval_samples": 1, "reasoning_effort": "default"}


# ---------------------------------------------------------------- the grader against the files (validating_files)


def item_issues(spec: dict, path: Path, shown_as: str) -> list:
    """An issue (file:line) for every row lacking a field the grader's templates read as {{item.…}}."""
    from ..data import Issue
    from ..data.prompts import read_prompt_rows

    variables = [v for v in _template_variables(spec) if v.namespace == "item"]
    if not variables:
        return []
    rows, _, _ = read_prompt_rows(path)
    issues, more = [], 0
    for row in rows:
        problem = _first_missing(variables, row.item)
        if problem is None:
            continue
        if len(issues) == MAX_ITEM_ISSUES:
            more += 1
            continue
        issues.append(Issue(MISSING_FIELD, f"the grader's {problem}: add the field to every row, or change the grader",
                            shown_as, row.origin.line))
    if more:
        issues.append(Issue(MISSING_FIELD, f"... and {more} more rows lacking a field the grader reads", shown_as))
    return issues


def _first_missing(variables: list, item: dict) -> str | None:
    from ..graders.template import TemplateError

    for var in variables:
        try:
            var.lookup({}, item)
        except TemplateError as e:
            return str(e)
    return None


def _template_variables(spec: Any, key: str = "") -> list:
    """Every {{ }} variable in the spec's strings: template fields (input, reference, messages' content) of every
    grader inside it. A python grader's source is code, not a template, and is skipped."""
    from ..graders import GraderError
    from ..graders.template import compile_template

    if isinstance(spec, dict):
        return [v for k, sub in spec.items() if k != "source" for v in _template_variables(sub, k)]
    if isinstance(spec, list):
        return [v for sub in spec for v in _template_variables(sub, key)]
    if isinstance(spec, str) and "{{" in spec:
        try:
            return compile_template(spec, key).variables
        except GraderError:  # not a template field (compile_grader already checked the real ones)
            return []
    return []


def probe(spec: dict, path: Path) -> tuple[str, str]:
    """(level, message): the grader run on the first rows with an empty answer; level "error" when a python
    grader's code could not start (every answer would score 0), "warn" when some grade came with a reason."""
    from ..data.prompts import read_prompt_rows
    from ..graders import make_sample, needs_judge

    if needs_judge(spec):
        return "info", "Grader check: skipped the empty-answer run (a score_model grader would load the judge model)"
    rows = read_prompt_rows(path)[0][:PROBE_ROWS]
    if not rows:
        return "info", "Grader check: no rows to run it on"
    grades = compile_spec(spec, judge=_never_called).grade_batch([make_sample("")] * len(rows), [r.item for r in rows])
    reasons = [g.reason for g in grades if g.reason]
    if reasons and all(r.startswith(CODE_FAILED) for r in reasons) and len(reasons) == len(grades):
        return "error", f"the python grader's code cannot run: {reasons[0]}"
    scores = ", ".join(f"{g.score:g}" for g in grades)
    text = f"Grader check on the first {len(rows)} training rows with an empty answer: scores {scores}"
    if not reasons:
        return "info", text
    return "warn", (f"{text}; {len(reasons)} with a reason, e.g. {reasons[0][:300]} (expected if the grader "
                    "cannot read an empty answer; otherwise fix the grader before the answers are real)")
