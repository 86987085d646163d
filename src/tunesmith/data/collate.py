"""Batching rendered examples: right padding, and the count of target tokens a loss is normalised by."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from .render import IGNORE, RenderedExample


def collate(batch: Sequence[RenderedExample], pad_id: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: each (B, T) with T the longest example, padded on the right.

    Padding is masked by position, never by token id: the pad id may equal eos (SmolLM2's GGUF
    tokenizer does this), and a real eos must keep its label so the model learns to stop.
    """
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")
    if not batch:
        raise ValueError("collate() needs at least one example")
    T = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for b, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_target_tokens(labels: torch.Tensor) -> int:
    """Target tokens in a (B, T) label batch *after the causal shift*: labels[:, 1:] != IGNORE.

    The model predicts token t+1 from tokens <= t, so the first label of each row is never a target;
    this is the count a summed loss is divided by.
    """
    return int((labels[:, 1:] != IGNORE).sum())


def collate_packed(batch: Sequence[RenderedExample]) -> dict[str, torch.Tensor]:
    """The examples of one micro-batch as one row with no padding: input_ids, labels, position_ids (1, N).

    Position ids restart at 0 for each example and ``cu_seq_lens_q``/``cu_seq_lens_k`` hold the example
    boundaries [0, n1, n1+n2, ..., N] (transformers' FlashAttention names), so attention can stay inside
    each example (train.packing.packed_attention_forward). The first label of every example is IGNORE: the
    token before it belongs to another example and must not be trained to predict it. The summed loss
    and the target count are those of the padded batch; only the padding is gone.
    """
    if not batch:
        raise ValueError("collate_packed() needs at least one example")
    lengths = [len(ex.input_ids) for ex in batch]
    input_ids = torch.tensor([t for ex in batch for t in ex.input_ids], dtype=torch.long)[None]  # (1, N)
    labels = torch.tensor([t for ex in batch for t in [IGNORE, *ex.labels[1:]]], dtype=torch.long)[None]  # (1, N)
    # attention_mask of ones: with sdpa no (N, N) mask is built (the causal skip); the attention function
    # takes the boundaries from cu_seq_lens_q.
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, N)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": torch.ones_like(input_ids), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
