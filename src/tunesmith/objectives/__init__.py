"""Training objectives: what a run's examples render to and what a batch's loss is (sft, preference, ...).

The training loop (train/loop.py) is one function for every objective. What differs between supervised
fine-tuning, preference tuning and what comes next is a small value the loop calls, an ``Objective``:

    load      the data files -> records (Example for sft, Pair / Unpaired for preference objectives)
    render    records -> items with token ids (one chat template, one truncation rule per objective)
    prepare   items -> items with what the starting model must give before training (dpo: reference log-probs)
    weight    what one item adds to the number a step's summed loss is divided by (target tokens for sft,
              pairs for dpo): normalisation stays in plain sight in the loop, so gradient accumulation over
              micro-batches equals one large batch exactly, whatever the objective
    length    the tokens an item costs (packing balance, length grouping)
    collate   items -> one micro-batch of tensors (packed into one row where the model allows, a shared prompt once)
    loss      a micro-batch -> (summed loss, summed statistics); the loop divides by the step's weight
    evaluate  held-out batches -> an Evaluation: the loss that picks the best checkpoint, and statistics
    compare   the tuned model against the base on held-out data, at the end of the run

Some objectives have more members, which the loop looks for:

    prepare_step         a step's examples on this process -> what the step trains on, made now: grpo samples and
                         grades answers to its prompts (its items until then are prompts, of weight 0); denoise draws
                         each image's noise, timestep, crop and caption dropout from a stream of its own
    watched              what the overfitting watch adds up from a step (grpo: minus the reward, per answer)
    zero_spread_warning  a warning when the groups keep scoring alike (nothing to learn from)
    write_preflight      the run's preflight.json, for data that is not text (denoise: the image summary)
    model_kind           the kind of model it trains (train/kinds.py), when not a causal language model
    epoch_order          an epoch's order of examples, or None for the loop's own (denoise's aspect-ratio buckets:
                         whole micro-batches of one image shape each, from the seed and epoch alone)
    epoch_examples       the examples an epoch trains on, when that is not len(items) (buckets round up)
    eval_chunks          validation items cut into batches, or None for the loop's own (buckets: one shape a batch)

An objective is a plain value (a dataclass), not a base class with hooks: ``for_config(cfg)`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch


@dataclass
class Evaluation:
    """An objective's held-out result: ``loss`` decides the best checkpoint and early stopping (lower is better);
    ``perplexity`` and ``token_accuracy`` where they mean something (sft); ``stats``: the objective's own figures
    (rewards/chosen, rewards/accuracy, ...), logged beside the loss."""

    loss: float
    count: int  # what the loss is averaged over: target tokens (sft), pairs (dpo)
    perplexity: float | None = None
    token_accuracy: float | None = None
    stats: dict[str, float] = field(default_factory=dict)
    # answers the objective generated for the evaluation (grpo: held-out prompts with their grades), logged in place
    # of the loop's own sample generations
    samples: list[dict] = field(default_factory=list)


class Objective(Protocol):
    name: str
    unit: str  # what ``weight`` counts: "tokens", "pairs" or "examples"
    figures: tuple[str, ...]  # what every held-out evaluation reports besides the loss (the sweep may optimise them)

    def load(self, cfg, emit) -> Any:
        """The data splits (``.train``, ``.valid``, ``.test``) of this objective's records, screened."""

    def render(self, records: Sequence, tokenizer, cfg, emit, split: str, quiet: bool = False) -> list:
        """Records -> rendered items; warns (unless quiet) about what max_length truncated or dropped."""

    def prepare(self, model, items: dict[str, list], tokenizer, cfg, model_path, accelerator, compute, emit,
                precision: str) -> dict[str, list]:
        """The rendered items ({"train": ..., "valid": ...}) with what must come from the starting model before the
        first step (dpo: the reference log-probabilities); called once, before a resumed run loads its weights."""

    def weight(self, item) -> int:
        """What the item adds to the step's loss normaliser."""

    def length(self, item) -> int:
        """Tokens the item costs in a forward pass."""

    def trained_tokens(self, item) -> int:
        """Tokens that carry loss (throughput in the run log)."""

    def collate(self, items: Sequence, tokenizer, layout: str) -> dict[str, torch.Tensor]:
        """One micro-batch on the CPU (the loop moves it to the device), laid out as ``train.packing.row_layout`` says
        the model takes: "padded", "packed", or "prefixed" (packed, with answers that share a prompt holding it once;
        an objective without shared prompts packs)."""

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch made to add exactly 0 to loss, normaliser and gradients (a rank with no data left still makes
        the forward and backward calls the other ranks make)."""

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the batch's weight units, summed statistics) of one micro-batch."""

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """A step's summed statistics (every micro-batch and process) as the figures to log: most divide by the
        step's weight; kto averages its rewards over the desirable and the undesirable answers each."""

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        """Held-out loss and statistics over every process's batches."""

    def references(self, records: Sequence) -> Sequence:
        """Held-out records as chats (data.Example) whose last assistant turn is the reference answer: what the
        evaluation's sample generations and task metrics use."""

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute) -> dict | None:
        """The end-of-run base-versus-tuned comparison on held-out data (written to the run folder)."""


def stream_seed(seed: int, step: int, key: int, j: int = 0) -> int:
    """The seed of one random stream: draw ``j`` of example ``key`` (its place in its split) at ``step`` (negative:
    evaluation). A function of these alone, so what is drawn for an example is the same on any process, in any batch,
    and in a resumed run (grpo's sampled answers, denoise's noise and timesteps)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step + 10, key, j]).generate_state(1)[0])


def for_config(cfg) -> Objective:
    """The objective ``cfg.objective.name`` names, with its settings."""
    name = cfg.objective.name
    if name == "sft":
        from .sft import SFT

        return SFT()
    if name == "kto":
        from .kto import KTO

        return KTO(cfg.objective.kto)
    if name == "grpo":
        from .grpo import GRPO

        return GRPO(cfg.objective.grpo)
    if name == "denoise":
        from .denoise import Denoise

        return Denoise(cfg.objective.denoise)
    from .preference import preference_objective

    return preference_objective(cfg.objective)
