"""Teacher-forced loss of reference answers: how likely the model finds the answer we wanted.

Each example is rendered as prompt (chat template, generation prompt on) + reference tokens + eos,
and only the reference tokens and the eos carry loss: the eos is how the model learns to stop, so a
model that rambles past the answer pays for it here. The loss is normalised by the total number of
target tokens across all examples (sum of token losses / token count), not a mean of per-example
means, so long answers weigh in proportion to their length and the batch size does not matter.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .generate import Conversation, _device, _eval_mode, left_pad, length_sorted_batches, render_prompt


def reference_loss(model, tokenizer, conversations: Sequence[Conversation], references: Sequence[str],
                   batch_size: int = 8) -> dict:
    """{"loss": mean token cross-entropy (nats), "perplexity": exp(loss), "tokens": target tokens scored}."""
    if len(conversations) != len(references):
        raise ValueError(f"{len(conversations)} conversations but {len(references)} references; they must pair up")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [_example_ids(tokenizer, conv, ref) for conv, ref in zip(conversations, references)]
    total, count = 0.0, 0
    with _eval_mode(model), torch.inference_mode():
        for batch in length_sorted_batches([len(ids) for ids, _ in rows], batch_size):
            loss_sum, n = _batch_loss_sum(model, [rows[i] for i in batch], _pad_id(tokenizer))
            total, count = total + loss_sum, count + n
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count and loss < 700 else float("inf"), "tokens": count}


def _example_ids(tokenizer, conversation: Conversation, reference: str) -> tuple[list[int], int]:
    """(prompt + reference + eos ids, number of target tokens at the end)."""
    target = list(tokenizer(reference, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target.append(tokenizer.eos_token_id)
    if not target:
        raise ValueError("an empty reference and a tokenizer without eos leave nothing to score")
    return render_prompt(tokenizer, conversation) + target, len(target)


def _batch_loss_sum(model, rows: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[float, int]:
    """Summed cross-entropy over the batch's target tokens, and how many there were."""
    input_ids, mask = left_pad([ids for ids, _ in rows], pad_id, _device(model))  # (B, T)
    # Left padding puts every row's targets in the last columns, so only the last K+1 positions'
    # logits are needed (K = longest target): (B, K+1, V) instead of (B, T, V), which for a 50k
    # vocabulary is most of the memory.
    keep = max(n for _, n in rows) + 1
    logits = _forward_logits(model, input_ids, mask, keep)[:, :-1].float()  # (B, K, V): predicts the last K tokens
    targets = input_ids[:, -(keep - 1):].clone()  # (B, K)
    for row, (_, n) in enumerate(rows):
        targets[row, : targets.shape[1] - n] = -100  # prompt (or padding) tokens inside the window
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return float(loss), sum(n for _, n in rows)


def _forward_logits(model, input_ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions, (B, keep, V)."""
    params = _forward_params(model)
    kwargs = {"attention_mask": mask, "use_cache": False}
    if "position_ids" in params:  # left padding: positions count real tokens only, as in generate
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits
    return logits[:, -keep:]


def _forward_params(model) -> set[str]:
    # A PEFT model's forward takes **kwargs and passes them on; ask the wrapped transformers model.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0  # never attended to (mask 0) and never scored (label -100)
