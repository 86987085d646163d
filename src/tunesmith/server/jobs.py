"""Fine-tuning jobs as the API sees them: request -> frozen tunesmith config overrides, and rows -> OpenAI objects.

The mapping from the OpenAI request onto tunesmith's Config:

    model                          -> model.name (a base model the server lists: an alias or one registered
                                      with ``tunesmith serve --model NAME=PATH``; never a client path)
    training_file / validation_file -> data.train / data.valid (the stored copies)
    n_epochs, batch_size           -> train.epochs, train.batch_size ("auto": the config default)
    learning_rate_multiplier       -> train.lr = multiplier x the default lr (2e-4 unless the server's --set changes it)
    seed                           -> train.seed
    method.type supervised         -> method.name from the server defaults (lora unless --set method.name=...)
    method.type dpo                -> objective.name dpo, same method.name; training/validation files must hold
                                      preference pairs (OpenAI input/preferred_output/non_preferred_output, or
                                      TRL prompt/chosen/rejected), a supervised job's SFT records (checked at creation)
    method.dpo.hyperparameters     -> beta -> objective.dpo.beta ("auto": 0.1 unless the server's --set changes it);
                                      n_epochs, batch_size, learning_rate_multiplier as above
    model: a text-to-image model   -> objective.name denoise (method.type supervised only); the files must be image
                                      uploads (image_files.py), data.train / data.valid their unpacked folders
    method.type reinforcement      -> objective.name grpo; files must hold prompts (OpenAI's messages ending with a
                                      user turn, or TRL's prompt, plus the fields the grader reads); method.reinforcement
                                      .grader and its hyperparameters: see reinforcement.py
    tunesmith_config {dotted: v}   -> a tunesmith extension: more overrides, from a safe list of sections

The job object echoes the method with every "auto" resolved, as the hosted API does:
``method: {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3, ...}}}``; a reinforcement job's
method also carries its grader, as given.

The overrides are resolved once, at creation, and stored with the job, so a job resumed after a restart
trains with exactly the config it started with (resume refuses a changed config).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config

# What a client may set through `tunesmith_config`: whole sections that only shape training, and named
# fields elsewhere. Never anything the server would read, write, import or call: data files, model names,
# chat-template files, paraphrase models, custom metric functions ('module:function' imports code),
# MLflow URIs, moderation endpoints, trust_remote_code. New config fields stay closed until listed here.
CLIENT_PREFIXES = ("train.", "method.", "checkpoint.")
CLIENT_KEYS = ("eval.every_steps", "eval.batch_size", "eval.max_batches", "eval.samples", "eval.max_new_tokens",
               "eval.early_stopping_patience", "eval.min_delta", "eval.compare_base", "eval.compare_examples",
               "eval.metric_examples", "eval.overfit_patience", "data.max_length", "data.overflow", "data.train_on",
               "data.format", "data.valid_fraction", "data.shuffle", "data.min_examples",
               # how a reinforcement job samples and weighs answers; its grader and judge come from the request and
               # the server (SERVER_OWNED)
               *(f"objective.grpo.{k}" for k in ("num_generations", "max_completion_length", "temperature", "top_p",
                                                  "top_k", "loss_type", "epsilon", "epsilon_high", "scale_rewards",
                                                  "beta", "mask_truncated_completions")),
               # how an image job trains and draws its evaluation grids (no paths among them)
               *(f"objective.denoise.{k}" for k in ("resolution", "random_crop", "random_flip", "caption_dropout",
                                                     "snr_gamma", "train_text_encoder", "image_modes", "eval_timesteps",
                                                     "validation_prompts", "control_prompts", "images_per_prompt",
                                                     "inference_steps", "guidance_scale")))
CLIENT_FORBIDDEN = ("train.augment.paraphrase_model",)
# Fields the server sets itself; an operator's --set may not move them either.
SERVER_OWNED = ("model.name", "data.train", "data.valid", "data.test", "output_dir", "objective.name",
                "objective.grpo.grader", "objective.grpo.judge_model")
# OpenAI's method.type -> tunesmith's objective.name, and the record formats a job of that type trains on
# (data.FORMATS, and the pair formats of data/preference.py: spelled out so this module imports no torch).
# Prompt files (data/prompts.py) are stored as rft_<its format>: a prompts "messages" file is not an SFT one.
METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
METHOD_FORMATS = {"supervised": ("messages", "prompt_completion", "text", "alpaca", "sharegpt"),
                  "dpo": ("preference", "chosen_rejected"),
                  "reinforcement": ("rft_messages", "rft_prompt")}
# Hyperparameters a method adds to n_epochs, batch_size and learning_rate_multiplier, with their "auto".
METHOD_HYPER = {"supervised": {}, "dpo": {"beta": "auto"},
                "reinforcement": {"compute_multiplier": "auto", "eval_interval": "auto", "eval_samples": "auto",
                                  "reasoning_effort": "default"}}
COMMON_HYPER = ("n_epochs", "batch_size", "learning_rate_multiplier")  # also the job's deprecated top-level field
SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JobRequestError(Exception):
    """A bad create request: carries the OpenAI error fields."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def check_client_overrides(extra: dict[str, Any] | None) -> list[str]:
    """``tunesmith_config`` ({dotted key: JSON value}) as ``--set`` strings, refusing keys outside the safe list."""
    if not extra:
        return []
    if not isinstance(extra, dict):
        raise JobRequestError("tunesmith_config must be an object of dotted config keys, e.g. "
                              '{"train.max_steps": 20}', "tunesmith_config")
    out = []
    for key, value in extra.items():
        # A section set whole (e.g. "train.augment": {...}) would reach a forbidden field inside it.
        hides_forbidden = any(f.startswith(key + ".") for f in CLIENT_FORBIDDEN)
        allowed = ((key.startswith(CLIENT_PREFIXES) or key in CLIENT_KEYS) and not key.startswith(CLIENT_FORBIDDEN)
                   and not hides_forbidden)
        if not allowed:
            raise JobRequestError(f"tunesmith_config key {key!r} cannot be set through the API; allowed: keys under "
                                  f"{', '.join(CLIENT_PREFIXES)} (except {', '.join(CLIENT_FORBIDDEN)}), and "
                                  f"{', '.join(CLIENT_KEYS)}", f"tunesmith_config.{key}", "forbidden_config_key")
        out.append(f"{key}={json.dumps(value)}")
    return out


