"""The small functions the training loop calls: batching, the token-normalised step, evaluation, NEFTune."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..data import IGNORE, count_targets  # noqa: F401  (count_targets: re-exported for callers of this module)
from .loss import token_loss as lm_token_loss


# ---------------------------------------------------------------- batching


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): resume recomputes it exactly."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(lengths: list[int], micro: int, seed: int, epoch: int, shuffle: bool,
                         window: int = 64) -> list[int]:
    """An epoch order whose consecutive runs of ``micro`` examples have similar lengths (less padding).

    Like transformers' LengthGroupedSampler: take the shuffled order (``epoch_order``), cut it into
    windows of ``window`` micro-batches, sort each window by length (longest first), cut it into
    micro-batches and shuffle those (seeded). A partial micro-batch goes last, so the micro-batch
    boundaries that step_micro_batches cuts are the groups made here. Depends only on (lengths, micro,
    seed, epoch): resume recomputes it exactly.
    """
    base = epoch_order(len(lengths), seed, epoch, shuffle)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    size = micro * window
    groups, tail = [], []
    for start in range(0, len(base), size):
        chunk = sorted(base[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        cut = [chunk[i:i + micro] for i in range(0, len(chunk), micro)]
        if len(cut[-1]) < micro:
            tail = cut.pop()
        groups += [cut[j] for j in torch.randperm(len(cut), generator=g).tolist()] if shuffle else cut
    return [i for grp in groups for i in grp] + tail


def step_micro_batches(order: list[int], micro: int, accum: int, processes: int, rank: int,
                       lengths: list[int] | None = None) -> list[list[list[int]]]:
    """Split one epoch's order into optimizer steps of micro-batches.

    Returns ``steps[k]`` = this rank's micro-batches (lists of example indices) for step k, and the
    global micro-batches of the step are those of every rank. Step k covers examples
    ``order[k*E:(k+1)*E]`` with E = micro * accum * processes; rank r takes micro-batches r, r+P, ...

    With ``lengths`` (tokens per example; for packed micro-batches, whose cost is their tokens) and several
    processes, the step's examples are instead dealt out so that every rank gets about the same number of
    tokens (``balanced``), no rank more examples or micro-batches than above. The ranks wait for the slowest
    at every step's gradient all-reduce, and consecutive examples of varied lengths leave one rank with far
    more tokens than another. The step's examples, and so its update, are the same either way.

    In a short last step some ranks run out of micro-batches; they get empty ones (``[]``), to be run as
    passes that carry no loss (``no_loss``), so that every rank makes the same number of forward and
    backward passes, and so the same collective calls (DDP's gradient all-reduce, FSDP's all-gathers).
    """
    per_step = micro * accum * processes
    steps = []
    for start in range(0, len(order), per_step):
        chunk = order[start:start + per_step]
        n_micro = math.ceil(len(chunk) / micro)
        passes = math.ceil(n_micro / processes)  # what rank 0, the busiest, runs
        if lengths is not None and processes > 1:
            share = balanced(chunk, lengths, [micro * passes] * processes)[rank]
            # and the rank's own micro-batches the same way, all full but the last (the loop re-cuts a rank's
            # examples in runs of ``micro``), so that no one of them holds all its longest examples
            sizes = [micro] * (math.ceil(len(share) / micro) - 1)
            mine = balanced(share, lengths, sizes + [len(share) - sum(sizes)]) if share else []
        else:
            mbs = [chunk[i:i + micro] for i in range(0, len(chunk), micro)]
            mine = [mb for j, mb in enumerate(mbs) if j % processes == rank]
        steps.append(mine + [[] for _ in range(passes - len(mine))])
    return steps


def balanced(indices: list[int], lengths: list[int], capacities: list[int]) -> list[list[int]]:
    """``indices`` dealt into bins of at most ``capacities[b]`` examples with sums of ``lengths`` close to equal.

    Longest first, each to the bin with the fewest tokens so far that has room (LPT, Graham 1969, with a cap on
    examples per bin); ties go to the earlier example and the earlier bin, so the result depends only on the
    arguments (resume recomputes it). Each bin lists its examples longest first.
    """
    bins: list[list[int]] = [[] for _ in capacities]
    load = [0] * len(capacities)
    for i in sorted(indices, key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        b = min((b for b in range(len(bins)) if len(bins[b]) < capacities[b]), key=lambda b: load[b])
        bins[b].append(i)
        load[b] += lengths[i]
    return bins


def no_loss(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label IGNORE: its forward/backward pass adds exactly 0 to the loss, the target
    count and the gradients. A rank with no data left in a step or an evaluation runs one of these so it
    keeps making the collective calls the other ranks make."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}


def global_target_tokens(order: list[int], start: int, per_step: int, n_targets: list[int]) -> int:
    """Target tokens in the whole step across every rank and micro-batch (known locally: each rank
    holds the full rendered dataset, so no communication is needed)."""
    return sum(n_targets[i] for i in order[start:start + per_step])


# ---------------------------------------------------------------- loss


@dataclass(frozen=True)
class Compute:
    """How the training and evaluation passes compute: with tunesmith's kernels or not (train.kernels: the output layer
    fused with the loss and the packed attention kernel are chosen per call; the model's blocks were rewritten once,
    by kernels.apply_kernels), and the autocast dtype of mixed precision (None: the weights' own dtypes)."""
    fused: bool = True
    autocast: torch.dtype | None = None


def token_loss(model, batch: dict[str, torch.Tensor], compute: Compute = Compute(),
               count_correct: bool | None = None) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over target tokens, their count, and how many the model got right (by default counted
    in evaluation, under no_grad, and 0 in training, which skips the (N, V) argmax unless ``count_correct``)."""
    device = batch["input_ids"].device.type
    count = not torch.is_grad_enabled() if count_correct is None else count_correct
    with torch.autocast(device, dtype=compute.autocast, enabled=compute.autocast is not None):
        return lm_token_loss(model, batch, fused=compute.fused, count_correct=count)


def sft_loss(model, batch: dict[str, torch.Tensor], compute: Compute = Compute()) -> tuple[torch.Tensor, dict]:
    """The supervised loss as the loop takes any objective's: (summed loss, summed statistics). The statistic is the
    target tokens predicted right, per target token once the loop divides it: the step's mean token accuracy (the job
    server's train_accuracy, as in OpenAI's results file)."""
    loss, _, correct = token_loss(model, batch, compute, count_correct=True)
    return loss, {"mean_token_accuracy": float(correct)}


def backward_step(model, micro_batches: list[dict], step_weight: int, accelerator,
                  loss=sft_loss) -> tuple[float, dict[str, float]]:
    """Forward/backward every micro-batch of one optimizer step; returns this rank's summed loss and statistics.

    ``loss(model, batch) -> (summed loss, summed statistics)`` is the objective's (objectives/). Each micro-batch's
    summed loss is scaled by processes / step_weight (the step's target tokens for sft, pairs for dpo): DDP averages
    gradients over processes, so the product is the gradient of (sum of the step's losses) / step_weight.
    """
    scale = accelerator.num_processes / max(1, step_weight)
    total, stats = 0.0, {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            loss_sum, batch_stats = loss(model, batch)
            accelerator.backward(loss_sum * scale)
        total += float(loss_sum.detach())
        for k, v in batch_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return total, stats


def grads_finite(params) -> bool:
    """Whether this rank's gradients are finite (under FSDP only its shards: combine ranks with any_rank).

    One device-to-host read for all of them: ``bool()`` per parameter would wait for the device once per
    tensor (hundreds of times a step for a LoRA adapter). The largest magnitude per tensor is inf or NaN exactly
    when the tensor holds one, and reads each gradient once without a full-size boolean copy."""
    peaks = [torch.linalg.vector_norm(_local(p.grad), float("inf")) for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP DTensor: this rank's shard


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalLoss:
    loss: float
    perplexity: float
    token_accuracy: float
    tokens: int


@torch.no_grad()
def eval_loss(model, batches, accelerator, compute: Compute = Compute()) -> EvalLoss:
    """Token-weighted validation loss, perplexity and next-token accuracy, summed over every process."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        loss_sum, n, correct = token_loss(model, batch, compute)
        sums += torch.tensor([float(loss_sum), n, correct], dtype=torch.float64, device=accelerator.device)
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    loss_total, n, correct = sums.tolist()
    loss = loss_total / max(1.0, n)
    return EvalLoss(loss, math.exp(min(loss, 50.0)), correct / max(1.0, n), int(n))


# ---------------------------------------------------------------- NEFTune


def add_neftune(model, alpha: float):
    """NEFTune (Jain et al., 2023, arXiv:2310.05914): uniform noise on input embeddings while training,
    scaled alpha / sqrt(T * d). transformers.integrations.neftune has the same hook, but it takes alpha from
    a module attribute and computes the scale as a float32 tensor (slightly different noise bounds); this one
    keeps the scale in double. Returns the hook handle (``.remove()`` to turn it off)."""
    emb = model.get_input_embeddings()

    def hook(module, inputs, output):  # output: (B, T, d)
        if not module.training:
            return output
        mag = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-mag, mag)

    return emb.register_forward_hook(hook)
