"""Teacher-forced loss on held-out examples: the training run's validation loss, computed outside a run.

One loss path: examples are rendered as training renders them (``data.render_examples`` with the run's
DataConfig: which tokens carry loss (train_on, assistant weights), max_length and overflow, the chat template),
batched as training batches them (``data.collate``, right padding) and scored by training's own loss
(``train.steps.token_loss``). So ``validation_loss`` on a run's validation file, with the run's data settings,
is the val_loss the run logged for the same weights.

The loss is normalised by the total number of target tokens across all examples (sum of token losses / token
count), not a mean of per-example means, so long answers weigh in proportion to their length and the batch
size does not matter. In a chat the targets are the assistant's tokens plus the template's end of turn (up to
the eos): the eos is how the model learns to stop, so a model that rambles past the answer pays for it here.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch

from .generate import Conversation, _device, _eval_mode


def validation_loss(model, tokenizer, examples: Sequence, data=None, *, chat_template: str | None = None,
                    batch_size: int = 8) -> dict:
    """{"loss": mean token cross-entropy (nats), "perplexity": exp(loss), "tokens": target tokens scored,
    "token_accuracy": share of targets that are the model's argmax, "truncated"/"dropped": examples over max_length}.

    ``examples`` are ``data.Example``; ``data`` is the run's DataConfig (None: assistant tokens, nothing cut);
    ``chat_template`` as ``model.chat_template`` (None: the tokenizer's own, which a saved run's tokenizer is).
    An example over max_length is cut (or dropped) as training would; with ``overflow: error`` it is cut as
    ``truncate`` cuts it: that setting refuses a run's own data before training starts, and a file scored after
    it (a test file at the end of a run, `tunesmith eval`) is scored, not refused. On data the run accepted,
    nothing is over, so the figure is the run's. Raises ``DataError`` for an example with no token to score.
    """
    from .. import data as tsdata
    from ..config import DataConfig
    from ..train.steps import Compute, token_loss

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data is None:  # no run to take a max_length from: nothing is cut
        data = DataConfig(max_length=sys.maxsize)
    elif data.overflow == "error":
        data = data.model_copy(update={"overflow": "truncate"})
    rendered = tsdata.render_examples(examples, tokenizer, data, chat_template=chat_template)
    items = rendered.items
    # Padding is masked by position (collate), so any id will do where the tokenizer has no pad token.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # little padding, as training
    device = _device(model)
    total, count, correct = 0.0, 0, 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = tsdata.collate([items[i] for i in order[start:start + batch_size]], pad_id)
            loss_sum, n, hits = token_loss(model, {k: v.to(device) for k, v in batch.items()}, Compute())
            total, count, correct = total + float(loss_sum), count + n, correct + hits
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count and loss < 700 else float("inf"), "tokens": count,
            "token_accuracy": correct / count if count else float("nan"), "truncated": rendered.truncated,
            "dropped": rendered.dropped}


def reference_loss(model, tokenizer, conversations: Sequence[Conversation], references: Sequence[str],
                   batch_size: int = 8) -> dict:
    """``validation_loss`` of each reference as the reply to its conversation; only the references are scored
    (assistant turns inside a conversation carry weight 0), with their end of turn."""
    if len(conversations) != len(references):
        raise ValueError(f"{len(conversations)} conversations but {len(references)} references; they must pair up")
    return validation_loss(model, tokenizer, reference_examples(conversations, references), batch_size=batch_size)


def reference_examples(conversations: Sequence[Conversation], references: Sequence[str]) -> list:
    """Each conversation with its reference as the last (and only trained) assistant turn, as ``data.Example``."""
    from ..data import Example, Message, Origin

    return [Example(tuple(Message(m["role"], m["content"], 0 if m["role"] == "assistant" else None) for m in conv)
                    + (Message("assistant", ref),), None, Origin("<references>", i, unit="record"))
            for i, (conv, ref) in enumerate(zip(conversations, references))]
