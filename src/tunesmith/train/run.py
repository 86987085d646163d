"""The run folder: what a run writes besides checkpoints, and the end-of-run base-versus-tuned proof.

    RUN/
      config.resolved.yaml   every field, defaults included
      run.json               parameter counts, step plan, hardware, data hash; updated at the end
      metrics.jsonl          one JSON event per line (train, eval, checkpoint, ...)
      train.log              the same, for people
      tensorboard/           TensorBoard event files (when the package is installed)
      checkpoints/           step-NNNNNN/ (resume state) and best.safetensors (best trainable weights)
      best/                  the delivered model: PEFT adapter or full model folder, with tokenizer
      compare.json           base versus tuned on held-out examples
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import allocator, cpus
from .. import data as tsdata
from .. import models
from ..config import Config, dump_config
from . import checkpoint as ckpt
from ..events import (ConsoleSink, JsonlSink, LogFileSink, Message, MLflowSink, TensorBoardSink, flatten,
                     tensorboard_available)


class RunDirError(Exception):
    pass


_RUN_MARKERS = ("config.resolved.yaml", "metrics.jsonl", "checkpoints")


def prepare_run_dir(out: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder; refuse to mix two runs in one folder."""
    holds_run = out.is_dir() and any((out / m).exists() for m in _RUN_MARKERS)
    if holds_run and not resume:
        if not overwrite:
            raise RunDirError(f"{out} already holds a run: use --resume to continue it, --overwrite to start "
                              f"over, or another output folder (--out / output_dir)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume or not (out / "config.resolved.yaml").exists():
        dump_config(cfg, out / "config.resolved.yaml")  # on resume, rewritten once the checkpoint accepts it


def default_sinks(out: Path, quiet: bool = False, cfg: Config | None = None) -> list:
    sinks = [ConsoleSink(quiet=quiet), JsonlSink(out / "metrics.jsonl"), LogFileSink(out / "train.log")]
    if tensorboard_available():
        sinks.append(TensorBoardSink(out / "tensorboard"))
    if cfg is not None and cfg.eval.mlflow_tracking_uri:
        try:
            sinks.append(MLflowSink(cfg.eval.mlflow_tracking_uri, cfg.eval.mlflow_experiment, out,
                                    params=flatten(json.loads(cfg.model_dump_json()))))
        except Exception as e:  # a missing package or an unreachable server must not stop the training
            for sink in sinks:
                sink(Message("warning", f"MLflow logging is off: {type(e).__name__}: {e}"))
    return sinks


def config_hash(cfg: Config) -> str:
    """Hash of what changes the result. Not the output folder, nor how each step's examples are split into
    micro-batches and over processes (train.batch_size, train.grad_accum, distributed): resume compares the
    effective batch instead, so a run can continue on another number of processes."""
    d = json.loads(cfg.model_dump_json())
    d.pop("output_dir", None)
    d.pop("distributed", None)
    d["train"].pop("batch_size", None)
    d["train"].pop("grad_accum", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def data_hash(cfg: Config) -> str:
    h = hashlib.sha256()
    for p in (cfg.data.train, cfg.data.valid):
        if p and Path(p).is_file():
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def write_run_info(out: Path, cfg: Config, counts, plan, n_train: int, n_valid: int, accelerator, precision) -> None:
    if not accelerator.is_main_process:
        return
    info = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_fraction": counts.trainable / max(1, counts.total),
        "train_examples": n_train,
        "valid_examples": n_valid,
        "plan": plan.__dict__,
        "data_hash": data_hash(cfg),
        "config_hash": config_hash(cfg),
        "precision": {"name": precision.name, "reason": precision.reason,
                      "weights_loaded_in": str(precision.load_dtype).replace("torch.", "")},
        "hardware": {"device": str(accelerator.device), "dtype": precision.name, "processes": accelerator.num_processes,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "available_cpus": cpus.available_cpus(),
                     "omp_wait": os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT") or "default",
                     "platform": platform.platform(),
                     "cpu": platform.processor() or platform.machine(), "allocator": allocator.describe()},
    }
    (out / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def saved_plan(out: Path) -> dict | None:
    """The step plan run.json recorded for the run in ``out`` (read on resume, before it is rewritten)."""
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8")).get("plan")
    except (OSError, ValueError, AttributeError):
        return None


def saved_precision(out: Path) -> str | None:
    """The precision run.json recorded for the run in ``out``, if any: a resumed run computes as it started."""
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8"))["precision"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_precision(cfg: Config, model_path, accelerator, resumed: bool, shape: tuple[int, int] | None = None):
    """The run's precision: model.dtype, or for auto the measured choice (models.select_precision: this CPU's bf16
    against fp32 at the model's shapes), taken by every process from the main one; a resumed auto run keeps the
    precision it started with (run.json), whatever a measurement on a busier or other machine would say now."""
    from dataclasses import replace

    from .distributed import main_process_choice

    requested = cfg.model.dtype
    started = saved_precision(Path(cfg.output_dir)) if resumed and requested == "auto" else None
    shape = shape or models.matmul_shape(model_path, cfg.model.trust_remote_code)
    precision = models.select_precision(started or requested, accelerator.device, cfg.method.name, shape)
    if started:
        precision = replace(precision, reason="auto, as when the run started (run.json)")
    return main_process_choice(accelerator, precision)


def update_run_info(out: Path, **fields) -> None:
    p = out / "run.json"
    info = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    info.update(fields)
    p.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")


# ---------------------------------------------------------------- best weights


def save_best_weights(out: Path, weights: dict[str, torch.Tensor], step: int) -> None:
    """Atomically (temporary name, then rename); refuses NaN/inf, and a full disk keeps the previous file."""
    ckpt.check_finite(weights, f"the best weights (step {step})")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoints" / ".best.tmp"
    try:
        save_file(weights, tmp, metadata={"step": str(step)})
        tmp.replace(out / "checkpoints" / "best.safetensors")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ckpt.CheckpointError(ckpt.write_failure(e, f"the best weights (step {step})", out / "checkpoints")) from None


def load_best_weights(out: Path) -> dict[str, torch.Tensor] | None:
    p = out / "checkpoints" / "best.safetensors"
    try:
        return load_file(p) if p.is_file() else None
    except SafetensorError as e:
        raise ckpt.CheckpointError(f"{p} cannot be read ({e}): it is damaged; start the run again (--overwrite)") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Before a resume from ``step``: drop the events of later steps (the resumed run logs them again) and a
    partly written last line, so metrics.jsonl never holds a step twice."""
    if not path.is_file():
        return
    keep = []
    for raw in path.read_bytes().split(b"\n")[:-1]:  # the piece after the last newline is partial or empty
        try:
            event_step = json.loads(raw).get("step")
        except (ValueError, AttributeError):
            continue  # a line torn by a crash
        if not (isinstance(event_step, int) and event_step > step):
            keep.append(raw + b"\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(keep))
    tmp.replace(path)


def restore_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def save_delivered_model(out: Path, model, tokenizer, cfg: Config, model_path: Path, save=None) -> Path:
    """Write best/ atomically: to best.tmp, then swap it in. ``save``: the model kind's writer (train/kinds.py;
    default a language model's, models.save_model)."""
    tmp, final = out / "best.tmp", out / "best"
    ckpt.check_finite({n: p for n, p in model.named_parameters() if p.requires_grad}, f"the delivered model {final}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        (save or models.save_model)(model, tokenizer, tmp, base_ref=str(model_path), method=cfg.method.name)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.CheckpointError(ckpt.write_failure(e, f"the delivered model {final}", out / "checkpoints")) from None
    return final


# ---------------------------------------------------------------- generations and the final comparison


def sample_generations(model, tokenizer, examples, cfg: Config) -> list[dict]:
    from ..evaluate import generate_batch

    chats = [e for e in examples if e.messages is not None][:cfg.eval.samples]
    if not chats:
        return []
    pairs = [tsdata.prompt_and_reference(e) for e in chats]
    outputs = generate_batch(model, tokenizer, [p for p, _ in pairs], max_new_tokens=cfg.eval.max_new_tokens,
                             batch_size=cfg.eval.batch_size)
    return [{"prompt": p[-1]["content"], "output": o, "reference": r} for (p, r), o in zip(pairs, outputs)]


def held_out_examples(cfg: Config, splits) -> list:
    examples = tsdata.load_examples(cfg.data.test, cfg.data.format) if cfg.data.test else splits.valid
    return [e for e in examples if e.messages is not None][:cfg.eval.compare_examples]


def compare_with_base(out: Path, model, tokenizer, cfg: Config, splits, model_path: Path, emit,
                      source: str | None = None) -> dict | None:
    """Both models answer the same held-out prompts; metrics side by side, wins/losses, bootstrap CI."""
    from ..evaluate import base_model, compare_results, evaluate_model, format_comparison

    examples = held_out_examples(cfg, splits)
    if not examples:
        emit(Message("warning", "no held-out chat examples: base-versus-tuned comparison skipped"))
        return None
    pairs = [tsdata.prompt_and_reference(e) for e in examples]
    convs, refs = [p for p, _ in pairs], [r for _, r in pairs]
    # Both sides with the run's tokenizer, and the loss as the run's validation loss (its data settings).
    kw = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, examples=examples,
              data=cfg.data)
    tuned = evaluate_model(model, tokenizer, convs, refs, **kw)
    with base_model(model, model_path, trust_remote_code=cfg.model.trust_remote_code) as base_side:
        base = evaluate_model(base_side.model, tokenizer, convs, refs, **kw)
    cmp = compare_results(base, tuned, metric="exact_match")  # from the scores the evaluations hold
    result = {
        "examples": len(examples),
        "source": source or cfg.data.test or "validation split",
        "base": base.to_json(),
        "tuned": tuned.to_json(),
        "comparison": cmp.to_json(),
        "samples": [{"prompt": c[-1]["content"], "reference": r, "base": b, "tuned": t}
                    for c, r, b, t in zip(convs, refs, base.predictions, tuned.predictions)][:10],
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    table = format_comparison(base, tuned, cmp)
    emit(Message("info", "base versus tuned on %d held-out examples (%s):\n%s" % (len(examples), result["source"], table)))
    update_run_info(out, comparison={"base": base.metrics, "tuned": tuned.metrics})
    return result
