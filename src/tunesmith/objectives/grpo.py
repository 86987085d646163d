"""Reinforcement fine-tuning with a grader (objective grpo): GRPO, with DAPO's and Dr. GRPO's loss variants.

The data are prompts only (data/prompts.py); the answers come from the model itself, during training. At each step
the loop hands the step's prompts to ``prepare_step``: the model samples ``num_generations`` answers to each (seeded by
the run's seed and the step, so a resumed run samples the same answers), the grader scores them, and each answer's
advantage is its reward less its group's mean (divided by the spread: ``grpo_losses.group_advantages``). The step then
trains on those groups like any other objective's items: ``collate`` packs each prompt once with its answers after it,
each answer seeing the prompt and itself only (data.collate_prefixed), and ``loss`` is the clipped surrogate of every
answer token (``grpo_losses``), summed; the loop divides by the step's weight (answer tokens for dapo, answers for
grpo, answers x max length for dr_grpo). One update per sample batch, so the probability ratio is 1 and the clip
never bites (its fraction is logged to show it); beta > 0 adds the KL to the reference: the LoRA model with its
adapters off (no second copy), or for full and freeze a frozen copy of the starting model held beside it.

Each evaluation answers the held-out prompts greedily and grades them: the loss that picks the best checkpoint is
minus the mean grade. The overfitting watch sees minus the training and held-out rewards, so training reward rising
while held-out reward falls is reported as possible reward hacking. At the end, compare.json holds the held-out grade
base versus tuned with a paired bootstrap CI, and both models' answers side by side.

A group whose answers all scored the same has advantage 0 and teaches nothing; the fraction of such groups is logged
(``frac_reward_zero_std``) and a run where it stays near 1 is told the task is too hard or too easy for the model.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import data as tsdata
from ..data.prompts import PromptRow
from ..events import Message
from . import Evaluation, stream_seed
from .grpo_losses import clipped_token_loss, group_advantages, summed_loss

ZERO_SPREAD_WARNING = 0.9  # warn when at least this fraction of a step's groups had no reward spread ...
ZERO_SPREAD_STEPS = 5  # ... this many logged steps in a row


@dataclass(frozen=True)
class RenderedPrompt:
    prompt_ids: list[int]  # the conversation and the template's assistant header (the generation prompt)
    row: PromptRow
    key: int  # its position in its split (evaluation batches carry it)
    truncated: bool = False


@dataclass(frozen=True)
class Group:
    """A prompt with the answers sampled for it at one step, graded."""

    prompt: RenderedPrompt
    answers: tuple[tuple[int, ...], ...]  # token ids, the eos included where the answer ended
    finished: tuple[bool, ...]  # False: cut at max_completion_length
    rewards: tuple[float, ...]
    advantages: tuple[float, ...]
    spread: float  # the rewards' standard deviation
    graders: dict[str, tuple[float, ...]] = field(default_factory=dict)  # each named grader's scores (multi)
    generation_s: float = 0.0  # this group's share of the step's sampling and grading time


@dataclass
class GRPO:
    settings: object  # config.GrpoConfig
    name: str = "grpo"
    figures: tuple[str, ...] = ("reward", "completion_length", "clipped_completions")
    # the overfitting watch (train/monitor.py) reads minus the rewards: its "overfitting" is reward hacking here
    watch_names: tuple[str, str, str] = ("minus the held-out reward", "minus the training reward",
                                         "possible reward hacking")
    # set by prepare: the compiled grader and what evaluation needs
    grader: object = None
    tokenizer: object = None
    valid: list = field(default_factory=list)
    eval_batch: int = 8
    eval_samples: int = 3  # held-out answers logged with their grades at each evaluation (eval.samples)
    reference: object = None  # beta > 0 under full or freeze: a frozen copy of the starting model
    seed: int = 0
    _zero_spread_run: int = 0

    @property
    def unit(self) -> str:
        return {"dapo": "answer tokens", "grpo": "answers", "dr_grpo": "answer token slots"}[self.settings.loss_type]

    # ---------------------------------------------------------------- data

    def load(self, cfg, emit):
        """The prompts, screened; and the grader compiled, so a bad one stops the run before a model loads."""
        from ..config import ConfigError
        from ..data import prompts
        from ..graders import GraderError

        splits = prompts.load_prompt_splits(cfg.data, cfg.train.seed)
        try:
            self.grader = load_grader(self.settings)
        except GraderError as e:
            raise ConfigError(f"objective.grpo.grader: {e}") from None
        return screen_prompts(splits, cfg, emit)

    def render(self, records: Sequence[PromptRow], tokenizer, cfg, emit, split: str,
               quiet: bool = False) -> list[RenderedPrompt]:
        """Each prompt's generation ids; a prompt longer than data.max_length less max_completion_length loses its
        start (data.overflow truncate), is dropped (drop), or stops the run (error)."""
        from ..data.errors import DataError, Issue
        from ..evaluate.generate import render_prompt

        limit = cfg.data.max_length - self.settings.max_completion_length
        out, cut, dropped, issues = [], 0, 0, []
        for row in records:
            ids = render_prompt(tokenizer, [m.as_dict() for m in row.messages])
            if len(ids) > limit:
                if cfg.data.overflow == "error":
                    issues.append(Issue("E009", f"the prompt is {len(ids)} tokens, over data.max_length - "
                                                f"objective.grpo.max_completion_length = {limit}", row.origin.path,
                                        row.origin.line, None, row.origin.unit))
                    continue
                if cfg.data.overflow == "drop":
                    dropped += 1
                    continue
                out.append(RenderedPrompt(ids[-limit:], row, len(out), truncated=True))
                cut += 1
                continue
            out.append(RenderedPrompt(ids, row, len(out)))
        if issues:
            raise DataError(issues)
        if not quiet and (cut or dropped):
            emit(Message("warning", f"{split}: {cut} prompts truncated (from the left), {dropped} dropped "
                                    f"(data.max_length={cfg.data.max_length} less max_completion_length)"))
        return out

    def references(self, records: Sequence[PromptRow]) -> list:
        return []  # no reference answers: each evaluation grades the model's own answers instead

    # ---------------------------------------------------------------- before training

    def prepare(self, model, items: dict[str, list], tokenizer, cfg, model_path, accelerator, compute, emit,
                precision: str) -> dict[str, list]:
        """Keep what sampling and evaluation need."""
        from .. import models
        from ..train.packing import enable_packing

        self.tokenizer, self.valid = tokenizer, items["valid"]
        if self.settings.beta and not models.is_peft(accelerator.unwrap_model(model)):
            net = accelerator.unwrap_model(model)  # before step 1: still the starting model
            self.reference = models.load_model(model_path, dtype=next(net.parameters()).dtype,
                                               trust_remote_code=cfg.model.trust_remote_code, tokenizer=tokenizer)
            self.reference.load_state_dict(net.state_dict())  # the model exactly as it starts
            self.reference.to(accelerator.device).eval().requires_grad_(False)
            enable_packing(self.reference)  # it scores the policy's batches, packed or prefixed
            emit(Message("info", "grpo: beta > 0 under method " f"{cfg.method.name}: a frozen copy of the starting "
                                 "model is the KL reference (twice the model's weights in memory)"))
        self.eval_batch, self.seed, self.eval_samples = cfg.eval.batch_size, cfg.train.seed, cfg.eval.samples
        emit(Message("info", f"grpo: {self.settings.num_generations} answers sampled per prompt, up to "
                             f"{self.settings.max_completion_length} tokens, loss {self.settings.loss_type}, "
                             f"grader {describe_grader(self.settings.grader)}"))
        return items

    # ---------------------------------------------------------------- each step: sample and grade

    def prepare_step(self, model, items: list, indices: list[int], tokenizer, compute, step: int, accelerator) -> list:
        """``items`` with the step's prompts on this process (``indices``) replaced by Groups: answers sampled from
        the model now, at the configured temperature, each from a random stream of its own seeded by (seed, step,
        prompt, answer), graded, with their advantages. The answers are the same however the step's prompts are
        dealt out to processes and batches, so several processes train as one does and a resumed run samples what
        the uninterrupted one did."""
        s = self.settings
        t0 = time.perf_counter()
        prompts = [items[i] for i in indices]
        g = s.num_generations
        net = accelerator.unwrap_model(model)
        with _autocast(compute, net):
            sampled = sample_answers(net, tokenizer, [p.prompt_ids for p in prompts for _ in range(g)], s,
                                     self.eval_batch, row_seeds=[answer_seed(self.seed, step, p.key, j)
                                                                 for p in prompts for j in range(g)])
        texts = [answer_text(tokenizer, net, ids) for ids, _ in sampled]
        scores = grade(self.grader, texts, [p.row.item for p in prompts for _ in range(g)])
        rewards = torch.tensor([sc.score for sc in scores], dtype=torch.float64).view(len(prompts), g)  # (P, G)
        batch_std = _batch_std(rewards, accelerator) if s.scale_rewards == "batch" else None
        advantages, _ = group_advantages(rewards, s.scale_rewards, batch_std)
        spread = rewards.std(dim=1) if g > 1 else torch.zeros(len(prompts), dtype=torch.float64)
        # each process's sampling time, divided so that the step's statistic (a sum over processes) is their mean
        share = (time.perf_counter() - t0) / max(1, len(prompts)) / accelerator.num_processes
        out = list(items)
        for j, (i, p) in enumerate(zip(indices, prompts)):
            part = sampled[j * g:(j + 1) * g]
            subs = {name: tuple(sc.graders[name] for sc in scores[j * g:(j + 1) * g]) for name in scores[0].graders}
            out[i] = Group(p, tuple(tuple(ids) for ids, _ in part), tuple(f for _, f in part),
                           tuple(rewards[j].tolist()), tuple(advantages[j].tolist()), float(spread[j]), subs, share)
        if not indices and items:  # a process with no prompt in a short last step: a group for its pass with no loss
            first = items[0]
            out[0] = Group(first, ((tokenizer.eos_token_id or 0,),), (True,), (0.0,), (0.0,), 0.0)
        return out

    # ---------------------------------------------------------------- the loss

    def weight(self, item) -> int:
        """What a group adds to the step's divisor (a prompt not yet answered: 0)."""
        if not isinstance(item, Group):
            return 0
        s = self.settings
        if s.loss_type == "grpo":
            return len(item.answers)
        if s.loss_type == "dr_grpo":
            return len(item.answers) * s.max_completion_length
        return sum(len(a) for a, w in zip(item.answers, _answer_weights(item, s)) if w)  # dapo: active answer tokens

    def length(self, item) -> int:
        return len(item.prompt_ids if isinstance(item, RenderedPrompt) else item.prompt.prompt_ids) + \
            self.settings.num_generations * self.settings.max_completion_length

    def trained_tokens(self, item) -> int:
        return sum(len(a) for a in item.answers) if isinstance(item, Group) else 0

    def collate(self, items: Sequence, tokenizer, layout: str) -> dict[str, torch.Tensor]:
        """Groups: every answer after its prompt (each prompt once where the layout allows), with per answer its
        advantage, whether it counts (``answer_weight``) and what the step logs. Prompts (evaluation): their keys."""
        if not isinstance(items[0], Group):
            return {"prompt_key": torch.tensor([p.key for p in items]), "live": torch.ones(())}
        s = self.settings
        seqs, groups = [], []
        for grp in items:
            lp = len(grp.prompt.prompt_ids)
            groups.append((lp, list(range(len(seqs), len(seqs) + len(grp.answers)))))
            seqs += [tsdata.RenderedExample(grp.prompt.prompt_ids + list(a), [tsdata.IGNORE] * lp + list(a),
                                            grp.prompt.row.origin) for a in grp.answers]
        if layout == "prefixed":
            batch = tsdata.collate_prefixed(seqs, groups)
        elif layout == "packed":
            batch = tsdata.collate_packed(seqs)
        else:
            batch = tsdata.collate(seqs, tokenizer.pad_token_id)
        per_answer = lambda f: torch.tensor([v for grp in items for v in f(grp)], dtype=torch.float32)  # noqa: E731
        batch |= {"advantage": per_answer(lambda grp: grp.advantages),
                  "answer_weight": per_answer(lambda grp: [float(w) for w in _answer_weights(grp, s)]),
                  "reward": per_answer(lambda grp: grp.rewards),
                  "answer_length": per_answer(lambda grp: [len(a) for a in grp.answers]),
                  "cut": per_answer(lambda grp: [float(not f) for f in grp.finished]),
                  "spread": torch.tensor([grp.spread for grp in items], dtype=torch.float32),
                  "generation_s": torch.tensor([grp.generation_s for grp in items], dtype=torch.float32),
                  "live": torch.ones(())}
        for name in items[0].graders:
            batch[f"grader/{name}"] = per_answer(lambda grp: grp.graders[name])
        return batch

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch, live=torch.zeros_like(batch["live"]))
        if "answer_weight" in out:
            out["answer_weight"] = torch.zeros_like(out["answer_weight"])
        return out

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        from ..train.loss import token_logprobs

        s = self.settings
        device = batch["input_ids"].device.type
        with torch.autocast(device, dtype=compute.autocast, enabled=compute.autocast is not None):
            # (N,) fp32 each: log p of each answer token, the answer it belongs to, the policy's entropy there
            logps, rows, entropy = token_logprobs(model, batch, fused=compute.fused, with_entropy=True)
            ref = _reference_logprobs(self.reference or model, batch, compute) if s.beta else None
        n = batch["advantage"].numel()
        weight_t = batch["answer_weight"][rows]  # (N,)
        token_loss, kl, clipped = clipped_token_loss(logps, logps.detach(), batch["advantage"][rows], s.epsilon,
                                                     s.epsilon_high or s.epsilon, ref, s.beta)
        loss = summed_loss(token_loss, rows, weight_t, n, s.loss_type)
        live = float(batch["live"])
        with torch.no_grad():
            stats = {"answers": live * n, "groups": live * batch["spread"].numel(), "tokens": float(weight_t.sum()),
                     "reward": live * float(batch["reward"].sum()), "reward_std": live * float(batch["spread"].sum()),
                     "frac_reward_zero_std": live * float((batch["spread"] == 0).sum()),
                     "completion_length": live * float(batch["answer_length"].sum()),
                     "clipped_completions": live * float(batch["cut"].sum()),
                     "clip_ratio": float((clipped.float() * weight_t).sum()),
                     "kl": float((kl * weight_t).sum()) if kl is not None else 0.0,
                     "entropy": float((entropy * weight_t).sum()),
                     "generation_s": live * float(batch["generation_s"].sum())}
            stats |= {k: live * float(v.sum()) for k, v in batch.items() if k.startswith("grader/")}
        return loss, stats

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """Means per answer (reward, lengths, graders), per group (spread, zero-spread fraction), per active token
        (clip fraction, KL, entropy); the sampling time as the step's total."""
        answers, groups, tokens = (max(1.0, stats.get(k, 0.0)) for k in ("answers", "groups", "tokens"))
        by = {"reward_std": groups, "frac_reward_zero_std": groups, "clip_ratio": tokens, "kl": tokens,
              "entropy": tokens, "generation_s": 1.0}
        out = {k: v / by.get(k, answers) for k, v in stats.items() if k not in ("answers", "groups", "tokens")}
        if "frac_reward_zero_std" in out:  # a run whose groups keep scoring alike learns nothing: say so once
            self._zero_spread_run = self._zero_spread_run + 1 if out["frac_reward_zero_std"] >= ZERO_SPREAD_WARNING else 0
        return out

    def zero_spread_warning(self) -> str | None:
        """A warning, once, when the groups kept scoring alike for ZERO_SPREAD_STEPS logged steps in a row."""
        if self._zero_spread_run != ZERO_SPREAD_STEPS:
            return None
        return (f"grpo: in {ZERO_SPREAD_STEPS} logged steps in a row, {ZERO_SPREAD_WARNING:.0%} or more of the prompts "
                "got answers that all scored the same, so they teach nothing (frac_reward_zero_std): the task is too "
                "hard or too easy for this model; give the grader partial credit, raise num_generations or "
                "temperature, or choose prompts the model sometimes gets right")

    def watched(self, loss_sum: float, stats: dict[str, float], weight: float) -> tuple[float, float]:
        """What the overfitting watch adds up from a step: minus the summed reward, over the answers."""
        return -stats.get("reward", 0.0), stats.get("answers", 0.0)

    # ---------------------------------------------------------------- held out

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        """Greedy answers to the held-out prompts, graded: loss = minus the mean grade (lower is better); and one
        sampled answer to each (the training temperature, a fixed seed), whose mean grade is ``reward_sampled``."""
        keys = [k for b in batches if float(b["live"]) for k in b["prompt_key"].tolist()]
        prompts = [self.valid[k] for k in keys]
        net = accelerator.unwrap_model(model)
        result = grade_prompts(net, self.tokenizer, prompts, self.settings, self.grader, self.eval_batch, compute)
        sampled = grade_prompts(net, self.tokenizer, prompts, self.settings, self.grader, self.eval_batch, compute,
                                seed=self.seed)
        # per prompt what is averaged, from every process (each graded its share of the held-out prompts)
        mine = [{"reward": r, "reward_sampled": rs, "completion_length": n_tok, "clipped_completions": c,
                 **{f"grader/{k}": v[i] for k, v in result.graders.items()}}
                for i, (r, rs, n_tok, c) in enumerate(zip(result.rewards, sampled.rewards, result.lengths, result.cut))]
        rows = _gather_rows(mine, accelerator)
        n = len(rows)
        names = list(dict.fromkeys(k for row in rows for k in row))
        stats = {k: float(np.mean([row[k] for row in rows if k in row])) for k in names} if n else \
            {"reward": 0.0, "reward_sampled": 0.0, "completion_length": 0.0, "clipped_completions": 0.0}
        samples = [{"prompt": p.row.messages[-1].content, "output": t, "reference": "", "grade": r}
                   for p, t, r in zip(prompts, result.texts, result.rewards)][:self.eval_samples]
        return Evaluation(-stats["reward"], n, stats=stats, samples=samples)

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute) -> dict | None:
        """Held-out grade base versus tuned (greedy answers), with a paired bootstrap CI, and the answers side by
        side (compare.json)."""
        from ..data import prompts as tsprompts
        from ..evaluate import base_model
        from ..evaluate.compare import paired_bootstrap_ci
        from ..train import run as runfiles

        if cfg.data.test:
            rows, _, issues = tsprompts.read_prompt_rows(cfg.data.test)
            if issues:
                raise tsdata.DataError(issues)
        else:
            rows = splits.valid
        items = self.render(rows[:cfg.eval.compare_examples], tokenizer, cfg, emit, "held-out", quiet=True)
        if not items:
            emit(Message("warning", "no held-out prompts: base-versus-tuned comparison skipped"))
            return None
        tuned = grade_prompts(model, tokenizer, items, self.settings, self.grader, cfg.eval.batch_size, compute)
        with base_model(model, model_path, trust_remote_code=cfg.model.trust_remote_code) as base_side:
            base = grade_prompts(base_side.model, tokenizer, items, self.settings, self.grader, cfg.eval.batch_size,
                                 compute)
        diffs = np.asarray(tuned.rewards) - np.asarray(base.rewards)
        low, high = paired_bootstrap_ci(diffs)
        summary = {"prompts": len(items), "source": cfg.data.test or "validation split",
                   "base_reward": float(np.mean(base.rewards)), "tuned_reward": float(np.mean(tuned.rewards)),
                   "diff": float(diffs.mean()), "ci_low": low, "ci_high": high, "wins": int((diffs > 0).sum()),
                   "losses": int((diffs < 0).sum()), "what": "mean grade of greedy answers to held-out prompts"}
        emit(Message("info", f"held-out grade on {len(items)} prompts: base {summary['base_reward']:.3f} -> tuned "
                             f"{summary['tuned_reward']:.3f} (diff {summary['diff']:+.3f}, 95% CI [{low:+.3f}, "
                             f"{high:+.3f}]; better {summary['wins']}, worse {summary['losses']})"))
        samples = [{"prompt": it.row.messages[-1].content, "reference": "", "base": b, "base_reward": br, "tuned": t,
                    "tuned_reward": tr}
                   for it, b, br, t, tr in zip(items, base.texts, base.rewards, tuned.texts, tuned.rewards)]
        result = {"reinforcement": summary, "samples": samples}
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        runfiles.update_run_info(out, held_out_reward={"base": summary["base_reward"], "tuned": summary["tuned_reward"]})
        return result


