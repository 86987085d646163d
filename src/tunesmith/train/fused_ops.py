"""RMSNorm and the rotary embedding in fewer passes over memory, SwiGLU in less: transformers' formulas, in plain torch.

In eager PyTorch each elementwise op is one pass over its tensors, and autograd adds more passes backward.
Llama's RMSNorm is pow, mean, rsqrt and two multiplies (and their backward); its rotary embedding is two
multiplies, a negation, a concatenation and an add for q and again for k (and their backward). The autograd
Functions here compute the same values in fewer passes with closed-form backward passes. Measured on the
built-in model's shapes at 1615 tokens, forward + backward: RMSNorm 2.27 -> 1.39 ms, rotary (q and k)
3.03 -> 1.59 ms; the LoRA step +4% (bench harness, same batches). This is what Liger-Kernel's RMSNorm/RoPE
kernels do on a GPU, written here in plain torch ops, without a kernel compiler.

The SwiGLU product of Llama's MLP, ``silu(gate) * up``, is computed as eager torch computes it, but autograd would
keep three (tokens, intermediate) tensors for its backward (gate for silu; silu(gate) and up for the product):
``SwiGLUFunction`` keeps gate and up and recomputes silu(gate) in backward, one more elementwise pass for one
tensor less; a fused LoRA down projection keeps the same two instead of the product (``SwiGLUFrom``). On the
built-in model each is 6.1 of the 36.1 KB per token and block kept for backward; the benchmark's LoRA job peaks
at 3.39 GB with the first, 2.97 GB with both, instead of 3.79 GB, at the same speed or better (README).

They apply only where they compute what the model would: a module or function whose code is byte-for-byte
Llama's (most decoder models copy it: Mistral, Qwen2/3, SmolLM3, ...; checked by comparing bytecode, so a
variant such as Gemma's ``1 + weight`` norm is never replaced), on fp32 tensors (SwiGLU: any floating dtype,
as its operations are autograd's own). Anything else runs the model's own code. Results equal transformers' to
float rounding, SwiGLU's bit for bit (tests/train/test_train_perf.py).
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _same_code(f, g) -> bool:
    """Whether two functions have identical bytecode, constants and names (one was copied from the other)."""
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names)


# ---------------------------------------------------------------- RMSNorm


class RMSNormFunction(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps) over the last dimension, fp32.

    Forward: one reduction for the mean square and two passes for the product (eager: five ops). Backward,
    with x^ = x * r and r = 1 / rms:  dx = r * (g w) - x * r^3 * mean(g w x),  dw = sum over rows of g x^.
    Returns y and r (no gradient flows through r).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps))
        y = (x * rstd).mul_(weight)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, g, _g_rstd):
        x, rstd, weight = ctx.saved_tensors
        gx = gweight = None
        if ctx.needs_input_grad[0]:  # not for the first block's input (the frozen embeddings' output)
            gw = g * weight  # dL/dx^
            coef = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.size(-1))
            gx = gw.mul_(rstd).addcmul_(x, coef, value=-1.0)
        if ctx.needs_input_grad[1]:
            gweight = (g * x).mul_(rstd).reshape(-1, x.size(-1)).sum(0)
        return gx, gweight, None


class NormedFrom(NamedTuple):
    """What an RMSNormFunction output y was computed from: y = x * rstd * weight, while y's version is ``version``.

    The LoRA projections that read y (perf.LoraLinearFunction) keep these, which the norm keeps anyway, instead of
    y itself: their A gradients are ((dL/d(yA^T) * rstd)^T x) * weight. That drops one (tokens, hidden) tensor
    per norm from the activations kept for backward, 4.6 of the 40.6 KB per token and block of the built-in model.
    """
    x: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor
    version: int


def _source(y: torch.Tensor, attr: str):
    """The record a fused function left on its output y (``attr``), if y is unchanged since (same version)."""
    src = getattr(y, attr, None)
    return src if src is not None and y._version == src.version else None


def normed_from(y: torch.Tensor) -> NormedFrom | None:
    """How y was computed, if it is an RMSNormFunction output, unchanged since."""
    return _source(y, "_tunesmith_normed_from")


def _fused_rmsnorm_forward(self, hidden_states):
    if hidden_states.dtype == self.weight.dtype == torch.float32:
        y, rstd = RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # (a forward that backward follows)
            y._tunesmith_normed_from = NormedFrom(hidden_states, rstd, self.weight, y._version)
        return y
    return type(self).forward(self, hidden_states)


def fuse_rmsnorm(model: nn.Module) -> int:
    """Route every Llama-formula RMSNorm of ``model`` through RMSNormFunction; returns how many."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    n = 0
    for module in model.modules():
        if (_same_code(type(module).forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon")
                and isinstance(getattr(module, "weight", None), torch.Tensor) and "forward" not in vars(module)):
            module.forward = types.MethodType(_fused_rmsnorm_forward, module)  # as perf.fuse_lora does
            n += 1
    return n


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


def _rotary_applies(x, cos, sin) -> bool:
    return (x.dtype == cos.dtype == sin.dtype == torch.float32 and x.size(-1) % 2 == 0
            and cos.size(-1) == sin.size(-1) == x.size(-1) and not cos.requires_grad and not sin.requires_grad)


def _make_fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not (_rotary_applies(q, cos, sin) and _rotary_applies(k, cos, sin)):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)

    apply_rotary_pos_emb.tunesmith_original = original
    return apply_rotary_pos_emb


