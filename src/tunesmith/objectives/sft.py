"""Supervised fine-tuning: cross-entropy on the answer tokens, normalised by the step's target tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import data as tsdata
from ..events import Message
from ..train import steps
from . import Evaluation


@dataclass(frozen=True)
class SFT:
    name: str = "sft"
    unit: str = "tokens"
    figures: tuple[str, ...] = ("perplexity", "token_accuracy")

    def load(self, cfg, emit):
        from .. import safety

        splits = tsdata.load_splits(cfg.data, cfg.train.seed)
        return safety.screen_training_data(splits, cfg.safety, emit)  # PII, harmful content: redact or refuse

    def render(self, records: Sequence[tsdata.Example], tokenizer, cfg, emit, split: str, quiet: bool = False):
        result = tsdata.render_examples(records, tokenizer, cfg.data, chat_template=cfg.model.chat_template)
        if not quiet and (result.truncated or result.dropped):
            emit(Message("warning", f"{split}: {result.truncated} examples truncated, {result.dropped} dropped "
                                    f"(data.max_length={cfg.data.max_length}, data.overflow={cfg.data.overflow})"))
        return result.items

    def references(self, records: Sequence[tsdata.Example]) -> Sequence[tsdata.Example]:
        """Held-out chats whose last assistant turn is the reference answer (samples, task metrics)."""
        return records

    def weight(self, item: tsdata.RenderedExample) -> int:
        return item.n_targets

    def length(self, item: tsdata.RenderedExample) -> int:
        return len(item.input_ids)

    def trained_tokens(self, item: tsdata.RenderedExample) -> int:
        return item.n_targets

    def collate(self, items: Sequence[tsdata.RenderedExample], tokenizer, layout: str) -> dict[str, torch.Tensor]:
        return tsdata.collate(items, tokenizer.pad_token_id) if layout == "padded" else tsdata.collate_packed(items)

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        return {k: v / max(1.0, weight) for k, v in stats.items()}

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return steps.no_loss(batch)

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        return steps.sft_loss(model, batch, compute)

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        ev = steps.eval_loss(model, batches, accelerator, compute)
        return Evaluation(ev.loss, ev.tokens, ev.perplexity, ev.token_accuracy)

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute=None):
        """Base versus tuned on held-out examples: task metrics and reference loss (compare.json)."""
        from ..train import run as runfiles

        return runfiles.compare_with_base(out, model, tokenizer, cfg, splits, model_path, emit)

    def prepare(self, model, items, tokenizer, cfg, model_path, accelerator, compute, emit, precision):
        return items  # nothing to compute before the first step
