"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): answers labelled desirable or undesirable, no pairs needed.

Each example is a prompt and one answer with a label (data.format unpaired; a pair file gives its chosen answer as
desirable and its rejected one as undesirable). The loss moves each answer's log-ratio to the reference above (or
below) a reference point z0, an estimate of KL(policy || reference) from mismatched prompt/answer pairs. TRL builds
the mismatched pairs by rotating the answers by one inside each batch; here each example's mismatched answer is the
next example's in the rendered split (``render``), so that the reference log-probabilities of both are computed once
before training, as dpo's are (preference.py), and a resumed run meets the same pairs. z0 is estimated per
micro-batch under no_grad, as TRL does per batch.

A micro-batch of N examples is 2N sequences: the N answers, then the N mismatched ones (scored without gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .. import data as tsdata
from ..events import Message
from . import Evaluation
from .preference import _read_cache, _reference_key, _write_cache, held_out, screen_pairs, sequence_logps
from .preference_losses import kto_kl_estimate, kto_loss


@dataclass(frozen=True)
class LabelledAnswer:
    """A rendered answer, the next example's answer after the same prompt (for z0), and the reference's summed
    log-probabilities of both (None until ``prepare``)."""

    answer: "tsdata.preference.RenderedUnpaired"
    mismatched: tsdata.RenderedExample
    ref: float | None = None
    ref_mismatched: float | None = None


STAT_NAMES = ("rewards/chosen", "rewards/rejected", "count/chosen", "count/rejected", "kl")


@dataclass(frozen=True)
class KTO:
    settings: object  # config.KtoConfig
    name: str = "kto"
    unit: str = "examples"
    figures: tuple[str, ...] = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")

    def load(self, cfg, emit):
        from ..data import preference

        splits = preference.load_preference_splits(cfg.data, cfg.train.seed, "kto")
        return screen_pairs(splits, cfg, emit)

    def render(self, records: Sequence, tokenizer, cfg, emit, split: str, quiet: bool = False) -> list[LabelledAnswer]:
        from ..data import preference

        result = preference.render_unpaired(records, tokenizer, cfg.data, chat_template=cfg.model.chat_template)
        if not quiet and (result.truncated or result.dropped):
            emit(Message("warning", f"{split}: {result.truncated} answers had their prompt truncated (from the left), "
                                    f"{result.dropped} dropped (data.max_length={cfg.data.max_length})"))
        items = result.items
        out = []
        for i, it in enumerate(items):
            other = items[(i + 1) % len(items)] if len(items) > 1 else it
            ids = (it.prompt_ids + other.completion_ids)[-cfg.data.max_length:]
            scored = len(other.completion_ids)
            out.append(LabelledAnswer(it, tsdata.RenderedExample(ids, [tsdata.IGNORE] * (len(ids) - scored)
                                                                 + ids[len(ids) - scored:], it.origin)))
        return out

    def references(self, records: Sequence) -> list[tsdata.Example]:
        """Held-out desirable answers as chats ending in them (samples and task metrics)."""
        return [tsdata.Example(tuple(r.prompt) + (r.completion,), None, r.origin) for r in records if r.desirable]

    def weight(self, item: LabelledAnswer) -> int:
        return 1

    def length(self, item: LabelledAnswer) -> int:
        return len(item.answer.example.input_ids) + len(item.mismatched.input_ids)

    def trained_tokens(self, item: LabelledAnswer) -> int:
        return item.answer.example.n_targets

    def collate(self, items: Sequence[LabelledAnswer], tokenizer, layout: str) -> dict[str, torch.Tensor]:
        """Two batches in one dict: the answers (keys as sft's), the mismatched answers (``kl_`` + key). No prompt is
        shared (a mismatched answer has another example's prompt), so "prefixed" packs."""
        def one(seqs):
            return tsdata.collate(seqs, tokenizer.pad_token_id) if layout == "padded" else tsdata.collate_packed(seqs)

        batch = one([it.answer.example for it in items])
        batch |= {f"kl_{k}": v for k, v in one([it.mismatched for it in items]).items()}
        batch["desirable"] = torch.tensor([it.answer.desirable for it in items])
        batch["example_weight"] = torch.ones(len(items))
        if any(it.ref is None for it in items):
            raise RuntimeError("KTO examples reached the loss without reference log-probabilities (KTO.prepare)")
        batch["ref"] = torch.tensor([it.ref for it in items], dtype=torch.float32)
        batch["ref_mismatched"] = torch.tensor([it.ref_mismatched for it in items], dtype=torch.float32)
        return batch

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "example_weight": torch.zeros_like(batch["example_weight"])}

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch["example_weight"].numel()
        logps, _ = sequence_logps(model, _part(batch, ""), compute, n)
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, _part(batch, "kl_"), compute, n)
        z0 = kto_kl_estimate(kl_logps, batch["ref_mismatched"])
        s = self.settings
        out = kto_loss(logps, batch["ref"], batch["desirable"], z0, s.beta, s.desirable_weight, s.undesirable_weight)
        w = batch["example_weight"].to(out.losses.dtype)
        with torch.no_grad():
            rewards = s.beta * (logps.detach() - batch["ref"])
            good = batch["desirable"].to(w.dtype) * w
            bad = (~batch["desirable"]).to(w.dtype) * w
            stats = {"rewards/chosen": float((rewards * good).sum()), "rewards/rejected": float((rewards * bad).sum()),
                     "count/chosen": float(good.sum()), "count/rejected": float(bad.sum()),
                     "kl": float(z0) * float(w.sum())}
        return (out.losses * w).sum(), stats

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """Rewards averaged over the desirable and the undesirable examples each, z0 over all."""
        good, bad = max(1.0, stats.get("count/chosen", 0.0)), max(1.0, stats.get("count/rejected", 0.0))
        chosen, rejected = stats.get("rewards/chosen", 0.0) / good, stats.get("rewards/rejected", 0.0) / bad
        return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "kl": stats.get("kl", 0.0) / max(1.0, weight)}

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        return held_out(self, model, batches, accelerator, compute, "example_weight", STAT_NAMES)

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute) -> dict | None:
        """Base versus tuned: the mean per-token log-probability of the held-out desirable answers minus that of the
        undesirable ones (compare.json "kto": higher means the model separates them better), after the generations
        of both side by side with the desirable answers as references (as sft's comparison)."""
        from dataclasses import replace as dc_replace
        from pathlib import Path
        import json

        from ..evaluate import base_model
        from ..train import run as runfiles

        records = splits.valid[:cfg.eval.compare_examples]
        if not records:
            emit(Message("warning", "no held-out answers: base-versus-tuned comparison skipped"))
            return None
        items = [it.answer.example for it in self.render(records, tokenizer, cfg, emit, "held-out", quiet=True)]
        desirable = torch.tensor([r.desirable for r in records])
        tuned = _separation(model, items, desirable, tokenizer, compute, cfg.eval.batch_size)
        with base_model(model, model_path, trust_remote_code=cfg.model.trust_remote_code) as side:
            base = _separation(side.model, items, desirable, tokenizer, compute, cfg.eval.batch_size)
        kto = {"examples": len(items), "base_separation": base, "tuned_separation": tuned,
               "what": "mean per-token log-probability of the desirable answers minus that of the undesirable ones"}
        emit(Message("info", f"held-out separation of desirable from undesirable answers ({len(items)} answers): "
                              f"base {base:+.4f} -> tuned {tuned:+.4f} nats per token"))
        sft_view = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test": None})})
        result = runfiles.compare_with_base(out, model, tokenizer, sft_view,
                                            dc_replace(splits, valid=self.references(records)), model_path, emit) or {}
        result["kto"] = kto
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return result

    def prepare(self, model, items: dict[str, list], tokenizer, cfg, model_path, accelerator, compute, emit,
                precision: str) -> dict[str, list]:
        """The reference's log-probabilities of every answer and mismatched answer, cached as dpo's."""
        from pathlib import Path

        from .. import models
        from .preference import _reference_model

        ref_name = self.settings.reference_model
        ref_path = models.ensure_local(ref_name) if ref_name else Path(model_path)
        flat = [it for split in items.values() for it in split]
        seqs = [s for it in flat for s in (it.answer.example, it.mismatched)]
        key = _reference_key(ref_path, [q.input_ids for q in seqs], precision, cfg.data.max_length)
        cache = models.cache_dir() / "reference_logps" / f"kto-{key}.json"
        values = _read_cache(cache, len(flat))
        if values is None:
            with accelerator.main_process_first():
                values = _read_cache(cache, len(flat))
                if values is None:
                    emit(Message("info", f"reference log-probabilities: computing them for {len(flat)} answers once "
                                         f"(cached in {cache})"))
                    with _reference_model(model, ref_name, ref_path, tokenizer, cfg, accelerator) as net:
                        values = _reference_values(self, net, flat, tokenizer, cfg, accelerator, compute)
                    if accelerator.is_main_process:
                        _write_cache(cache, values)
        it = iter(values)
        return {split: [replace(x, ref=a, ref_mismatched=b) for x, (a, b) in zip(part, it)]
                for split, part in items.items()}