# ---------------------------------------------------------------- helpers


@dataclass
class Graded:
    texts: list[str]
    rewards: list[float]
    lengths: list[int]
    cut: list[float]
    graders: dict[str, list[float]]


def grade_prompts(model, tokenizer, prompts: Sequence[RenderedPrompt], settings, grader, batch_size: int,
                  compute, seed: int | None = None) -> Graded:
    """Answers to ``prompts`` and their grades: greedy, or sampled as in training when a ``seed`` is given (each
    prompt's answer from its own stream, seeded by (seed, prompt), the same at every evaluation)."""
    with _autocast(compute, model):
        seeds = None if seed is None else [answer_seed(seed, -1, p.key, 0) for p in prompts]
        sampled = sample_answers(model, tokenizer, [p.prompt_ids for p in prompts], settings, batch_size,
                                 row_seeds=seeds)
    texts = [answer_text(tokenizer, model, ids) for ids, _ in sampled]
    scores = grade(grader, texts, [p.row.item for p in prompts]) if prompts else []
    names = scores[0].graders if scores else {}
    return Graded(texts, [sc.score for sc in scores], [len(ids) for ids, _ in sampled],
                  [float(not f) for _, f in sampled], {k: [sc.graders[k] for sc in scores] for k in names})


def sample_answers(model, tokenizer, prompts: Sequence[list[int]], settings, batch_size: int,
                   row_seeds: Sequence[int] | None) -> list[tuple[list[int], bool]]:
    """Answers sampled with the settings' temperature, top_p and top_k, one seed per answer; greedy without seeds."""
    from ..evaluate.generate import generate_ids

    return generate_ids(model, tokenizer, prompts, max_new_tokens=settings.max_completion_length,
                        batch_size=batch_size, do_sample=row_seeds is not None, temperature=settings.temperature,
                        top_p=settings.top_p, top_k=settings.top_k, row_seeds=row_seeds)


