"""The causal-LM loss: summed cross-entropy over target tokens, computed only where a target is.

With assistant-only labels most positions carry no loss, yet a plain causal-LM forward projects every
position onto the vocabulary (49k for SmolLM2) and a cross-entropy then reads all of it in fp32.
Two things here remove that work without changing the number computed:

1. ``logits_to_keep`` as a (B, T) bool mask (transformers' ``slice_logits_to_keep``): the model
   applies its output layer only at positions whose *next* token is a target, returning (N, V).
2. ``LinearCrossEntropy`` (a custom kernel: ``fused=True``): for architectures whose logits are exactly
   ``lm_head(h)`` (allow-listed below, checked in their transformers source), the output layer is skipped
   inside the model and applied here in row chunks, with the gradients of h, W and b computed in the same
   pass (the chunk's logits are freed at once, and backward only scales them). Peak memory for the head is
   one (chunk, V) tile instead of (N, V) logits plus their softmax and gradient. This is the fused
   linear-cross-entropy of Liger-Kernel / Apple's Cut Cross-Entropy, written in plain torch ops because
   those ship GPU kernels only.

``token_loss`` falls back, path by path, to the plain full-logits loss whenever the model did not do what was
asked (an unknown architecture, a wrapped output layer), so an exotic model is slower but never wrong. The
logits are always taken to fp32 before the softmax, whatever the model computes in (bf16 mixed precision).

``token_logprobs`` takes the same paths (``target_outputs``) to each target token's log-probability, for objectives
that are not a sum over tokens (preference optimisation, reinforcement fine-tuning); its fused head is
``logprobs.LinearTokenLogprobs``.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE
from ..models import base_model
from .kernels.ops import compute_dtype
from .logprobs import linear_token_logprobs
from .packing import model_forward

# Architectures whose CausalLM forward is `logits = self.lm_head(slice_logits_to_keep(h, logits_to_keep))`
# with nothing applied to the logits afterwards (transformers 5.23). Not here: gemma2/3 (soft-capping),
# cohere (logit_scale), granite (logits_scaling), MoE models (router outputs).
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "olmo", "olmo2",
                                    "smollm3", "starcoder2", "stablelm"})

# Rows of logits per chunk: 512 x 49152 fp32 is ~100 MB, large enough for an efficient matmul.
CHUNK_ROWS = 512


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, T) bool: positions whose next token is a target; targets (N,): those next tokens, same order.

    Row-major order of ``h[keep]`` equals row-major order of ``labels[:, 1:][labels[:, 1:] != IGNORE]``.
    """
    nxt = labels[:, 1:]  # (B, T-1): the token position t predicts
    is_target = nxt != IGNORE
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T); the last position predicts nothing
    keep[:, :-1] = is_target
    return keep, nxt[is_target]


def fused_head(model) -> nn.Linear | None:
    """The output layer if the fused loss may replace it: an allow-listed architecture, a plain Linear."""
    inner = base_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # type(...) is, not isinstance: a PEFT-wrapped or quantised head is a subclass with its own forward.
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    # An FSDP shard (DTensor) is only whole inside the module's own forward: leave such a head to the model.
    if any(hasattr(p, "to_local") for p in head.parameters()):
        return None
    return head


def _identity(x):
    return x


