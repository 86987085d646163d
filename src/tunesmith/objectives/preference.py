"""Preference tuning: a chosen and a rejected answer per prompt (dpo, orpo, simpo).

A micro-batch of P pairs is 2P sequences, the P chosen then the P rejected (each prompt + answer), packed into one
row where the model allows, each prompt once: prompt, chosen answer, rejected answer, the rejected answer attending
to the prompt and itself, never to its chosen twin (data.collate_prefixed; a FlashAttention model gets every sequence
whole, a model that cannot pack gets them padded). One forward pass gives every answer token's log-probability
(``train.loss.token_logprobs``, through the output layer in row chunks: no (B, T, V) logits); their sums per
sequence go into the loss formulas of ``preference_losses``. A step's summed loss is divided by its pairs.

The reference model (dpo) is the starting model: its log-probabilities of every pair are computed once, before
the first step, with LoRA adapters switched off (so no second copy of the model is held), and cached on disk
keyed by the model, the rendered token ids and the precision: a resumed run and every sweep trial on the same
data reuse them. ``objective.dpo.reference_model`` names another model to use instead.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import data as tsdata
from ..events import Message
from . import Evaluation
from .preference_losses import dpo_loss, orpo_loss, rpo_term, simpo_loss


@dataclass(frozen=True)
class ScoredPair:
    """A rendered pair with the reference model's summed log-probabilities of its two answers (None: not needed)."""

    pair: "tsdata.preference.RenderedPair"
    ref_chosen: float | None = None
    ref_rejected: float | None = None


# the figures logged per pair, summed over micro-batches and processes and divided by the pairs at the end
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
              "logps/rejected", "sft_loss")