def answer_text(tokenizer, model, ids: list[int]) -> str:
    from ..evaluate.generate import decode_reply, eos_token_ids

    return decode_reply(tokenizer, ids, eos_token_ids(model, tokenizer), None)


@dataclass(frozen=True)
class Score:
    score: float
    graders: dict[str, float]
    reason: str | None = None


def grade(grader, texts: Sequence[str], items: Sequence[dict]) -> list[Score]:
    """Each answer's grade: ``sample`` as OpenAI's graders see it (output_text, output_json), ``item`` the data row."""
    from ..graders import make_sample

    return [Score(float(g.score), dict(g.sub_scores or {}), g.reason)
            for g in grader.grade_batch([make_sample(t) for t in texts], list(items))]


def load_grader(settings):
    """The compiled grader of objective.grpo: a mapping, a JSON file holding one, or module:function; a score_model
    grader asks objective.grpo.judge_model (else the model its spec names), loaded at its first question."""
    from .. import graders

    spec = settings.grader
    if isinstance(spec, str) and spec.endswith(".json"):
        spec = graders.load_grader_spec(spec)
    judge = None
    if graders.needs_judge(spec):
        ref = settings.judge_model or _judge_named(spec)
        if not ref:
            raise graders.GraderError("the grader has a score_model: set objective.grpo.judge_model to a local chat "
                                      "model (a tunesmith model reference) for it to ask")
        judge = graders.LazyModelJudge(ref)
    return graders.compile_grader(spec, judge=judge)