def check_server_overrides(items: list[str]) -> list[str]:
    """The operator's ``tunesmith serve --set`` defaults, validated now so a typo stops the server start."""
    from ..config import parse_override

    for item in items:
        path, _ = parse_override(item)
        key = ".".join(path)
        if key in SERVER_OWNED:
            hint = " (name the judge with --judge-model NAME)" if key == "objective.grpo.judge_model" else ""
            raise ConfigError(f"--set {item!r}: {key} is set by the server for each job{hint}")
    load_config(None, list(items))
    return list(items)


def resolve_hyperparameters(top: dict | None, method: dict | None) -> dict:
    """method.<type>.hyperparameters win over the deprecated top-level hyperparameters."""
    method = method or {"type": "supervised"}
    kind = method.get("type")
    if kind not in METHODS:
        raise JobRequestError(f"method.type {kind!r} is not supported by tunesmith; use one of: "
                              f"{', '.join(METHODS)}", "method.type", "unsupported_method")
    stray = next((k for k, v in method.items() if k not in ("type", kind) and v is not None), None)
    if stray:  # e.g. supervised hyperparameters on a dpo job: refused rather than silently ignored
        raise JobRequestError(f"method.{stray} is given but method.type is {kind!r}: put the hyperparameters "
                              f"under method.{kind}", f"method.{stray}")
    if kind == "reinforcement" and (method.get(kind) or {}).get("grader") is None:
        raise JobRequestError(
            'method.reinforcement.grader is required: it scores every sampled answer, e.g. {"type": "string_check", '
            '"name": "exact", "operation": "eq", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}',
            "method.reinforcement.grader", "missing_required_parameter")
    inner = ((method.get(kind) or {}).get("hyperparameters") or {})
    merged = {k: "auto" for k in COMMON_HYPER} | METHOD_HYPER[kind]
    merged.update({k: v for k, v in (top or {}).items() if v is not None})
    merged.update({k: v for k, v in inner.items() if v is not None})
    return merged