_FUSED_ROTARY: dict[str, object] = {}  # modeling module name -> its fused replacement (None: leave it alone)


def _rotary_module(model: nn.Module) -> str | None:
    """The modeling module of ``model`` if its apply_rotary_pos_emb and rotate_half are Llama's."""
    name = type(model).__module__
    if name not in _FUSED_ROTARY:  # decided once per modeling module: this runs at every training forward
        from transformers.models.llama import modeling_llama as llama

        module = sys.modules.get(name)
        apply, rotate = getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None)
        ok = (apply is not None and rotate is not None and getattr(apply, "tunesmith_original", None) is None
              and _same_code(apply, llama.apply_rotary_pos_emb) and _same_code(rotate, llama.rotate_half))
        _FUSED_ROTARY[name] = _make_fused_rotary(apply) if ok else None
    return name if _FUSED_ROTARY[name] is not None else None


@contextmanager
def fused_rotary(model: nn.Module):
    """Inside: the model's modeling module applies the rotary embedding through RotaryFunction.

    The attention layers call the module-level ``apply_rotary_pos_emb``, so that name is swapped for the
    duration of a training/evaluation forward (generation and other models outside keep the original; so does
    gradient checkpointing's recomputation, which runs during backward).
    """
    name = _rotary_module(model)
    if name is None:
        yield
        return
    module = sys.modules[name]
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = _FUSED_ROTARY[name]
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original


# ---------------------------------------------------------------- SwiGLU


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward but not silu(gate), which backward computes again.

    Same operations as autograd's path through ``F.silu`` and ``*`` (so the same bits):
    d_up = g * silu(gate), d_gate = silu_backward(g * up, gate). ``stash``: where the down projection's backward
    (perf.LoraLinearFunction, which recomputes the product from gate and up: ``swiglu_from``) leaves the
    silu(gate) it computed, so it is not computed a third time.
    """

    @staticmethod
    def forward(ctx, gate, up, stash: SiluStash | None = None):
        ctx.save_for_backward(gate, up)
        ctx.stash = stash
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        silu = ctx.stash.take() if ctx.stash is not None else None
        d_up = (silu if silu is not None else F.silu(gate)).mul_(g) if ctx.needs_input_grad[1] else None
        return d_gate, d_up, None


class SiluStash:
    """silu(gate), handed from the down projection's backward to SwiGLUFunction's backward, which runs next."""

    __slots__ = ("silu",)

    def __init__(self):
        self.silu = None

    def take(self):
        silu, self.silu = self.silu, None
        return silu


class SwiGLUFrom(NamedTuple):
    """What a SwiGLUFunction output y was computed from: y = silu(gate) * up, while y's version is ``version``.

    The LoRA projection that reads y (perf.LoraLinearFunction: the MLP's down projection) keeps gate and up, which
    SwiGLUFunction keeps anyway, instead of y, and computes y again in backward for its A gradient: one
    (tokens, intermediate) tensor less per block, for one elementwise pass.
    """
    gate: torch.Tensor
    up: torch.Tensor
    stash: SiluStash
    version: int


def swiglu_from(y: torch.Tensor) -> SwiGLUFrom | None:
    """How y was computed, if it is a SwiGLUFunction output, unchanged since."""
    return _source(y, "_tunesmith_swiglu_from")


def _fused_swiglu_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)  # the original's order (fused LoRA pairs them: perf.SharedInputGroup)
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_floating_point():
        return self.down_proj(self.act_fn(gate) * up)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return self.down_proj(SwiGLUFunction.apply(gate, up))
    stash = SiluStash()
    y = SwiGLUFunction.apply(gate, up, stash)
    y._tunesmith_swiglu_from = SwiGLUFrom(gate, up, stash, y._version)  # for a fused LoRA down projection
    return self.down_proj(y)


def _is_silu(act) -> bool:
    """transformers' SiLUActivation (``hidden_act: silu``) or torch's nn.SiLU (``swish``), not a subclass."""
    from transformers.activations import SiLUActivation

    return type(act) in (SiLUActivation, nn.SiLU)


def fuse_swiglu(model: nn.Module) -> int:
    """Route every Llama-formula MLP of ``model`` (``down(silu(gate(x)) * up(x))``) through SwiGLUFunction; returns
    how many. Other activations (GELU MLPs, ...) and other MLP code keep the model's own forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    n = 0
    for module in model.modules():
        if (_same_code(type(module).forward, LlamaMLP.forward) and "forward" not in vars(module)
                and _is_silu(getattr(module, "act_fn", None))
                and all(isinstance(getattr(module, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))):
            module.forward = types.MethodType(_fused_swiglu_forward, module)
            n += 1
    return n