@torch.no_grad()
def _separation(model, examples, desirable, tokenizer, compute, batch_size: int) -> float:
    from ..train.packing import packs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    means = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = tsdata.collate_packed(chunk) if packs(model) else tsdata.collate(chunk, tokenizer.pad_token_id)
        logps, n = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, compute, len(chunk))
        means += (logps / n.clamp(min=1)).tolist()
    model.train(was_training)
    m = torch.tensor(means)
    good, bad = m[desirable], m[~desirable]
    return (float(good.mean()) if len(good) else 0.0) - (float(bad.mean()) if len(bad) else 0.0)


def _part(batch: dict, prefix: str) -> dict:
    """The answers' (prefix "") or the mismatched answers' ("kl_") batch out of ``KTO.collate``'s dict."""
    keys = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
            "max_length_k")
    return {k: batch[prefix + k] for k in keys if prefix + k in batch}


@torch.no_grad()
def _reference_values(objective, net, items, tokenizer, cfg, accelerator, compute):
    from ..train.packing import row_layout

    out = []
    for s in range(0, len(items), cfg.eval.batch_size):
        chunk = [replace(it, ref=0.0, ref_mismatched=0.0) for it in items[s:s + cfg.eval.batch_size]]
        batch = {k: v.to(accelerator.device) for k, v in objective.collate(chunk, tokenizer, row_layout(net)).items()}
        a, _ = sequence_logps(net, _part(batch, ""), compute, len(chunk))
        b, _ = sequence_logps(net, _part(batch, "kl_"), compute, len(chunk))
        out += list(zip(a.tolist(), b.tolist()))
    return out
