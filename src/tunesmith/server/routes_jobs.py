"""Fine-tuning jobs: create (Idempotency-Key honoured), list, retrieve, cancel, events, checkpoints, and
two tunesmith extensions for the dashboard: loss points after a cursor (`metrics`) and the run's report."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import ConfigError
from . import jobs as J
from . import reinforcement as R
from .http import ApiError, cursor, job_or_404, page, principal, scrub
from .image_files import FORMAT as IMAGES
from .image_files import folder_for
from .routes_files import check_file_kind, project_of
from .routes_images import is_image_model
from .settings import Settings
from .store import TERMINAL, IdempotencyConflict, QuotaExceeded, Store, new_id, now

REPORT_TYPES = {".html", ".png", ".svg", ".jpg", ".jpeg", ".css", ".js", ".json"}  # what a report may link to
TEXT_TYPES = {".html", ".css", ".js", ".json", ".svg"}
# A report is the run's own page: shown sandboxed (no scripts, an origin of its own), never framed elsewhere.
REPORT_CSP = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _count(v):
    if v is None or v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100000:
        raise ValueError(f"must be 'auto' or an integer from 1 to 100000, got {v!r}")
    return v


class Hyperparameters(_Body):
    n_epochs: Any = None  # "auto" or an integer >= 1 (checked below, with one clear message)
    batch_size: Any = None
    learning_rate_multiplier: Any = None

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _count(cls, v):
        return _count(v)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v):
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1000:
            raise ValueError(f"must be 'auto' or a number > 0 and <= 1000, got {v!r}")
        return float(v)


class DpoHyperparameters(Hyperparameters):
    beta: Any = None  # "auto" or a number > 0 (0 would train nothing; below 0, toward the rejected answers)

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1000:
            raise ValueError(f"must be 'auto' or a number > 0 and <= 1000, got {v!r}")
        return float(v)


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters, as far as tunesmith can honour them (reinforcement.py maps them)."""

    compute_multiplier: Any = None  # "auto" or a number > 0: scales the answers sampled per prompt
    eval_interval: Any = None  # "auto" or training steps between evaluations
    eval_samples: Any = None  # "auto" or 1 (below)
    reasoning_effort: Any = None  # "default" (below)

    @field_validator("eval_interval")
    @classmethod
    def _interval(cls, v):
        return _count(v)

    @field_validator("compute_multiplier")
    @classmethod
    def _compute(cls, v):
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 64:
            raise ValueError(f"must be 'auto' or a number > 0 and <= 64 (it scales the answers sampled per prompt), "
                             f"got {v!r}")
        return float(v)

    @field_validator("eval_samples")
    @classmethod
    def _samples(cls, v):
        if v is None or v == "auto" or (v == 1 and not isinstance(v, bool)):
            return v
        raise ValueError(f"must be 'auto' or 1, got {v!r}: tunesmith answers each held-out prompt once, greedily, and "
                         "grades that answer; more samples would be the same answer again")

    @field_validator("reasoning_effort")
    @classmethod
    def _effort(cls, v):
        if v in (None, "default", "auto"):
            return None if v is None else "default"
        if v in ("low", "medium", "high"):
            raise ValueError(f"{v!r} cannot be honoured: tunesmith's models have no reasoning-effort setting; use "
                             "'default' (or leave it out)")
        raise ValueError(f"must be one of 'default', 'low', 'medium', 'high', got {v!r}")


class Reinforcement(_Body):
    grader: Any = None  # required; checked in _new_job_row with a message that shows one
    hyperparameters: ReinforcementHyperparameters | None = None


class Supervised(_Body):
    hyperparameters: Hyperparameters | None = None


class Dpo(_Body):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Body):
    type: str = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Reinforcement | None = None