@contextmanager
def head_returns_hidden(head: nn.Linear):
    """Inside: ``head(x)`` returns x, so the model's "logits" are its final hidden states (N, d)."""
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        del head.forward


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W.T + b`` against ``targets``, plus the count of argmax hits.

    Forward walks rows in chunks: logits (n, V) -> log-softmax in fp32 -> loss; if gradients are needed, the same
    tile becomes softmax - onehot (the gradient of the summed loss w.r.t. the logits) and is multiplied out into
    dL/dh (n, d), dL/dW (V, d) and dL/db at once. Backward only scales them by the incoming scalar, so no logits are
    kept or recomputed. The FLOPs equal the plain path's; the memory is one tile.

    The matrix products run in ``dtype`` (h's dtype, or the autocast dtype under mixed precision: W is cast to it,
    as autocast casts it in the plain path); the softmax and the sums are fp32 and the gradients come back in the
    dtypes of h, W and b.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int, count_correct: bool, dtype: torch.dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)  # (V, d); a no-op unless mixed precision computes in another dtype than W is stored in
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            hc, yc = h[s:s + chunk_rows].to(dtype), targets[s:s + chunk_rows]  # (n, d), (n,)
            logits = F.linear(hc, w, b).float()  # (n, V)
            rows = torch.arange(hc.size(0), device=h.device)
            if count_correct:  # an argmax over (n, V): skipped in training, where nobody reads it
                correct += (logits.argmax(-1) == yc).sum()
            # log_softmax is one fused pass; logsumexp + subtracting it would be four passes and a temporary
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            loss -= logp[rows, yc].sum()
            if need_h or need_w or need_b:
                g = logp.exp_()  # softmax, in place
                g[rows, yc] -= 1.0  # d(sum CE)/d(logits) = softmax - onehot
                if need_h:
                    grad_h[s:s + chunk_rows] = g.to(dtype) @ w
                if need_w:
                    grad_w.addmm_(g.t(), hc.float())
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.have
        h_dtype, w_dtype = ctx.dtypes
        gh = None
        if need_h:  # computed in the products' dtype
            grad_h = next(saved)
            gh = (grad_h * grad_loss.to(grad_h.dtype)).to(h_dtype)
        gw = (next(saved) * grad_loss).to(w_dtype) if need_w else None
        gb = (next(saved) * grad_loss).to(w_dtype) if need_b else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(h, weight, bias, targets, chunk_rows: int = CHUNK_ROWS, count_correct: bool = True,
                         dtype: torch.dtype | None = None):
    """(summed loss, correct count) of the output layer on h (N, d); see ``LinearCrossEntropy``. ``dtype``: what the
    matrix products run in (default: the autocast dtype under autocast, else h's)."""
    if dtype is None:
        dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # the function casts for itself
        return LinearCrossEntropy.apply(h, weight, bias, targets, chunk_rows, count_correct, dtype)


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_params(type(model))


def plain_loss(model, batch: dict[str, torch.Tensor], fused: bool = False) -> tuple[torch.Tensor, int, int]:
    """The reference: full (B, T, V) logits, then cross-entropy over the shifted targets."""
    out = model_forward(model, batch, fused=fused)
    logits = out.logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != IGNORE
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        correct = int(((logits.argmax(-1) == labels) & mask).sum())
    return loss_sum, int(mask.sum()), correct


def target_outputs(model, batch: dict[str, torch.Tensor], fused: bool = True):
    """(x, targets, head) at the target positions of ``batch``, in ``shifted_targets`` order: x is the final hidden
    states h (N, d) when ``head`` is not None (an allow-listed output layer left to the caller to apply, fused),
    else the logits (N, V), computed with ``logits_to_keep`` where the model takes it, else cut from full logits."""
    keep, targets = shifted_targets(batch["labels"])
    if not _takes_logits_to_keep(base_model(model)):
        return model_forward(model, batch, fused).logits[keep], targets, None
    head = fused_head(model) if fused else None
    if head is not None:
        with head_returns_hidden(head):
            out = model_forward(model, batch, fused, logits_to_keep=keep)
        h = out.logits
        if h.dim() == 3:  # the model ignored logits_to_keep: select the rows here
            h = h[keep]
        if h.shape == (targets.numel(), head.in_features):
            return h, targets, head
        # the head swap did not take (the forward calls something else): fall through to logits_to_keep
    logits = model_forward(model, batch, fused, logits_to_keep=keep).logits
    if logits.dim() == 3:  # not honoured: the plain path on the logits we already have
        logits = logits[keep]
    return logits, targets, None


