"""Models and chat completions: base models (installed aliases, --model NAME=PATH) and every fine-tuned
model, served non-streaming or as OpenAI's server-sent chunk stream."""

from __future__ import annotations

import json
import logging
import re
import shutil
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import user_errors
from .http import ApiError, principal
from .inference import CheckpointRef, InferenceError, Outcome, completion_id, created, normalize_messages, stream_chat
from .routes_images import is_image_model
from .settings import Settings
from .store import Store

log = logging.getLogger("tunesmith.server")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # chat clients send many neutral knobs (user, penalties at 0, ...)
    model: str
    messages: list[dict]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    tools: list | None = None
    # Fields the hosted API honours and this server cannot: refused when they ask for something (a careful client
    # must not get plain text where it asked for JSON, or no log-probabilities where it asked for them).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None


# field -> the values that ask for nothing (None always does)
NEUTRAL = {"logprobs": (False,), "top_logprobs": (0,), "response_format": ({"type": "text"},), "tool_choice": ("none",),
           "functions": ([],), "function_call": ("none",), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
           "logit_bias": ({},), "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (),
           "reasoning_effort": ()}


def refuse_unsupported(body: ChatRequest) -> None:
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and value not in neutral:
            raise ApiError(400, f"{name} is not supported on this server (tunesmith's chat completions return plain "
                                "text from a local model); leave it out", param=name, code="unsupported_parameter")


CHECKPOINT_RE = re.compile(r"^(ft:.+):ckpt-step-(\d+)$")  # what checkpoints.list gives as fine_tuned_model_checkpoint


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def add_model_routes(app: FastAPI, settings: Settings, store: Store) -> None:
    from .routes_jobs import checkpoint_dir

    def fine_tuned_job(name: str, request: Request) -> dict:
        job = store.job_by_model(name)
        if job is None or not principal(request).sees(job["project"]):  # another project's: not there
            raise _not_found(name)
        return job

    def model_ref(name: str, request: Request):
        if name in app.state.base_models:
            return app.state.base_models[name]
        m = CHECKPOINT_RE.match(name)
        if m is None:
            return str(settings.run_dir(fine_tuned_job(name, request)["id"]))
        job = fine_tuned_job(m.group(1), request)
        step = int(m.group(2))
        row = next((r for r in store.list_checkpoints(job["id"]) if r["step"] == step), None)
        if row is None or not checkpoint_dir(settings, row).is_dir():  # unknown, or pruned (checkpoint.keep_last)
            raise _not_found(name)
        return CheckpointRef(str(settings.run_dir(job["id"])), str(checkpoint_dir(settings, row)))

    @app.get("/v1/models")
    def list_models(request: Request):
        data = [_base_model_object(name) for name in app.state.base_models]
        data += [_fine_tuned_model_object(j) for j in store.succeeded_jobs(principal(request).scope)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, request: Request):
        if model_id in app.state.base_models:
            return _base_model_object(model_id)
        return _fine_tuned_model_object(fine_tuned_job(model_id, request))  # one indexed row, not the whole model list

    @app.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str, request: Request):
        """A fine-tuned model: gone from the model list and chat, its weights (best/ and checkpoints/) removed; the
        job keeps its record, metrics and report. Base models are the operator's: never deleted through the API."""
        if model_id in app.state.base_models:
            raise ApiError(403, f"The model `{model_id}` is a base model offered by this server; only fine-tuned "
                                "models can be deleted", param="model", code="model_not_deletable")
        job = fine_tuned_job(model_id, request)
        if not store.update_job(job["id"], when=("succeeded",), model_deleted=1,
                                event=("info", "message", f"Fine-tuned model deleted: {model_id}")):
            raise _not_found(model_id)
        app.state.pool.evict(model_id)
        run = settings.run_dir(job["id"])
        for folder in ("best", "checkpoints"):
            shutil.rmtree(run / folder, ignore_errors=True)
        return {"id": model_id, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, request: Request):
        if body.n not in (None, 1):
            raise ApiError(400, "n must be 1 on this server", param="n", code="unsupported_value")
        if body.tools:
            raise ApiError(400, "tools are not supported on this server", param="tools", code="unsupported_value")
        refuse_unsupported(body)
        ref = model_ref(body.model, request)
        if is_image_model(ref.run_dir if isinstance(ref, CheckpointRef) else ref):
            raise ApiError(400, f"Invalid value: '{body.model}'. It is a text-to-image model: draw with it through "
                                "/v1/images/generations", param="model", code="invalid_value")
        try:
            messages = normalize_messages(body.messages)
            entry = app.state.pool.get(body.model, ref)
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            outcome = Outcome()
            deltas = stream_chat(entry, messages, max_tokens=body.max_completion_tokens or body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                                 outcome=outcome)
        except InferenceError as e:
            raise ApiError(e.status, e.message, param=e.param, code=e.code) from None
        except user_errors() as e:  # the model's files are missing or unreadable
            raise ApiError(500, f"model {body.model!r} could not be loaded: {e}", param="model", type_="server_error",
                           code="model_load_failed") from None
        cid, ts = completion_id(), created()
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(deltas, outcome, cid, ts, body.model, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = "".join(deltas)
        return {"id": cid, "object": "chat.completion", "created": ts, "model": body.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": outcome.finish_reason}],
                "usage": _usage(outcome)}


def _base_model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tunesmith"}


def _fine_tuned_model_object(job: dict) -> dict:
    return {"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"], "owned_by": "user",
            "parent": job["model"]}


def _usage(o: Outcome) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens}


def _sse(deltas, outcome: Outcome, cid: str, ts: int, model: str, include_usage: bool):
    """OpenAI's chunk stream: role first, then content deltas, then finish_reason, [usage], [DONE]."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": ts, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]} | extra
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for text in deltas:
            yield chunk({"content": text})
    except Exception as e:  # headers are sent: report in-band, as the hosted API does
        log.exception("generation failed")
        yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error', 'param': None, 'code': 'internal_error'}})}\n\n"
        return
    yield chunk({}, outcome.finish_reason)
    if include_usage:
        yield (f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': ts, 'model': model, 'choices': [], 'usage': _usage(outcome)})}\n\n")
    yield "data: [DONE]\n\n"