class CreateJob(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    tunesmith_config: dict[str, Any] | None = None  # tunesmith extension: {dotted config key: value}


def add_job_routes(app: FastAPI, settings: Settings, store: Store) -> None:
    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: CreateJob, request: Request,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
        row = _new_job_row(body, settings, store, app.state.base_models, principal(request))
        idem = None
        if idempotency_key:
            canonical = json.dumps(body.model_dump(exclude_none=True), sort_keys=True)
            idem = (principal(request).fp, idempotency_key[:255], hashlib.sha256(canonical.encode()).hexdigest())
        validating = f"Validating training file: {row['training_file']}" + (
            f" and validation file: {row['validation_file']}" if row["validation_file"] else "")
        row["project"] = project_of(request)
        try:
            job, _ = store.create_job(row, idem=idem, events=[validating], max_active=settings.quota_jobs)
        except IdempotencyConflict:
            raise ApiError(409, "This Idempotency-Key was already used with a different request body",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        except QuotaExceeded as e:
            raise ApiError(429, f"Job quota exceeded: the project has {e} unfinished jobs, its limit (tunesmith serve "
                                "--project-max-jobs); wait for one to finish, or cancel one", param=None,
                           code="job_quota_exceeded", type_="insufficient_quota") from None
        return J.job_object(job)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        status: str | None = None):
        """OpenAI's `metadata[k]=v` filter (every pair must match; `metadata=null`: jobs without metadata), and a
        tunesmith extension `status` (the dashboard's filter)."""
        metadata, null = _metadata_filter(request)
        rows, more = cursor(store.list_jobs, after=after, limit=limit, metadata=metadata, metadata_null=null,
                            status=status, project=principal(request).scope)
        return JSONResponse(page(rows, more, J.job_object))  # plain JSON already: skip FastAPI's re-encoding

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        return JSONResponse(J.job_object(job_or_404(store, job_id, request)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, request: Request):
        job = job_or_404(store, job_id, request)
        if job["status"] in TERMINAL:
            raise ApiError(400, f"Job {job_id} has already finished ({job['status']}) and cannot be cancelled",
                           param="fine_tuning_job_id", code="job_finished")
        store.update_job(job_id, when=("validating_files", "queued", "running", "paused"), status="cancelled",
                         finished_at=now(), estimated_finish=None,
                         event=("info", "message", "Job cancelled by request"
                                + (": training stops at the next step boundary" if job["status"] == "running" else "")))
        return J.job_object(job_or_404(store, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, request: Request):
        """A running job stops at its next step boundary with a checkpoint; a waiting one is held back."""
        job = job_or_404(store, job_id, request)
        if job["status"] == "paused":
            return J.job_object(job)
        if job["status"] in TERMINAL:
            raise ApiError(400, f"Job {job_id} has already finished ({job['status']}) and cannot be paused",
                           param="fine_tuning_job_id", code="job_not_pausable")
        running = job["status"] == "running"
        if not store.update_job(job_id, when=("validating_files", "queued", "running"), status="paused",
                                estimated_finish=None,
                                event=("info", "message", "Job paused by request" + (
                                    ": training stops at the next step boundary with a checkpoint" if running else ""))):
            raise ApiError(409, f"Job {job_id} changed status meanwhile; retrieve it and try again",
                           param="fine_tuning_job_id", code="job_status_changed")
        return J.job_object(job_or_404(store, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, request: Request):
        """Back to the queue; it continues from its newest checkpoint, with its --max-attempts starts anew."""
        job = job_or_404(store, job_id, request)
        if job["status"] != "paused":
            raise ApiError(400, f"Job {job_id} is {job['status']}, not paused", param="fine_tuning_job_id",
                           code="job_not_paused")
        if job["worker_pid"] is not None or job["worker_id"] is not None:
            raise ApiError(409, f"Job {job_id} is still saving its checkpoint after the pause; resume it in a moment",
                           param="fine_tuning_job_id", code="job_still_pausing")
        # a job paused before its files were checked is checked now; one that ran continues where it stopped
        store.update_job(job_id, when=("paused",), status="queued" if job["started_at"] else "validating_files",
                         attempts=0, event=("info", "message", "Job resumed by request" + (
                             ": it continues from its newest checkpoint" if job["started_at"] else "")))
        return J.job_object(job_or_404(store, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, request: Request, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 20):
        job_or_404(store, job_id, request)
        rows, more = cursor(store.list_events, job_id, after=after, limit=limit)
        return JSONResponse(page(rows, more, J.event_object))

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=100)] = 10):
        job = job_or_404(store, job_id, request)
        rows = [r for r in store.list_checkpoints(job_id) if checkpoint_dir(settings, r).is_dir()]  # old ones pruned
        if after:
            ids = [r["id"] for r in rows]
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no checkpoint with id {after}", param="after", code="invalid_value")
            rows = rows[ids.index(after) + 1:]
        base = job["fine_tuned_model"] or J.fine_tuned_name(job["model"], job["suffix"], job_id)
        render = lambda r: {"object": "fine_tuning.job.checkpoint", "id": r["id"], "created_at": r["created_at"],  # noqa: E731
                            "fine_tuning_job_id": job_id, "step_number": r["step"], "metrics": r["metrics"],
                            "fine_tuned_model_checkpoint": f"{base}:ckpt-step-{r['step']}"}
        return page(rows[:limit], len(rows) > limit, render)

    @app.get("/v1/fine_tuning/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str, request: Request, since: Annotated[int, Query(ge=0)] = 0):
        job = job_or_404(store, job_id, request)
        points, samples, last = [], None, since
        for ev in store.events_since(job_id, since):
            last = ev["seq"]
            d = ev["data"] or {}
            if ev["type"] != "metrics":
                continue
            if "train_loss" in d:
                points.append({"step": d["step"], "train_loss": d["train_loss"], "total_steps": d.get("total_steps")}
                              | ({"train_reward": d["train_reward"]} if "train_reward" in d else {}))
            elif "valid_loss" in d:
                points.append({"step": d["step"], "valid_loss": d["valid_loss"],
                               "valid_mean_token_accuracy": d.get("valid_mean_token_accuracy")}
                              | ({"valid_reward": d["valid_reward"]} if "valid_reward" in d else {}))
                samples = d.get("samples") or samples
        report = (settings.run_dir(job_id) / "report.html").is_file()
        return JSONResponse({"object": "list", "data": points, "last_seq": last, "samples": samples,
                             "status": job["status"], "report_available": report})

    @app.get("/v1/fine_tuning/jobs/{job_id}/report")
    def job_report_root(job_id: str, request: Request):
        return job_report(job_id, "report.html", request)

    @app.get("/v1/fine_tuning/jobs/{job_id}/report/{path:path}")
    def job_report(job_id: str, path: str, request: Request):
        job_or_404(store, job_id, request)
        run = settings.run_dir(job_id).resolve()
        target = (run / (path or "report.html")).resolve()
        if not target.is_relative_to(run) or target.suffix.lower() not in REPORT_TYPES or not target.is_file():
            raise ApiError(404, f"No report file {path!r} for job {job_id} (the report is written when the run ends)",
                           param="path", code="report_not_found")
        headers = {"Content-Security-Policy": REPORT_CSP}
        if target.suffix.lower() in TEXT_TYPES:  # a report names the run's files: shown without the server's paths
            text = scrub(target.read_text(encoding="utf-8", errors="replace"))
            return Response(text, media_type=mimetypes.guess_type(target.name)[0] or "text/plain", headers=headers)
        return FileResponse(target, headers=headers)


def checkpoint_dir(settings: Settings, row: dict) -> Path:
    """A checkpoint's folder under this machine's data folder (the row's path may come from another machine)."""
    return settings.run_dir(row["job_id"]) / "checkpoints" / Path(row["path"]).name


def _metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    """`metadata[k]=v` pairs as the openai client sends `metadata={k: v}`; `metadata=null` selects jobs without."""
    pairs = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]") and len(key) > len("metadata[]"):
            pairs[key[len("metadata["):-1]] = value
        elif key == "metadata" and value not in ("null", ""):
            raise ApiError(400, "Invalid 'metadata': filter with metadata[KEY]=VALUE pairs, or metadata=null",
                           param="metadata", code="invalid_value")
    return pairs, request.query_params.get("metadata") == "null"


def _new_job_row(body: CreateJob, settings: Settings, store: Store, base_models: dict[str, str], who=None) -> dict:
    if body.model not in base_models:
        hint = (" (fine-tuning a fine-tuned model is not supported: start from its base)"
                if body.model.startswith("ft:") else "")
        raise ApiError(400, f"Model {body.model!r} is not available for fine-tuning{hint}; available: "
                            f"{', '.join(sorted(base_models)) or '(none)'}", param="model", code="model_not_available")
    image = is_image_model(base_models[body.model])
    paths, rows = {}, {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        row = store.get_file(file_id)
        if row is None or (who is not None and not who.sees(row.get("project"))):  # another project's: not there
            raise ApiError(400, f"invalid {param}: no such file {file_id}", param=param, code="file_not_found")
        if row["purpose"] != "fine-tune":
            raise ApiError(400, f"invalid {param}: {file_id} has purpose {row['purpose']!r}, not 'fine-tune'",
                           param=param, code="invalid_file_purpose")
        paths[param] = settings.files_dir / row["stored_name"]
        if row["format"] == IMAGES:  # an image upload trains on its unpacked folder
            paths[param] = folder_for(paths[param])
        rows[param] = row
    if body.suffix is not None and not J.SUFFIX_RE.match(body.suffix):
        raise ApiError(400, "suffix must be 1-64 characters from A-Z a-z 0-9 _ -", param="suffix", code="invalid_value")
    if body.integrations:
        raise ApiError(400, "integrations are not supported by tunesmith", param="integrations", code="unsupported")
    job_id = new_id("ftjob-")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    try:
        hyper = J.resolve_hyperparameters(body.hyperparameters.model_dump() if body.hyperparameters else None,
                                          body.method.model_dump() if body.method else None)
        kind = body.method.type if body.method else "supervised"
        if image and kind != "supervised":
            raise J.JobRequestError(f"{body.model} is a text-to-image model: it is fine-tuned with method.type "
                                    f"'supervised' (the denoising objective); {kind!r} is for language models",
                                    "method.type", "unsupported_method")
        grader = _reinforcement_grader(body.method, settings) if kind == "reinforcement" else None
        for param, row in rows.items():
            check_file_kind(row, paths[param], param, kind, image=image)
        client = J.check_client_overrides(body.tunesmith_config)
        judge_ref = base_models.get(settings.judge_model) if settings.judge_model else None
        overrides = J.build_overrides(base_ref=base_models[body.model], training_path=paths["training_file"],
                                      validation_path=paths.get("validation_file"), run_dir=settings.run_dir(job_id),
                                      hyper=hyper, seed=seed, server_defaults=settings.job_defaults, client=client,
                                      method=kind, method_api=R.method_overrides(grader, judge_ref) if grader else [],
                                      objective="denoise" if image else None)
        cfg = J.config_from(overrides)
        if grader is not None:
            overrides += R.finish_overrides(cfg, hyper, rows["training_file"]["examples"] or 0,
                                            "validation_file" in rows)
            cfg = J.config_from(overrides)
            _same_grader(cfg, grader)
    except J.JobRequestError as e:
        raise ApiError(400, e.message, param=e.param, code=e.code) from None
    except ConfigError as e:
        raise ApiError(400, str(e), param="hyperparameters" if not body.tunesmith_config else "tunesmith_config",
                       code="invalid_config") from None
    return {"id": job_id, "created_at": now(), "model": body.model, "training_file": body.training_file,
            "validation_file": body.validation_file, "hyperparameters": J.resolved_hyperparameters(cfg, hyper),
            "method": {"type": kind, "tunesmith_method": cfg.method.name} | ({"grader": grader} if grader else {}),
            "suffix": body.suffix,
            "seed": seed, "metadata": body.metadata, "overrides": overrides, "status": "validating_files"}


def _reinforcement_grader(method: Method, settings: Settings) -> dict:
    """The request's grader, compiled now so that a bad one is a 400 naming its field (OpenAI's invalid_grader)."""
    from ..graders import GraderError

    spec = method.reinforcement.grader  # present: resolve_hyperparameters refused a method without one
    try:
        R.compile_spec(spec, judge_name=settings.judge_model)
    except GraderError as e:
        raise J.JobRequestError(f"invalid grader: {e}", R.grader_param(str(e), "method.reinforcement."),
                                "invalid_grader") from None
    return spec


def _same_grader(cfg, spec: dict) -> None:
    """The grader travels to the worker as a --set value (parsed as YAML): refuse one that would not arrive intact."""
    if cfg.objective.grpo.grader != spec:
        raise J.JobRequestError("the grader cannot be passed to the training run unchanged (a string holds characters "
                                "YAML reads differently, e.g. unpaired surrogates); simplify its strings",
                                "method.reinforcement.grader", "invalid_grader")