def token_loss(model, batch: dict[str, torch.Tensor], fused: bool = True,
               count_correct: bool = True) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over target tokens, their count, and argmax hits: the plain loss, computed only at target
    positions (and, with ``fused`` on an allow-listed model, without any (N, V) tensor: ``LinearCrossEntropy``).
    ``count_correct=False`` skips the argmax (the count is then 0): training does not read it.

    Summing (not averaging) lets the caller divide by the target count of the whole optimizer step, so accumulation
    4 x 2 equals one batch of 8 exactly: averaging per micro-batch would weight a short micro-batch's tokens more (the
    well-known gradient-accumulation bug)."""
    if not _takes_logits_to_keep(base_model(model)):
        return plain_loss(model, batch, fused)
    x, targets, head = target_outputs(model, batch, fused)
    n = int(targets.numel())
    if head is not None:
        loss, correct = linear_cross_entropy(x, head.weight, head.bias, targets, count_correct=count_correct)
        return loss, n, int(correct) if count_correct else 0  # int() of a device tensor waits for the device
    loss = F.cross_entropy(x.float(), targets, reduction="sum")
    with torch.no_grad():
        correct = int((x.argmax(-1) == targets).sum()) if count_correct else 0
    return loss, n, correct


def target_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) long: the example each target of ``shifted_targets(batch["labels"])`` belongs to, numbered 0..n_examples-1.

    A padded batch (collate) has one example per row: the row index. A packed batch (collate_packed: one row, examples
    end to end) marks its examples by their boundaries ``cu_seq_lens_q`` = [0, n1, n1 + n2, ..., N], the ones its
    attention is split by (packing.model_forward): the target token at position q belongs to the example i with
    cu[i] <= q < cu[i + 1]. (The token predicting it, at q - 1, is in the same example: collate_packed leaves the first
    label of every example IGNORE.) So a packed batch and the padded batch of the same examples give the same rows.
    A prefixed batch (collate_prefixed: answers sharing a prompt) numbers its segments back to the examples it was
    given by ``segment_sequence``.
    """
    keep, _ = shifted_targets(batch["labels"])
    where = keep.nonzero()  # (N, 2): (row, position predicting the target), row-major as shifted_targets
    cu = batch.get("cu_seq_lens_q")
    if cu is None:
        return where[:, 0]
    if keep.size(0) != 1:
        raise ValueError(f"a packed batch (cu_seq_lens_q) is one row; this one has {keep.size(0)}")
    segment = torch.searchsorted(cu.to(where.device, torch.long), where[:, 1] + 1, right=True) - 1
    order = batch.get("segment_sequence")  # answers sharing a prompt (collate_prefixed): segments in the row's order
    return segment if order is None else order.to(where.device)[segment]


def example_count(batch: dict[str, torch.Tensor]) -> int:
    """How many examples ``batch`` holds: its rows, or a packed row's examples (``target_rows`` numbers them)."""
    cu = batch.get("cu_seq_lens_q")
    return batch["labels"].size(0) if cu is None else cu.numel() - 1


def token_logprobs(model, batch: dict[str, torch.Tensor], fused: bool = True,
                   with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """(logps, rows): logps (N,) fp32 = log p(target token) at every target position, in ``shifted_targets`` order, and
    rows (N,) long = the example each belongs to (``target_rows``: the row of a padded batch, the example within a
    packed row). For preference objectives and reinforcement fine-tuning, whose loss is a nonlinear function of
    per-sequence sums: ``torch.zeros(example_count(batch)).index_add_(0, rows, logps)`` are the sequences'
    log-probabilities. ``with_entropy``: (logps, rows, entropy), entropy (N,) the model's predictive entropy at each
    target position (a statistic: no gradient).

    The paths are ``token_loss``'s (``target_outputs``): with ``fused`` on an allow-listed model no (N, V) tensor is
    kept (``logprobs.LinearTokenLogprobs``: backward recomputes the logits a chunk at a time), else logits at the target
    positions only, else full logits; the log-softmax is always fp32. ``-logps.sum()`` is ``token_loss``'s loss."""
    x, targets, head = target_outputs(model, batch, fused)
    entropy = None
    if head is not None:
        logps = linear_token_logprobs(x, head.weight, head.bias, targets, chunk_rows=CHUNK_ROWS,
                                      with_entropy=with_entropy)
        if with_entropy:
            logps, entropy = logps
    else:
        log_softmax = torch.log_softmax(x.float(), dim=-1)
        logps = log_softmax.gather(1, targets[:, None]).squeeze(1)
        if with_entropy:
            with torch.no_grad():
                entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1)
    rows = target_rows(batch).to(logps.device)
    return (logps, rows, entropy) if with_entropy else (logps, rows)