@dataclass(frozen=True)
class Preference:
    name: str  # dpo | orpo | simpo
    settings: object  # config.DpoConfig | OrpoConfig | SimpoConfig
    unit: str = "pairs"
    figures: tuple[str, ...] = STAT_NAMES

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    # ---------------------------------------------------------------- data

    def load(self, cfg, emit):
        from ..data import preference

        splits = preference.load_preference_splits(cfg.data, cfg.train.seed, self.name)
        return screen_pairs(splits, cfg, emit)

    def render(self, records: Sequence, tokenizer, cfg, emit, split: str, quiet: bool = False) -> list[ScoredPair]:
        from ..data import preference

        result = preference.render_pairs(records, tokenizer, cfg.data, chat_template=cfg.model.chat_template)
        if not quiet and (result.truncated or result.dropped):
            emit(Message("warning", f"{split}: {result.truncated} pairs had their prompt truncated (from the left), "
                                    f"{result.dropped} dropped (data.max_length={cfg.data.max_length}, "
                                    f"data.overflow={cfg.data.overflow})"))
        return [ScoredPair(p) for p in result.items]

    def references(self, records: Sequence) -> list[tsdata.Example]:
        """Held-out pairs as chats ending in the chosen answer: the reference for samples and task metrics."""
        return [tsdata.Example(tuple(r.prompt) + (r.chosen,), None, r.origin) for r in records]

    def weight(self, item: ScoredPair) -> int:
        return 1

    def length(self, item: ScoredPair) -> int:
        return len(item.pair.chosen.input_ids) + len(item.pair.rejected.input_ids)

    def trained_tokens(self, item: ScoredPair) -> int:
        return item.pair.chosen.n_targets + item.pair.rejected.n_targets

    def collate(self, items: Sequence[ScoredPair], tokenizer, layout: str) -> dict[str, torch.Tensor]:
        """2P sequences (the chosen answers, then the rejected), plus per pair: ``pair_weight`` (1; 0 in a pass that
        carries no loss) and the reference log-probabilities when the objective has a reference. Laid out "prefixed",
        each pair's prompt is computed once: prompt, chosen, then the rejected answer seeing the prompt but not the
        chosen one (data.collate_prefixed)."""
        seqs = [it.pair.chosen for it in items] + [it.pair.rejected for it in items]
        if layout == "prefixed":
            p = len(items)
            batch = tsdata.collate_prefixed(seqs, [(len(it.pair.prompt_ids), (i, p + i)) for i, it in enumerate(items)])
        elif layout == "packed":
            batch = tsdata.collate_packed(seqs)
        else:
            batch = tsdata.collate(seqs, tokenizer.pad_token_id)
        batch["pair_weight"] = torch.ones(len(items))
        if self.needs_reference:
            if any(it.ref_chosen is None for it in items):
                raise RuntimeError("preference pairs reached the loss without reference log-probabilities "
                                   "(Preference.prepare computes them before the first step)")
            batch["ref_chosen"] = torch.tensor([it.ref_chosen for it in items], dtype=torch.float32)
            batch["ref_rejected"] = torch.tensor([it.ref_rejected for it in items], dtype=torch.float32)
        return batch

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "pair_weight": torch.zeros_like(batch["pair_weight"])}

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        return {k: v / max(1.0, weight) for k, v in stats.items()}

    # ---------------------------------------------------------------- loss

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        pc, pr, nc, nr = pair_logps(model, batch, compute)
        w = batch["pair_weight"].to(pc.dtype)
        s = self.settings
        if self.name == "dpo":
            out = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], s.beta, s.loss_type,
                           s.label_smoothing, chosen_tokens=nc, rejected_tokens=nr)
        elif self.name == "orpo":
            out = orpo_loss(pc, pr, nc, nr, s.beta)
        else:
            out = simpo_loss(pc, pr, nc, nr, s.beta, s.gamma)
        losses = out.losses
        sft = rpo_term(pc, nc)  # length-averaged NLL of the chosen answers
        if self.name == "dpo" and s.rpo_alpha:
            losses = losses + s.rpo_alpha * sft
        with torch.no_grad():
            figures = {"rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
                       "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                       "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).to(w.dtype),
                       "logps/chosen": pc / nc.clamp(min=1), "logps/rejected": pr / nr.clamp(min=1), "sft_loss": sft}
            stats = {k: float((v.detach() * w).sum()) for k, v in figures.items()}
        return (losses * w).sum(), stats

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        return held_out(self, model, batches, accelerator, compute, "pair_weight", STAT_NAMES)

    # ---------------------------------------------------------------- base versus tuned

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute) -> dict | None:
        """Held-out preference accuracy, base versus tuned, with a paired bootstrap CI (compare.json "preference"),
        after the generations of both side by side with the chosen answers as references (as sft's comparison)."""
        from ..data import preference
        from ..evaluate import base_model
        from ..train import run as runfiles

        test = cfg.data.model_copy(update={"train": cfg.data.test, "valid": None, "valid_fraction": 0.0})
        records = (preference.load_preference_splits(test, cfg.train.seed, self.name).train if cfg.data.test
                   else splits.valid)[:cfg.eval.compare_examples]
        if not records:
            emit(Message("warning", "no held-out pairs: base-versus-tuned comparison skipped"))
            return None
        items = self.render(records, tokenizer, cfg, emit, "held-out", quiet=True)
        device = next(model.parameters()).device
        tuned = preferred(model, items, tokenizer, compute, device, cfg.eval.batch_size)
        with base_model(model, model_path, trust_remote_code=cfg.model.trust_remote_code) as base_side:
            base = preferred(base_side.model, items, tokenizer, compute, device, cfg.eval.batch_size)
        pref = preference_comparison(base, tuned, cfg.data.test or "validation split")
        emit(Message("info", "held-out " + format_preference(pref)))
        # the answers of both side by side, the chosen answers as references (the held-out pairs chosen above)
        sft_view = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test": None})})
        result = runfiles.compare_with_base(out, model, tokenizer, sft_view, replace(splits, valid=self.references(records)),
                                            model_path, emit, source=pref["source"]) or {}
        result["preference"] = pref
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        runfiles.update_run_info(out, preference_accuracy={"base": pref["base_accuracy"], "tuned": pref["tuned_accuracy"]})
        return result

    # ---------------------------------------------------------------- reference

    def prepare(self, model, items: dict[str, list], tokenizer, cfg, model_path, accelerator, compute, emit,
                precision: str) -> dict[str, list]:
        """The items with the reference model's log-probabilities (dpo), from the disk cache or computed now."""
        if not self.needs_reference:
            return items
        from .. import models

        ref_name = self.settings.reference_model
        ref_path = models.ensure_local(ref_name) if ref_name else Path(model_path)
        flat = [it for split in items.values() for it in split]
        key = _reference_key(ref_path, [ids for it in flat for ids in (it.pair.prompt_ids, it.pair.chosen_ids,
                                                                      it.pair.rejected_ids)], precision, cfg.data.max_length)
        cache = models.cache_dir() / "reference_logps" / f"{key}.json"
        values = _read_cache(cache, len(flat))
        if values is None:
            with accelerator.main_process_first():  # the main process writes the cache; the others then read it
                values = _read_cache(cache, len(flat))
                if values is None:
                    emit(Message("info", f"reference log-probabilities: computing them for {len(flat)} pairs once "
                                         f"({ref_name or 'the starting model'}; cached in {cache})"))
                    values = _reference_logps(self, model, ref_name, ref_path, flat, tokenizer, cfg, accelerator,
                                              compute)
                    if accelerator.is_main_process:
                        _write_cache(cache, values)
        else:
            emit(Message("info", f"reference log-probabilities: {len(flat)} pairs from the cache {cache}"))
        it = iter(values)
        return {split: [replace(x, ref_chosen=c, ref_rejected=r) for x, (c, r) in zip(part, it)]
                for split, part in items.items()}


