"""The training loop: one function, read top to bottom.

    data (tokenizer only) -> model -> adapt -> optimizer/schedule -> [resume] -> loop:
        step (accumulated, normalised by the step's weight) -> log -> every N: evaluate, keep best, early stop
                                                             -> every M: checkpoint
    -> restore best -> save best/ -> compare base vs tuned on held-out data

What is optimised is the objective's (objectives/: sft, dpo, ...): how records render and collate, a micro-batch's
summed loss, what a step's loss is divided by (target tokens, pairs), and the held-out evaluation. Everything else
here is the same for every objective. Features are small functions it calls (steps.py, checkpoint.py, run.py);
there is no trainer class.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from .. import allocator, cpus
from .. import data as tsdata
from .. import models
from .. import objectives
from .. import report
from .. import safety
from ..config import Config, dump_config
from . import checkpoint as ckpt
from . import distributed as dist
from . import run as runfiles
from ..events import CheckpointSaved, EarlyStopped, Emitter, EvalEnd, Message, RunEnded, RunStarted, StepEnd
from .monitor import EvalMonitor
from .optim import build_optimizer, build_scheduler, plan_steps
from .ema import FILE as ema_file
from .ema import EMA
from .kinds import kind_mismatch, kind_of
from .packing import packs, row_layout
from .steps import (Compute, backward_step, epoch_order, global_target_tokens, grads_finite, length_grouped_order,
                    step_micro_batches)


class TrainingError(Exception):
    """A run that cannot go on, worded for the user."""


class TrainingFailed(Exception):
    """The run started but cannot go on (K non-finite steps in a row, out of memory at micro-batch 1);
    the CLI prints the message and exits 1, without a traceback. Checkpoints written so far are intact."""


@dataclass
class RunResult:
    output_dir: Path
    status: str
    steps: int
    best_step: int | None
    best_val_loss: float | None
    comparison: dict | None


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          sinks: list | None = None, quiet: bool = False, stop_requested=lambda: False) -> RunResult:
    """Run one fine-tune described by ``cfg``; see the module docstring for the order of things.

    ``resume`` continues from the newest complete checkpoint in ``cfg.output_dir`` (refused when the config
    or data changed, unless ``force``); ``stop_requested`` is polled at each step boundary, and when it
    returns True a checkpoint is written and the run ends with status "interrupted".
    """
    t_start = time.time()
    allocator.prepare_training_process()  # glibc tuned when tcmalloc is not preloaded (allocator.py)
    threads = cpus.configure_threads()  # no more threads than the CPUs this process may use (cpus.py)
    accelerator = dist.build_accelerator(cfg)  # DDP or FSDP when launched on several processes
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        runfiles.prepare_run_dir(out, cfg, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    resume_warnings: list[str] = []
    latest = ckpt.latest_checkpoint(out / "checkpoints", warn=resume_warnings.append) if resume else None
    if resume and accelerator.is_main_process:  # the resumed run logs the steps after the checkpoint again
        runfiles.truncate_metrics(out / "metrics.jsonl", ckpt.checkpoint_step(latest) if latest else 0)
    # Only the main process writes files and progress; ``sinks`` adds to the run folder's own.
    emit = Emitter(runfiles.default_sinks(out, quiet, cfg) + list(sinks or []) if accelerator.is_main_process else [])
    set_seed(cfg.train.seed)

    # 1. Data first, with the tokenizer only: bad input never reaches the model.
    model_path = models.ensure_local(cfg.model.name, revision=cfg.model.revision)
    kind = kind_of(model_path)  # a causal language model or a text-to-image pipeline (kinds.py)
    objective = objectives.for_config(cfg)
    mismatch = kind_mismatch(objective, kind, cfg.model.name)  # e.g. objective sft on a text-to-image pipeline
    if mismatch:
        raise TrainingError(mismatch)
    check_best_metric(cfg.eval, objective)
    tokenizer = kind.tokenizer(model_path, cfg)
    splits = objective.load(cfg, emit)  # read, validate, screen (PII, harmful content: redact or refuse)
    train_items = objective.render(splits.train, tokenizer, cfg, emit, "train")
    valid_items = objective.render(splits.valid, tokenizer, cfg, emit, "valid")
    # task metrics and the overfitting watch (grpo's watches minus its rewards); checks eval.metrics now
    monitor = EvalMonitor(cfg.eval, names=getattr(objective, "watch_names", EvalMonitor.names))
    if accelerator.is_main_process:  # preflight.json: what `tunesmith check` says of the data
        getattr(objective, "write_preflight", report.write_preflight)(out, cfg, tokenizer, emit)

    # 2. Model, adapted for the method; optimizer and schedule over what trains.
    precision = runfiles.run_precision(cfg, model_path, accelerator, resume and latest is not None,
                                       kind.matmul_shape(model_path, cfg))
    emit(Message("info", f"precision: {precision.name} ({precision.reason})"))
    if accelerator.device.type == "cpu":
        emit(Message("info", f"CPU threads: {threads.threads} of the {threads.available} CPUs this process may use "
                             f"({threads.reason}); OpenMP wait: {threads.wait}"))
    dtype = precision.load_dtype
    model = kind.load(model_path, cfg, dtype, tokenizer)
    # Paraphrases are written once, before training, by the untouched base model (or augment.paraphrase_model).
    paraphraser = None
    if cfg.train.augment.paraphrase:
        with accelerator.main_process_first():  # the main process writes the cache; the others then read it
            paraphraser = _paraphraser(cfg, model, tokenizer, splits.train, accelerator, emit)
    augmenter = tsdata.Augmenter(cfg.train.augment, cfg.train.seed, paraphraser) if _augmenting(cfg) else None
    model, counts = kind.adapt(model, cfg)
    if precision.trained_dtype is not None:  # mixed precision: what trains is kept in fp32
        models.keep_trained_in(model, precision.trained_dtype)
    compute = Compute(fused=cfg.train.kernels == "auto", autocast=precision.autocast)  # per pass (steps.py)
    kind.speed_up(model, cfg, compute, emit)  # kernels, checkpointing, packing, compile: as the kind allows
    # an epoch's examples: denoise's aspect-ratio buckets round each bucket up to whole micro-batches
    plan = plan_steps(getattr(objective, "epoch_examples", len)(train_items), cfg.train, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # train.ema_decay: a moving average of the trained tensors, which evaluation, the best snapshot and delivery see
    ema = EMA(dist.trainable(accelerator.unwrap_model(model)), cfg.train.ema_decay) if cfg.train.ema_decay else None
    # What the objective needs before the first step, from the starting model (dpo: the reference log-probabilities).
    items = objective.prepare(model, {"train": train_items, "valid": valid_items}, tokenizer, cfg, model_path,
                              accelerator, compute, emit, precision.name)
    train_items, valid_items = items["train"], items["valid"]

    # 3. Resume: weights, optimizer, schedule, RNG and data position from the newest complete checkpoint.
    state = ckpt.TrainState(config_hash=runfiles.config_hash(cfg), data_hash=runfiles.data_hash(cfg))
    if resume:
        for text in resume_warnings:
            emit(Message("warning", text))
        if latest is None:
            emit(Message("warning", f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0"))
        else:
            saved = dist.load_checkpoint(latest, accelerator.unwrap_model(model), optimizer, scheduler, accelerator)
            if ema is not None:
                shadows = ckpt.load_extra(latest, ema_file)
                if shadows is None:
                    raise TrainingError(f"train.ema_decay is set, and {latest} holds no {ema_file} (the run was "
                                        "started without it): resume with the config it started with")
                ema.load_state_dict(shadows)
            _check_resume_matches(saved, state, force, emit, runfiles.saved_plan(out), plan)
            saved.config_hash, saved.data_hash = state.config_hash, state.data_hash
            state = saved
            emit(Message("info", f"resumed from {latest} (step {state.step})"))
    if accelerator.is_main_process:
        dump_config(cfg, out / "config.resolved.yaml")
    best_weights = runfiles.load_best_weights(out) if state.best_step is not None else None
    if best_weights is not None and dist.is_sharded(accelerator):
        best_weights = dist.shard_like(best_weights, accelerator.unwrap_model(model))

    emit(RunStarted(str(out), cfg.method.name, counts.trainable, counts.total, plan.total_steps,
                    plan.steps_per_epoch, len(train_items), len(valid_items), str(accelerator.device),
                    precision.name, accelerator.num_processes, state.step))
    runfiles.write_run_info(out, cfg, counts, plan, len(train_items), len(valid_items), accelerator, precision)

    valid_batches = _eval_batches(objective, valid_items, cfg, tokenizer, accelerator)
    eval_every = cfg.eval.every_steps or plan.steps_per_epoch
    ckpt_every = cfg.checkpoint.every_steps or eval_every
    status, skipped_in_row, t_last = "completed", 0, time.time()
    step_time, steps_timed = 0.0, 0  # training time only (evaluation and checkpoints excluded), for the ETA

    # 4. The loop. Epoch order depends only on (seed, epoch); position is kept in micro-batches.
    busy = cpus.Oversubscription(threads.threads, threads.available) if accelerator.device.type == "cpu" else None
    model.train()
    while state.step < plan.total_steps and status == "completed":
        items = objective.render(augmenter.apply(splits.train, state.epoch), tokenizer, cfg, emit, "train", quiet=True) \
            if augmenter else train_items
        weights = [objective.weight(it) for it in items]  # what a step's summed loss is divided by
        trained = [objective.trained_tokens(it) for it in items]
        lengths = [objective.length(it) for it in items]
        # an objective may order an epoch itself (denoise's buckets: micro-batches of one image shape each)
        order = getattr(objective, "epoch_order", lambda *a: None)(items, cfg.train.seed, state.epoch, cfg.data.shuffle)
        if order is None:
            order = (length_grouped_order(lengths, cfg.train.batch_size, cfg.train.seed, state.epoch, cfg.data.shuffle)
                     if cfg.train.group_by_length
                     else epoch_order(len(items), cfg.train.seed, state.epoch, cfg.data.shuffle))
        # packed micro-batches cost their tokens: several processes get a step's examples dealt out by tokens
        steps = step_micro_batches(order, plan.micro_batch, plan.grad_accum, plan.processes, accelerator.process_index,
                                   lengths if packs(model) else None)
        for k in range(state.step_in_epoch, len(steps)):
            if state.step >= plan.total_steps:
                break
            first = k * plan.examples_per_step
            step_items = items
            if hasattr(objective, "prepare_step"):  # grpo: answers sampled and graded now; denoise: noise drawn
                mine = [i for mb in steps[k] for i in mb]
                step_items = objective.prepare_step(model, items, mine, tokenizer, compute, state.step, accelerator)
                # each process prepared its own examples: the step's divisor is the sum over processes
                _, counted = dist.sum_over_ranks(accelerator, 0.0, {
                    "weight": sum(objective.weight(step_items[i]) for i in mine),
                    "tokens": sum(objective.trained_tokens(step_items[i]) for i in mine)})
                step_weight, step_tokens = int(counted["weight"]), int(counted["tokens"])
            else:
                step_weight = global_target_tokens(order, first, plan.examples_per_step, weights)
                step_tokens = global_target_tokens(order, first, plan.examples_per_step, trained)
            (loss_sum, stats), plan = _backward_within_memory(model, optimizer, objective, step_items, steps[k],
                                                              step_weight, plan, tokenizer, accelerator, emit, compute)
            loss_sum, stats = dist.sum_over_ranks(accelerator, loss_sum, stats)
            grad_norm = (float(accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm))
                         if cfg.train.max_grad_norm else None)
            state.step_in_epoch = k + 1
            # The clipping norm is over every gradient of every rank (the same number on each): finite exactly when
            # they all are. Without clipping, each rank checks its own and the ranks agree.
            grads_ok = (math.isfinite(grad_norm) if grad_norm is not None
                        else dist.every_rank(accelerator, grads_finite(trainable)))
            if not math.isfinite(loss_sum) or not grads_ok:
                # Never apply a non-finite update: skip it, count it, stop if it keeps happening.
                optimizer.zero_grad(set_to_none=True)
                skipped_in_row, state.skipped_steps = skipped_in_row + 1, state.skipped_steps + 1
                emit(Message("warning", f"non-finite loss or gradient at step {state.step + 1}: update skipped "
                                        f"({skipped_in_row} in a row, {state.skipped_steps} in this run)", state.step + 1))
                if skipped_in_row >= cfg.train.max_skipped_steps:
                    _stop_non_finite(out, state, skipped_in_row, accelerator, emit)
                continue
            skipped_in_row = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            state.step += 1
            state.tokens_seen += step_tokens
            monitor.add_train_loss(*(objective.watched(loss_sum, stats, step_weight) if hasattr(objective, "watched")
                                     else (loss_sum, step_weight)))
            now = time.time()
            step_time += now - t_last
            steps_timed += 1
            if state.step % cfg.train.log_every == 0 or state.step == plan.total_steps:
                eta = step_time / steps_timed * (plan.total_steps - state.step)
                emit(StepEnd(state.step, plan.total_steps, _epoch_float(state, len(steps)), loss_sum / max(1, step_weight),
                             scheduler.get_last_lr()[0], grad_norm, step_tokens, step_tokens / max(1e-9, now - t_last),
                             now - t_start, eta, objective.per_unit(stats, step_weight)))
                warning = objective.zero_spread_warning() if hasattr(objective, "zero_spread_warning") else None
                if warning:
                    emit(Message("warning", warning, state.step))
            t_last = now
            warning = busy.step() if busy is not None else None  # other processes taking this machine's CPUs
            if warning:
                emit(Message("warning", warning, state.step))

            last = state.step >= plan.total_steps
            if state.step % eval_every == 0 or last:
                with ema.applied() if ema is not None else nullcontext():
                    best_weights, stop = _evaluate(model, objective, valid_batches, splits, tokenizer, cfg, state,
                                                   accelerator, emit, out, best_weights, monitor, compute)
                if stop:
                    status = "early_stopped"
            # Ctrl-C / SIGTERM (on any process: every rank must stop at the same step): checkpoint, then leave
            if status == "completed" and dist.any_rank(accelerator, stop_requested()):
                status = "interrupted"
            if state.step % ckpt_every == 0 or last or status != "completed":
                path = dist.save_checkpoint(out / "checkpoints", accelerator.unwrap_model(model), optimizer,
                                            scheduler, state, cfg.checkpoint.keep_last, accelerator,
                                            {ema_file: ema.state_dict()} if ema is not None else None)
                emit(CheckpointSaved(state.step, str(path)))
            if status != "completed":
                break
            t_last = time.time()
        else:
            state.epoch += 1
            state.step_in_epoch = 0

    # 5. Deliver the best model and prove it against the base.
    if accelerator.is_main_process:
        runfiles.update_run_info(out, skipped_steps=state.skipped_steps, plan=plan.__dict__)
    unwrapped = accelerator.unwrap_model(model)
    if best_weights is not None:
        runfiles.restore_weights(unwrapped, best_weights)
    elif ema is not None:  # no evaluation kept a best: deliver the average
        ema.apply()
    if dist.is_sharded(accelerator):  # the main process delivers an unsharded copy (every rank helps gather it)
        unwrapped = _unsharded_copy(unwrapped, cfg, model_path, dtype, tokenizer, accelerator)
    comparison = None
    if accelerator.is_main_process:
        best_dir = runfiles.save_delivered_model(out, unwrapped, tokenizer, cfg, model_path, kind.save)
        if status != "interrupted" and cfg.eval.compare_base:
            comparison = objective.compare(out, unwrapped, tokenizer, cfg, splits, model_path, emit, compute)
        if status != "interrupted" and cfg.safety.gate:  # release gate: refusal probes, base vs tuned -> safety.json
            safety.gate.after_training(out, unwrapped, tokenizer, cfg, model_path, emit)
        emit(Message("info", f"delivered model: {best_dir}"))
    emit(RunEnded(state.step, status, state.best_step, state.best_val_loss, time.time() - t_start))
    if accelerator.is_main_process:
        report.write_report_safely(out, emit)  # before the sinks close, so MLflow can upload it
    emit.close()
    return RunResult(out, status, state.step, state.best_step, state.best_val_loss, comparison)


# ---------------------------------------------------------------- helpers the loop calls


def _augmenting(cfg: Config) -> bool:
    a = cfg.train.augment
    return bool(a.system_prompts) or a.prompt_noise > 0 or a.paraphrase


def _paraphraser(cfg: Config, model, tokenizer, examples, accelerator, emit):
    """A cached, model-written paraphraser, with its cache filled now for every training prompt."""
    import hashlib

    from ..evaluate import generate_batch

    aug = cfg.train.augment
    writer, writer_tok = model, tokenizer
    if aug.paraphrase_model:
        path = models.ensure_local(aug.paraphrase_model)
        writer_tok = models.load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
        writer = models.load_model(path, dtype=next(model.parameters()).dtype,
                                   trust_remote_code=cfg.model.trust_remote_code, tokenizer=writer_tok)
        writer.to(accelerator.device)
    writer_ref = aug.paraphrase_model or cfg.model.name
    key = hashlib.sha256(f"{writer_ref}|{aug.paraphrase_count}".encode()).hexdigest()[:16]
    cache_file = models.cache_dir() / "paraphrases" / f"{key}.json"
    generate = lambda convs: generate_batch(writer, writer_tok, convs, max_new_tokens=cfg.data.max_length,  # noqa: E731
                                            batch_size=cfg.eval.batch_size)
    paraphraser = tsdata.CachedParaphraser(tsdata.ModelParaphraser(generate, aug.paraphrase_count), cache_file)
    texts = list(dict.fromkeys(m.content for ex in examples if ex.messages for m in ex.messages if m.role == "user"))
    todo = sum(1 for t in texts if tsdata.augment.text_key(t) not in paraphraser.cache)
    if todo:
        emit(Message("info", f"writing paraphrases for {todo} training prompts with {writer_ref} (cached in {cache_file})"))
    was_training = writer.training
    writer.eval()
    paraphraser(texts)
    writer.train(was_training)
    if writer is not model:
        del writer
    return paraphraser


def _backward_within_memory(model, optimizer, objective, items, step_batches, step_weight, plan, tokenizer,
                            accelerator, emit, compute: Compute):
    """backward_step over one step's examples; out of memory retries the step with a smaller micro-batch.

    The effective batch is kept: the micro-batch is divided (by 2 when even) and grad_accum multiplied by
    as much, and the loss is normalised by the step's weight, so the update is the one the larger
    micro-batch would have made (bit for bit: the retry starts from the same RNG state). Written here
    because accelerate's find_executable_batch_size restarts a whole function and shrinks by 0.9, which
    changes the effective batch; we reuse its OOM test and cache clearing. Returns ((loss_sum, stats), plan).
    """
    indices = [i for mb in step_batches for i in mb]
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    while True:
        micro = [_collate(objective, items, indices[j:j + plan.micro_batch], tokenizer, accelerator, row_layout(model))
                 for j in range(0, len(indices), plan.micro_batch)]
        if len(micro) < len(step_batches):  # a rank short of data in a short last step: passes with no loss
            empty = objective.no_loss(_collate(objective, items, indices[:1] or [0], tokenizer, accelerator))
            micro += [empty] * (len(step_batches) - len(micro))
        try:
            loss = lambda m, batch: objective.loss(m, batch, compute)  # noqa: E731
            return backward_step(model, micro, step_weight, accelerator, loss), plan
        except Exception as e:
            if not (isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e)):
                raise
        del micro
        optimizer.zero_grad(set_to_none=True)  # drop the partial gradients of the failed attempt
        clear_device_cache(garbage_collection=True)
        plan = _smaller_micro_batch(plan, accelerator, emit)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])


def _smaller_micro_batch(plan, accelerator, emit):
    m = plan.micro_batch
    if m == 1:
        raise TrainingFailed("out of memory with a micro-batch of 1 example: set train.gradient_checkpointing: true, "
                             "lower data.max_length, use method lora, or a smaller model")
    if accelerator.num_processes > 1:  # one rank alone cannot change the batch layout every rank shares
        raise TrainingFailed(f"out of memory at micro-batch {m} on process {accelerator.process_index}: lower "
                             f"train.batch_size and raise train.grad_accum by as much (same effective batch)")
    f = next(d for d in range(2, m + 1) if m % d == 0)  # the smallest factor keeps micro * accum exact
    new = replace(plan, micro_batch=m // f, grad_accum=plan.grad_accum * f)
    emit(Message("warning", f"out of memory at micro-batch {m}: retrying the step with micro-batch {new.micro_batch} "
                            f"x grad_accum {new.grad_accum} (the same effective batch of {plan.examples_per_step})"))
    return new


def _stop_non_finite(out: Path, state: ckpt.TrainState, in_row: int, accelerator, emit) -> None:
    text = (f"{in_row} consecutive steps had a non-finite loss or gradient (train.max_skipped_steps={in_row}), "
            f"after step {state.step}: lower train.lr, check the data, or use model.dtype: float32; "
            f"the last checkpoint is intact")
    emit(Message("error", text, state.step))
    if accelerator.is_main_process:
        runfiles.update_run_info(out, skipped_steps=state.skipped_steps, status="failed")
    raise TrainingFailed(text)


def _check_resume_matches(saved: ckpt.TrainState, now: ckpt.TrainState, force: bool, emit,
                          saved_plan: dict | None = None, plan=None) -> None:
    checks = [("config", saved.config_hash, now.config_hash), ("training/validation data", saved.data_hash, now.data_hash)]
    if saved_plan and plan is not None:
        # The effective batch must stay, since the data position is kept in steps; how it is split may
        # change (the config hash leaves that out): 2 processes x batch 4 resume as 1 process x batch 8.
        was = saved_plan.get("examples_per_step")
        checks.append((f"effective batch ({was} examples per step then, {plan.examples_per_step} now; keep "
                       f"train.batch_size x train.grad_accum x processes at {was})", was, plan.examples_per_step))
    changed = [what for what, a, b in checks if a and a != b]
    if not changed:
        return
    text = (f"the {' and the '.join(changed)} changed since the checkpoint was written, so the resumed run "
            f"would not be the run that was started")
    if not force:
        raise TrainingError(f"{text}: restore them, start a new run (--out), or pass --force to resume anyway")
    emit(Message("warning", f"{text}; resuming anyway (--force)"))


def _collate(objective, items, idx: list[int], tokenizer, accelerator, layout: str = "padded") -> dict[str, torch.Tensor]:
    batch = objective.collate([items[i] for i in idx], tokenizer, layout)
    return {k: v.to(accelerator.device) for k, v in batch.items()}


def _eval_batches(objective, items, cfg: Config, tokenizer, accelerator) -> list[dict]:
    """Validation micro-batches for this rank (sorted by length to waste little padding)."""
    order = sorted(range(len(items)), key=lambda i: objective.length(items[i]))
    bs = cfg.eval.batch_size
    # an objective may cut them itself (denoise's aspect-ratio buckets: one image shape a batch)
    chunks = (getattr(objective, "eval_chunks", lambda *a: None)(items, bs)
              or [order[i:i + bs] for i in range(0, len(order), bs)])
    if cfg.eval.max_batches:
        chunks = chunks[:cfg.eval.max_batches]
    mine = chunks[accelerator.process_index::accelerator.num_processes]
    batches = [_collate(objective, items, c, tokenizer, accelerator) for c in mine]
    passes = math.ceil(len(chunks) / accelerator.num_processes)
    if len(batches) < passes:  # passes with no loss keep every rank making the same forward (collective) calls
        empty = objective.no_loss(_collate(objective, items, chunks[0], tokenizer, accelerator))
        batches += [empty] * (passes - len(batches))
    return batches


def _unsharded_copy(model, cfg: Config, model_path, dtype, tokenizer, accelerator):
    """On the main process, the base model with the (FSDP-gathered) trained weights; None elsewhere."""
    full = dist.gather_full(dist.trainable(model), keep=accelerator.is_main_process)  # a collective: every rank
    if not accelerator.is_main_process:
        return None
    copy = models.load_model(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                             dropout=cfg.model.dropout, tokenizer=tokenizer)
    copy, _ = models.adapt(copy, cfg.method)
    runfiles.restore_weights(copy, full)
    return copy.to(accelerator.device)


def greater_is_better(eval_cfg) -> bool:
    """eval.greater_is_better, or inferred from eval.best_metric: losses and squared errors are better smaller."""
    if eval_cfg.greater_is_better is not None:
        return eval_cfg.greater_is_better
    name = eval_cfg.best_metric
    return not (name in ("loss", "perplexity") or name.endswith("loss") or name.endswith("mse"))


def check_best_metric(eval_cfg, objective) -> None:
    """eval.best_metric names something every evaluation of this objective reports; a TrainingError before the first
    step otherwise."""
    name = eval_cfg.best_metric
    known = ("loss", *objective.figures, *eval_cfg.metrics)
    if name not in known:
        raise TrainingError(f"eval.best_metric {name!r} is not reported by objective {objective.name!r}: use one of "
                            + ", ".join(repr(k) for k in known))


def selection_score(eval_cfg, ev, metrics: dict, step: int, accelerator) -> float:
    """This evaluation's eval.best_metric: the held-out loss, one of the objective's figures, or a task metric. Figures
    and metrics the main process alone computes (image grids, generations) are sent to every process, so all of them
    agree on the best checkpoint."""
    name = eval_cfg.best_metric
    if name == "loss":
        value = ev.loss
    elif name in ev.stats:
        value = ev.stats[name]
    elif name in ("perplexity", "token_accuracy"):  # sft reports these as fields of its Evaluation
        value = getattr(ev, name)
    else:
        value = metrics.get(name)
    if accelerator.num_processes > 1 and name != "loss":
        from accelerate.utils import broadcast_object_list

        value = broadcast_object_list([value])[0]
    if value is None or value != value:
        raise TrainingError(f"eval.best_metric {name!r} was not measured at the evaluation of step {step} (figures: "
                            f"{sorted(ev.stats) + sorted(metrics)}); e.g. denoise's detector figures need the built-in "
                            "model's captions: choose another eval.best_metric")
    return float(value)


def _epoch_float(state: ckpt.TrainState, steps_in_epoch: int) -> float:
    return state.epoch + state.step_in_epoch / max(1, steps_in_epoch)


def _evaluate(model, objective, valid_batches, splits, tokenizer, cfg, state, accelerator, emit, out, best_weights,
              monitor, compute: Compute):
    """The objective's held-out loss, task metrics + samples, overfitting watch; keep the best weights (lowest held-out
    loss); return (best_weights, stop_early)."""
    if not valid_batches:
        return best_weights, False
    ev = objective.evaluate(model, valid_batches, accelerator, compute)
    samples, metrics = [], {}
    # Generation runs on the main process alone: unsharded weights only (under FSDP a forward pass needs every rank).
    if accelerator.is_main_process and not dist.is_sharded(accelerator):
        samples, metrics = monitor.generations(accelerator.unwrap_model(model), tokenizer,
                                               objective.references(splits.valid))
    score = selection_score(cfg.eval, ev, metrics, state.step, accelerator)
    best = state.best_score
    if best is None and cfg.eval.best_metric == "loss":  # a run saved before best_score existed kept only the loss
        best = state.best_val_loss
    sign = 1.0 if greater_is_better(cfg.eval) else -1.0
    better = best is None or sign * (score - best) > cfg.eval.min_delta
    if better:
        state.best_val_loss, state.best_score, state.best_step, state.evals_since_best = ev.loss, score, state.step, 0
        best_weights = dist.snapshot(accelerator.unwrap_model(model), accelerator)
        # under FSDP the snapshot holds shards: gather them (every rank); otherwise it is already full CPU copies
        full = (dist.gather_full(best_weights, keep=accelerator.is_main_process) if dist.is_sharded(accelerator)
                else best_weights)
        if accelerator.is_main_process:
            runfiles.save_best_weights(out, full, state.step)
    else:
        state.evals_since_best += 1
    samples = ev.samples or samples
    train_loss = monitor.take_train_loss()
    emit(EvalEnd(state.step, float(state.epoch), ev.loss, ev.perplexity, ev.token_accuracy, ev.count, better, samples,
                 metrics, train_loss, ev.stats))
    warning = monitor.observe(state.step, ev.loss, train_loss, state.best_step)
    if warning is not None:
        emit(warning)
    patience = cfg.eval.early_stopping_patience
    if patience and state.evals_since_best >= patience:
        emit(EarlyStopped(state.step, state.best_step, state.best_val_loss, patience))
        return best_weights, True
    return best_weights, False