def _judge_named(spec) -> str | None:
    if spec.get("type") == "score_model":
        return spec.get("model")
    return next((m for g in (spec.get("graders") or {}).values() if (m := _judge_named(g))), None)


def describe_grader(spec) -> str:
    if isinstance(spec, dict):
        return f"{spec.get('type', '?')} {spec.get('name', '')}".strip()
    return str(spec)


def screen_prompts(splits, cfg, emit):
    """The data screen (PII, harmful content) over the prompts; with pii_policy redact, the redacted prompts."""
    from .. import safety

    def as_examples(rows):
        return [tsdata.Example(r.messages, None, r.origin) for r in rows]

    def back(rows, examples):
        return [replace(r, messages=ex.messages) for r, ex in zip(rows, examples, strict=True)]

    screened = safety.screen_training_data(replace(splits, train=as_examples(splits.train),
                                                   valid=as_examples(splits.valid)), cfg.safety, emit)
    return replace(splits, train=back(splits.train, screened.train), valid=back(splits.valid, screened.valid))


def _answer_weights(group: Group, settings) -> list[bool]:
    """Whether each answer counts in the loss: not when cut at the length limit (mask_truncated_completions)."""
    return [f or not settings.mask_truncated_completions for f in group.finished]


def answer_seed(seed: int, step: int, key: int, j: int) -> int:
    """The seed of answer ``j`` to prompt ``key`` (its place in its split) at ``step`` (-1: evaluation)."""
    return stream_seed(seed, step, key, j)


