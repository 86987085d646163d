"""RMSNorm, the rotary embedding and SwiGLU in fewer passes over memory: transformers' formulas, in plain torch.

In eager PyTorch each elementwise op is one pass over its tensors, and autograd adds more passes backward.
Llama's RMSNorm is pow, mean, rsqrt and two multiplies (and their backward); its rotary embedding is two
multiplies, a negation, a concatenation and an add for q and again for k (and their backward). The autograd
Functions here compute the same values in fewer passes with closed-form backward passes. Measured on the
built-in model's shapes at 1615 tokens, forward + backward: RMSNorm 2.27 -> 1.39 ms, rotary (q and k)
3.03 -> 1.59 ms. This is what Liger-Kernel's RMSNorm/RoPE kernels do on a GPU, written here in plain torch ops,
without a kernel compiler.

The norm's math is in two plain functions (``rms_norm_forward``/``rms_norm_backward``) because two Functions use
it: ``RMSNormFunction`` (a norm alone) and ``projections.Projections`` (a norm and the projections that read its
output, as one Function). So is SwiGLU's (``swiglu_backward``).

Precision: the norm is computed in fp32 whatever its input (as transformers' LlamaRMSNorm does), the rotary
embedding and SwiGLU in their input's dtype; under bf16 mixed precision the inputs are bf16 and the results too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What matrix products on x run in: the autocast dtype where autocast is on for x's device (mixed precision),
    else x's own dtype. The kernels take it as an argument and cast their weights to it, as autocast would."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# ---------------------------------------------------------------- RMSNorm


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y = weight * x * rstd with rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension, in fp32 (one
    reduction for the mean square and two passes for the product; eager transformers: five ops). rstd (..., 1)."""
    xf = x.float()  # a no-op for fp32; bf16 residuals are normalised in fp32, as LlamaRMSNorm does
    rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps))
    y = (xf * rstd).mul_(weight)
    return y, rstd


def rms_norm_backward(g: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, need_x: bool,
                      need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x and weight, in fp32, from g = dL/dy. With x^ = x * r and r = rstd:
    dx = r * (g w) - x * r^3 * mean(g w x),   dw = sum over rows of g x^."""
    g, x = g.float(), x.float()
    gx = gweight = None
    if need_x:
        gw = g * weight  # dL/dx^
        coef = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.size(-1))
        gx = gw.mul_(rstd).addcmul_(x, coef, value=-1.0)
    if need_weight:
        gweight = (g * x).mul_(rstd).reshape(-1, x.size(-1)).sum(0)
    return gx, gweight


class RMSNormFunction(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps) over the last dimension, computed in fp32, returned in ``out_dtype``
    (transformers: the promotion of x's and w's dtypes). Keeps x, rstd and w for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        x, rstd, weight = ctx.saved_tensors
        # not for the first block's input under LoRA (the frozen embeddings' output): no gradient is asked of x
        gx, gweight = rms_norm_backward(g, x, rstd, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (gx.to(x.dtype) if gx is not None else None,
                gweight.to(weight.dtype) if gweight is not None else None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of x through ``RMSNormFunction``, in the dtype transformers returns."""
    with torch.autocast(x.device.type, enabled=False):  # the function decides its own dtypes
        return RMSNormFunction.apply(x, weight, eps, torch.promote_types(x.dtype, weight.dtype))


# ---------------------------------------------------------------- rotary embedding


class RotaryFunction(torch.autograd.Function):
    """transformers' ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = cat(-x2, x1), in three passes:

        out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2        (halves of the last dimension)
        dx1  = g1 c1 + g2 s2,   dx2  = g2 c2 - g1 s1
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.size(-1) // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.size(-1) // 2
        gx = g * cos
        gx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        gx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return gx, None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, original):
    """Llama's ``apply_rotary_pos_emb(q, k, cos, sin)`` (q, k: (B, H, T, D); cos, sin: (B, T, D)) through
    ``RotaryFunction``, in q's dtype (cos and sin are cast to it). ``original``, the model's own function, runs
    where the shapes are not Llama's."""
    if not (q.dtype == k.dtype and q.is_floating_point() and q.size(-1) % 2 == 0
            and cos.shape[-1] == sin.shape[-1] == q.size(-1) == k.size(-1)
            and not cos.requires_grad and not sin.requires_grad):
        return original(q, k, cos, sin)
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)


# ---------------------------------------------------------------- SwiGLU


def swiglu_backward(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, silu: torch.Tensor,
                    need_gate: bool, need_up: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of gate and up for y = silu(gate) * up, by the operations autograd runs for ``F.silu(gate) * up`` (so
    the same bits): d_up = g * silu(gate), d_gate = silu_backward(g * up, gate). ``silu`` is silu(gate), computed by the
    caller (it may need it for something else too); it is overwritten."""
    d_gate = torch.ops.aten.silu_backward(g * up, gate) if need_gate else None
    d_up = silu.mul_(g) if need_up else None
    return d_gate, d_up


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward but not silu(gate), which backward computes again: autograd
    would keep three (tokens, intermediate) tensors (gate for silu; silu(gate) and up for the product), this keeps
    two, for one more elementwise pass. Used where the down projection is not computed by ``Projections`` (which
    computes the product itself, from the same gate and up)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        return swiglu_backward(g, gate, up, F.silu(gate), *ctx.needs_input_grad[:2])