@torch.no_grad()
def held_out(objective, model, batches: list[dict], accelerator, compute, weight_key: str, names) -> Evaluation:
    """An objective's held-out loss and figures: its summed loss and statistics over every batch and process, divided
    by the summed ``batch[weight_key]`` (pairs, examples; 0 in passes that carry no loss) through ``per_unit``."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 + len(names), dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        loss, stats = objective.loss(model, batch, compute)
        row = [float(loss), float(batch[weight_key].sum())] + [stats[k] for k in names]
        sums += torch.tensor(row, dtype=torch.float64, device=accelerator.device)
    loss, n, *rest = accelerator.reduce(sums, reduction="sum").tolist()
    model.train(was_training)
    return Evaluation(loss / max(1.0, n), int(n), stats=objective.per_unit(dict(zip(names, rest)), n))


def preference_objective(objective_cfg) -> Preference:
    name = objective_cfg.name
    if name not in ("dpo", "orpo", "simpo"):
        raise ValueError(f"objective {name!r} is not a paired preference objective")
    return Preference(name, getattr(objective_cfg, name))


def preference_comparison(base: list[bool], tuned: list[bool], source: str, n_boot: int = 1000) -> dict:
    """Preference accuracy of two models on the same pairs, with a paired bootstrap CI of the difference."""
    from ..evaluate.compare import paired_bootstrap_ci

    diffs = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # (N,)
    low, high = paired_bootstrap_ci(diffs, n_boot=n_boot)
    return {"pairs": len(diffs), "source": source, "base_accuracy": float(np.mean(base)),
            "tuned_accuracy": float(np.mean(tuned)), "diff": float(diffs.mean()), "ci_low": low, "ci_high": high,
            "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()),
            "what": "share of pairs whose chosen answer the model gives a higher log-probability than the rejected one"}


def format_preference(pref: dict) -> str:
    return (f"preference accuracy on {pref['pairs']} pairs: base {pref['base_accuracy']:.3f} -> tuned "
            f"{pref['tuned_accuracy']:.3f} (diff {pref['diff']:+.3f}, 95% CI [{pref['ci_low']:+.3f}, "
            f"{pref['ci_high']:+.3f}]; tuned right where base was wrong {pref['wins']}, the reverse {pref['losses']})")


def preference_accuracy(model, tokenizer, records, data_cfg, batch_size: int, compute=None) -> list[bool]:
    """Per pair of ``records`` (read by data.preference): whether ``model`` prefers the chosen answer. For `tunesmith
    eval` on any model; ``data_cfg``: the run's data settings (max_length, template), else the defaults."""
    from ..data import preference
    from ..train.steps import Compute

    items = [ScoredPair(p) for p in preference.render_pairs(records, tokenizer, data_cfg).items]
    return preferred(model, items, tokenizer, compute or Compute(), next(model.parameters()).device, batch_size)


@torch.no_grad()
def preferred(model, items: Sequence[ScoredPair], tokenizer, compute, device, batch_size: int) -> list[bool]:
    """Per pair: whether ``model`` gives the chosen answer a higher summed log-probability than the rejected one."""
    from ..train.packing import row_layout

    was_training = model.training
    model.eval()
    out = []
    plain = Preference("orpo", None)  # collates without reference log-probabilities
    for s in range(0, len(items), batch_size):
        batch = plain.collate(items[s:s + batch_size], tokenizer, row_layout(model))
        pc, pr, _, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()}, compute)
        out += (pc > pr).tolist()
    model.train(was_training)
    return out