def build_overrides(*, base_ref: str, training_path: Path, validation_path: Path | None, run_dir: Path,
                    hyper: dict, seed: int, server_defaults: list[str], client: list[str],
                    method: str = "supervised", method_api: list[str] = (), objective: str | None = None) -> list[str]:
    """The complete, ordered override list for one job: server defaults < client extension < API fields.

    method_api: the method's own fields (a reinforcement job's grader), set like the other API fields; objective:
    the objective when the model decides it rather than the method (denoise for a text-to-image model)."""
    api = [f"model.name={json.dumps(str(base_ref))}", f"data.train={json.dumps(str(training_path))}",
           f"output_dir={json.dumps(str(run_dir))}", f"train.seed={int(seed)}"]
    if objective is not None:
        api.append(f"objective.name={objective}")
    elif method != "supervised":  # supervised keeps the default (sft), so its overrides read as before
        api.append(f"objective.name={METHODS[method]}")
    api += list(method_api)
    if hyper.get("beta", "auto") != "auto":
        api.append(f"objective.dpo.beta={float(hyper['beta'])!r}")
    if validation_path is not None:
        api.append(f"data.valid={json.dumps(str(validation_path))}")
    if hyper.get("n_epochs") != "auto":
        api.append(f"train.epochs={hyper['n_epochs']}")
    if hyper.get("batch_size") != "auto":
        api.append(f"train.batch_size={hyper['batch_size']}")
    overrides = list(server_defaults) + list(client) + api
    mult = hyper.get("learning_rate_multiplier")
    if mult != "auto":
        lr = config_from(overrides).train.lr * float(mult)
        overrides.append(f"train.lr={lr!r}")
    return overrides


def config_from(overrides: list[str]) -> Config:
    return load_config(None, overrides)


def resolved_hyperparameters(cfg: Config, hyper: dict) -> dict:
    """What the job will really use, shown back to the client ("auto" replaced by the value)."""
    mult = hyper.get("learning_rate_multiplier")
    epochs = cfg.train.epochs
    out = {"n_epochs": int(epochs) if float(epochs).is_integer() else epochs, "batch_size": cfg.train.batch_size,
           "learning_rate_multiplier": 1.0 if mult == "auto" else float(mult)}
    if cfg.objective.name == "dpo":
        out["beta"] = cfg.objective.dpo.beta
    if cfg.objective.name == "grpo":
        from .reinforcement import resolved

        out |= resolved(cfg, hyper)
    return out


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"


def job_object(row: dict) -> dict:
    """A jobs row as OpenAI's ``fine_tuning.job`` object."""
    hyper = row["hyperparameters"]  # the method's, resolved (dpo's include beta)
    method = row["method"] or {}
    kind = method.get("type", "supervised")
    inner = {"grader": method["grader"]} if "grader" in method else {}  # reinforcement: the grader as given
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "created_at": row["created_at"],
        "model": row["model"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "hyperparameters": {k: v for k, v in hyper.items() if k in COMMON_HYPER},  # deprecated: the common ones
        "method": {"type": kind, kind: inner | {"hyperparameters": hyper}},
        "status": row["status"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "estimated_finish": row["estimated_finish"] if row["status"] == "running" else None,
        "trained_tokens": row["trained_tokens"],
        "result_files": row["result_files"] or [],
        "organization_id": "org-tunesmith",
        "seed": row["seed"],
        "suffix": row["suffix"],
        "metadata": row["metadata"],
        "integrations": [],
        "user_provided_suffix": row["suffix"],
    }


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"], "data": row["data"]}


def file_object(row: dict) -> dict:
    return {"object": "file", "id": row["id"], "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "expires_at": None, "status_details": None}
