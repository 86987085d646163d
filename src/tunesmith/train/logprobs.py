"""Per-token log-probabilities of the output layer without (N, V) logits: ``LinearTokenLogprobs``.

Preference objectives (DPO, ORPO, SimPO, KTO) and reinforcement fine-tuning need log p(target) at every target token,
not their sum: the loss is a nonlinear function of per-sequence sums, so each token's gradient has its own weight
(grad_i, known only in backward) and the gradients cannot be formed in the forward pass as ``loss.LinearCrossEntropy``
forms them. Here forward keeps only h and each row's log-sum-exp; backward recomputes each chunk's logits once more.
The FLOPs are the plain path's plus one (n, d) x (d, V) product per chunk; the memory is one (chunk, V) tile.
``loss.token_logprobs`` is the caller, with the fallbacks for models whose head cannot be fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels.ops import compute_dtype


class LinearTokenLogprobs(torch.autograd.Function):
    """logp (N,) fp32: log_softmax(h @ W.T + b)[i, targets[i]] for every row i of h (N, d).

    Forward walks rows in chunks: logits (n, V) in fp32 -> the target's logit less the row's log-sum-exp (n,), which
    is kept; the exponentials are taken in place, so the tile is the only (n, V) tensor. Backward takes grad (N,),
    recomputes the chunk's logits and forms d/dlogits = grad_i * (onehot - softmax) in place of the tile, then dL/dh
    for the chunk, and adds its share of dL/dW (V, d) and dL/db (V,).

    The matrix products run in ``dtype`` (h's dtype, or the autocast dtype under mixed precision: W is cast to it, as
    autocast casts it in the plain path); the softmax and the sums are fp32 and the gradients come back in the dtypes
    of h, W and b, as in ``loss.LinearCrossEntropy``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int, dtype: torch.dtype, with_entropy: bool = False):
        w = weight.to(dtype)  # (V, d); a no-op unless mixed precision computes in another dtype than W is stored in
        b = bias.to(dtype) if bias is not None else None
        logp = torch.empty(h.size(0), dtype=torch.float32, device=h.device)  # (N,)
        lse = torch.empty(h.size(0), dtype=torch.float32, device=h.device)  # (N,): backward's softmax, no reduction
        entropy = torch.empty(h.size(0) if with_entropy else 0, dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            e = s + chunk_rows
            logits = F.linear(h[s:e].to(dtype), w, b).float()  # (n, V)
            picked = logits.gather(1, targets[s:e, None]).squeeze(1)  # (n,)
            # log-sum-exp in place of the tile (log_softmax or logsumexp would allocate a second (n, V) tensor)
            top = logits.amax(dim=-1)  # (n,)
            logits.sub_(top[:, None])
            if with_entropy:
                entropy[s:e] = shifted_entropy(logits)
            lse[s:e] = logits.exp_().sum(dim=-1).log_().add_(top)
            logp[s:e] = picked - lse[s:e]
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_entropy):  # grad (N,) fp32; the entropy is a statistic, not differentiated
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, n_rows = ctx.dtype, ctx.chunk_rows
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, h.size(0), n_rows):
            hc, yc, gc = h[s:s + n_rows].to(dtype), targets[s:s + n_rows], grad[s:s + n_rows]  # (n, d), (n,), (n,)
            g = F.linear(hc, w, b).float()  # (n, V): the forward's logits, bit for bit
            g.sub_(lse[s:s + n_rows, None]).exp_()  # softmax, in place
            g.mul_(-gc[:, None])  # -grad_i * softmax
            g[torch.arange(g.size(0), device=g.device), yc] += gc  # + grad_i * onehot
            if need_h:
                grad_h[s:s + n_rows] = g.to(dtype) @ w
            if need_w:
                grad_w.addmm_(g.t(), hc.float())
            if need_b:
                grad_b += g.sum(0)
        gw = grad_w.to(weight.dtype) if need_w else None
        gb = grad_b.to(bias.dtype) if need_b else None
        return grad_h, gw, gb, None, None, None, None


ENTROPY_ROWS = 32  # rows of a tile whose exponentials shifted_entropy holds at once: (32, V) fp32 beside the tile


def shifted_entropy(shifted: torch.Tensor) -> torch.Tensor:
    """The entropy (n,) of softmax over each row of ``shifted`` (n, V) fp32, logits less their row maximum:
    H = log S - sum(e^x x) / S with S = sum(e^x), a few rows at a time so that the extra memory stays small."""
    out = torch.empty(shifted.size(0), dtype=torch.float32, device=shifted.device)
    for r in range(0, shifted.size(0), ENTROPY_ROWS):
        x = shifted[r:r + ENTROPY_ROWS]
        ex = x.exp()
        total = ex.sum(dim=-1)
        out[r:r + ENTROPY_ROWS] = total.log() - ex.mul_(x).sum(dim=-1) / total
    return out


def linear_token_logprobs(h, weight, bias, targets, chunk_rows: int, dtype: torch.dtype | None = None,
                          with_entropy: bool = False):
    """log p(targets[i]) (N,) fp32 under the output layer on h (N, d); see ``LinearTokenLogprobs``. ``dtype``: what the
    matrix products run in (default: the autocast dtype under autocast, else h's). ``with_entropy``: (logp, entropy),
    entropy (N,) the distribution's entropy at each row (no gradient), from the tile the forward computes anyway."""
    if dtype is None:
        dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # the function casts for itself
        logp, entropy = LinearTokenLogprobs.apply(h, weight, bias, targets, chunk_rows, dtype, with_entropy)
    return (logp, entropy) if with_entropy else logp