def _batch_std(rewards: torch.Tensor, accelerator) -> torch.Tensor:
    """The standard deviation (unbiased) of the step's rewards on every process (scale_rewards batch)."""
    if accelerator.num_processes == 1:
        return rewards.std()
    flat = rewards.flatten()
    # count, sum and sum of squares in float64, one collective (grades are bounded scores: the one-pass formula loses
    # nothing that shows)
    t = torch.tensor([flat.numel(), float(flat.sum()), float((flat * flat).sum())], dtype=torch.float64,
                     device=accelerator.device)
    n, total, squares = accelerator.reduce(t, reduction="sum").tolist()
    var = (squares - total * total / n) / max(1.0, n - 1)
    return torch.tensor(max(0.0, var), dtype=torch.float64).sqrt()


def _gather_rows(rows: list[dict], accelerator) -> list[dict]:
    """Every process's rows, in process order (one collective when there are several)."""
    if accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def _autocast(compute, model):
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=compute.autocast, enabled=compute.autocast is not None)


@torch.no_grad()
def _reference_logprobs(model, batch, compute) -> torch.Tensor:
    """The answer tokens' log-probs under the reference: the LoRA model with its adapters switched off, or the frozen
    copy ``GRPO.prepare`` made."""
    from .. import models
    from ..train.loss import token_logprobs

    net = getattr(model, "module", model)  # a DDP wrapper's model
    with net.disable_adapter() if models.is_peft(net) else nullcontext():
        return token_logprobs(net, batch, fused=compute.fused)[0]
