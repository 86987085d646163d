"""OpenAI's grader endpoints: run a grader on one answer, or check one, before a reinforcement job uses it.

    POST /v1/fine_tuning/alpha/graders/run       {grader, model_sample, item} -> {reward, metadata, sub_rewards,
                                                  model_grader_token_usage_per_model}
    POST /v1/fine_tuning/alpha/graders/validate  {grader} -> {grader}

The grade is the one training would give (tunesmith.graders, the same sandbox limits for python graders): an
answer that cannot be graded scores 0, and the reason is in ``metadata.errors`` (OpenAI's flags, with the text
in ``python_grader_runtime_error_details`` for python graders) and in ``metadata.reason``, a tunesmith extension
(null when the grader ran normally). score_model graders ask the server's --judge-model, loaded on first use, one
question at a time; without one they are refused. Token usage is not counted (null / {}).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from . import reinforcement as R
from .http import ApiError
from .settings import Settings

# OpenAI's metadata.errors: every flag, false unless the grade failed that way.
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error", "python_grader_runtime_error",
               "python_grader_server_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error")
ERROR_DETAILS = ("model_grader_server_error_details", "python_grader_runtime_error_details",
                 "python_grader_server_error_type")
_TEMPLATE_REASON = re.compile(r"\{\{[^{}]+\}\}: ")  # graders.template's messages start with the variable


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunGrader(_Body):
    grader: Any
    model_sample: str
    item: Any = None


class ValidateGrader(_Body):
    grader: Any


def add_grader_routes(app: FastAPI, settings: Settings) -> None:
    judge = _SerialJudge(app.state.base_models[settings.judge_model]) if settings.judge_model else None

    @app.post("/v1/fine_tuning/alpha/graders/validate")
    def validate_grader(body: ValidateGrader):
        _compiled(body.grader, judge)
        return {"grader": body.grader}

    @app.post("/v1/fine_tuning/alpha/graders/run")
    def run_grader(body: RunGrader):
        from ..graders import make_sample

        grader = _compiled(body.grader, judge)
        item = {} if body.item is None else body.item
        if not isinstance(item, dict):
            raise ApiError(400, f"item must be a JSON object (the data row the grader reads as {{{{item.FIELD}}}}), "
                                f"got {type(item).__name__}", param="item", code="invalid_value")
        start = time.perf_counter()
        grade = grader.grade_batch([make_sample(body.model_sample)], [item])[0]
        return run_response(body.grader, grade, time.perf_counter() - start, settings.judge_model)


def _compiled(spec: Any, judge):
    from ..graders import GraderError

    try:
        return R.compile_spec(spec, judge=judge)
    except GraderError as e:
        raise ApiError(400, f"invalid grader: {e}", param=R.grader_param(str(e), ""), code="invalid_grader") from None


def run_response(spec: dict, grade, seconds: float, judge_name: str | None) -> dict:
    """OpenAI's graders/run answer for one Grade."""
    from ..graders import needs_judge

    subs = dict(grade.sub_scores or {})
    metadata = {"name": spec.get("name", spec.get("type")), "type": spec.get("type"),
                "errors": errors(spec, grade.reason), "execution_time": round(seconds, 4), "scores": subs,
                "token_usage": None, "sampled_model_name": judge_name if needs_judge(spec) else None,
                "reason": grade.reason}
    return {"reward": grade.score, "metadata": metadata, "sub_rewards": subs, "model_grader_token_usage_per_model": {}}


def errors(spec: dict, reason: str | None) -> dict:
    """OpenAI's error flags for a grade's reason (tunesmith's graders give a sentence, not a kind: the kind is read
    from it, and what no flag fits is other_error)."""
    out: dict[str, Any] = {k: False for k in ERROR_FLAGS} | {k: None for k in ERROR_DETAILS}
    if not reason:
        return out
    kinds = _types(spec)
    if "sample.output_json is null" in reason:
        out["sample_parse_error"] = True
    elif _TEMPLATE_REASON.search(reason):
        out["invalid_variable_error"] = True
    elif "timed out" in reason:
        out["unresponsive_reward_error"] = True
    elif "score_model" in kinds and "python" not in kinds:
        out["model_grader_parse_error"] = True  # the judge's reply held no score
    elif "python" not in kinds:
        out["other_error"] = True
    if "python" in kinds:
        out["python_grader_runtime_error"] = True
        out["python_grader_runtime_error_details"] = reason
    return out


def _types(spec: Any) -> set[str]:
    if not isinstance(spec, dict):
        return set()
    subs = spec.get("graders")
    return {spec.get("type")} | {t for g in (subs.values() if isinstance(subs, dict) else []) for t in _types(g)}


class _SerialJudge:
    """The server's judge model (graders.LazyModelJudge: loaded at the first question), asked by one request at a
    time: generation is not thread-safe, and a second copy of the model would double the memory."""

    def __init__(self, ref: str):
        from ..graders import LazyModelJudge

        self.judge, self.lock = LazyModelJudge(ref), threading.Lock()

    def __call__(self, conversations, **params):
        with self.lock:
            return self.judge(conversations, **params)