def sequence_logps(model, batch: dict[str, torch.Tensor], compute, n_seq: int):
    """(summed log-probability of each sequence's scored tokens, their count), each (n_seq,) fp32, of a collated
    batch of n_seq sequences (padded or packed)."""
    from ..train.loss import token_logprobs

    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=compute.autocast, enabled=compute.autocast is not None):
        logps, rows = token_logprobs(model, batch, fused=compute.fused)  # (N,) fp32, and the sequence of each token
    seq = torch.zeros(n_seq, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    return seq, torch.bincount(rows, minlength=n_seq).to(logps.dtype)


def pair_logps(model, batch: dict[str, torch.Tensor], compute):
    """(chosen, rejected summed log-probs, chosen, rejected answer token counts), each (P,), of a collated batch of
    P pairs (2P sequences: the chosen then the rejected)."""
    pairs = batch["pair_weight"].numel()
    seq, tokens = sequence_logps(model, batch, compute, 2 * pairs)
    return seq[:pairs], seq[pairs:], tokens[:pairs], tokens[pairs:]


@contextmanager
def _reference_model(model, ref_name, ref_path, tokenizer, cfg, accelerator):
    """The reference, in eval mode, for the block: the starting model with its LoRA adapters switched off (a full or
    freeze run calls this before its first step, when the model is still the starting one), or the named model,
    loaded for the block and let go after."""
    from .. import models
    from ..train.packing import enable_packing

    net = accelerator.unwrap_model(model)
    if ref_name:
        net = models.load_model(ref_path, dtype=next(net.parameters()).dtype,
                                trust_remote_code=cfg.model.trust_remote_code, tokenizer=tokenizer)
        net.to(accelerator.device)
        enable_packing(net)
    adapters_off = net.disable_adapter() if models.is_peft(net) else nullcontext()
    was_training = net.training
    net.eval()
    try:
        with adapters_off:
            yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def _reference_logps(objective, model, ref_name, ref_path, items, tokenizer, cfg, accelerator, compute):
    """[(chosen, rejected)] summed log-probs of every pair under the reference (``_reference_model``)."""
    from ..train.packing import row_layout

    out = []
    bs = cfg.eval.batch_size
    with _reference_model(model, ref_name, ref_path, tokenizer, cfg, accelerator) as net:
        for s in range(0, len(items), bs):
            batch = objective.collate([replace(it, ref_chosen=0.0, ref_rejected=0.0) for it in items[s:s + bs]],
                                      tokenizer, row_layout(net))
            pc, pr, _, _ = pair_logps(net, {k: v.to(accelerator.device) for k, v in batch.items()}, compute)
            out += list(zip(pc.tolist(), pr.tolist()))
    return out


def _reference_key(ref_path: Path, sequences, precision: str, max_length: int) -> str:
    """What reference log-probabilities depend on: the model's files, the token ids scored, the precision."""
    h = hashlib.sha256(f"{precision}|{max_length}".encode())
    for f in sorted(Path(ref_path).glob("*")) if Path(ref_path).is_dir() else [Path(ref_path)]:
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".gguf"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    for ids in sequences:
        h.update(json.dumps(ids).encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path, n: int):
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return [tuple(v) for v in values] if isinstance(values, list) and len(values) == n else None


def _write_cache(path: Path, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))  # floats as repr: read back bit for bit
    tmp.replace(path)


def screen_pairs(splits, cfg, emit):
    """The data screen (PII, harmful content) over the prompts and the answers trained toward: chosen answers, and
    kto's desirable ones. Rejected (undesirable) answers are what the model is trained away from, and safety
    preference data holds harmful ones on purpose, so they are not screened. With safety.pii_policy redact, the
    redacted prompts and answers are used (the screen keeps every example, in order)."""
    from .. import safety

    def answer(r):
        return r.chosen if hasattr(r, "chosen") else (r.completion if r.desirable else None)

    def as_examples(records):
        return [tsdata.Example(tuple(r.prompt) + ((answer(r),) if answer(r) else ()), None, r.origin) for r in records]

    def back(records, examples):
        out = []
        for r, ex in zip(records, examples, strict=True):
            prompt = ex.messages[:len(r.prompt)]
            if hasattr(r, "chosen"):
                out.append(replace(r, prompt=prompt, chosen=ex.messages[-1]))
            else:
                out.append(replace(r, prompt=prompt, **({"completion": ex.messages[-1]} if r.desirable else {})))
        return out

    screened = safety.screen_training_data(replace(splits, train=as_examples(splits.train),
                                                   valid=as_examples(splits.valid)), cfg.safety, emit)
    return replace(splits, train=back(splits.train, screened.train), valid=back(splits.valid, screened.valid))
