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


def collate_prefixed(batch: Sequence[RenderedExample], groups: Sequence[tuple[int, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """``collate_packed``, except that examples sharing a prompt hold it once: a prompt followed by its answers, each
    answer attending to the prompt and to itself, never to another answer (preference pairs: a chosen and a rejected
    answer; reinforcement fine-tuning: a group of sampled answers).

    ``groups``: (prefix length L, indices into ``batch`` of the examples whose first L tokens are that shared prefix);
    every example in exactly one group. A group is laid out as its first example whole, then for every further example
    its tokens from L - 1 on: the prefix's last token is repeated at the start of each further answer, so that every
    answer token is predicted from the position just before it, as in the plain layout (the loss code shifts labels by
    one and needs no other rule). A group of prompt Lp and answers a1, a2 costs Lp + a1 + 1 + a2 tokens instead of
    2 Lp + a1 + a2.

    Besides ``collate_packed``'s keys: ``attention_spans`` (S, 4) int32, one row (s, p, b, e) per segment of the row:
    its queries and keys are rows [s, p) followed by rows [b, e), causally, at positions 0, 1, ...; the first answer
    of a group is (s, p, p, e) (one contiguous sequence, prompt included), a further answer (s, p, b, e) with [s, p)
    the prefix less its last token (``packing.packed_attention_forward`` computes it). ``cu_seq_lens_q`` marks the
    segments [s, e) of first answers and [b, e) of further ones; ``segment_sequence`` (S,) long gives the index into
    ``batch`` of each segment's example, so target tokens map to the caller's numbering (``loss.target_rows``).
    """
    if not batch:
        raise ValueError("collate_prefixed() needs at least one example")
    if sorted(i for _, members in groups for i in members) != list(range(len(batch))):
        raise ValueError("collate_prefixed(): every example must be in exactly one group")
    ids, labels, positions, spans, order, bounds = [], [], [], [], [], [0]
    for prefix, members in groups:
        first = batch[members[0]]
        if prefix < 1 or any(len(batch[i].input_ids) <= prefix or batch[i].input_ids[:prefix] != first.input_ids[:prefix]
                             for i in members):
            raise ValueError(f"collate_prefixed(): the examples {list(members)} do not share their first {prefix} "
                             "tokens, or one has nothing after them")
        s = len(ids)
        p = s + prefix - 1  # the rows the group's further answers see before their own: the prefix less its last token
        for j, i in enumerate(members):
            ex = batch[i]
            cut = 0 if j == 0 else prefix - 1
            b = len(ids)
            ids += ex.input_ids[cut:]
            labels += [IGNORE, *ex.labels[cut + 1:]]
            positions += range(cut, len(ex.input_ids))
            spans.append((s, p, p if j == 0 else b, len(ids)))
            order.append(i)
            bounds.append(len(ids))
    input_ids = torch.tensor(ids, dtype=torch.long)[None]  # (1, N)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long)[None],
            "position_ids": torch.tensor(positions, dtype=torch.long)[None], "attention_mask": torch.ones_like(input_ids),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "attention_spans": torch.tensor(spans, dtype=torch.int32),
            "segment_sequence": torch.tensor(order, dtype=torch.long)}
