"""The Linear layers of a decoder block that read one input, computed as one autograd Function, LoRA inside the GEMMs.

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T        (Hu et al., 2021, arXiv:2106.09685; A_i = B_i = None: a plain Linear)

for the Linears a block calls on one input (q, k and v; gate and up; o; down), where x is given explicitly by its
source, which the Function computes itself:

- ``x``                          the input as it is (o_proj reads the attention output);
- ``RMSNormOf(x0, weight, eps)``    x = Llama's RMSNorm of x0 (q/k/v and gate/up read the block's norms);
- ``SwiGLUOf(gate, up)``            x = silu(gate) * up (down_proj reads the MLP's product).

Why one Function, and why it computes its input:
- PEFT's ``result + lora_B(lora_A(x)) * scaling`` makes two extra passes over the (N, out) output forward and more
  backward, which on a CPU cost about as much as the adapter matmuls themselves: here the scaling and the sums go
  into addmm's alpha/beta. For several Linears on one input, the rank-r products, which are memory-bound (each reads
  all of x, or of g, for r outputs), run once for all of them: x A^T and the A gradients read x once, and the input
  gradient sum_i g_i W_i + s_i (g_i B_i) A_i is summed inside the GEMMs instead of autograd adding one (N, in)
  tensor per member (at 1200 tokens a block's q/k/v forward + backward 11.2 -> 10.3 ms, gate/up 32.8 -> 32.0 ms).
- Keeping, for backward, what the source keeps anyway instead of x: the norm's input and 1/rms (the A gradients
  are ((dL/d(xA^T) * rstd)^T x0) * w, so the norm output is never kept), or gate and up (the product is computed
  again in backward, and silu(gate) once for both the A gradient and the SwiGLU backward). Autograd would keep x as
  well: one (tokens, hidden) tensor per norm and one (tokens, intermediate) tensor per MLP. On the built-in model
  that is 4.6 + 6.1 of 40.6 KB per token and block.

Mixed precision: the products run in ``dtype`` (the autocast dtype under autocast, else x's dtype); weights and
adapters are cast to it (a no-op when they are stored in it), and gradients come back in the dtypes the parameters
are stored in (the fp32 master weights and adapters of bf16 mixed precision).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import SwiGLUFunction, compute_dtype, rms_norm, rms_norm_backward, rms_norm_forward, swiglu_backward


class RMSNormOf(NamedTuple):
    """The projections' input is Llama's RMSNorm of x0: weight * x0 / sqrt(mean(x0^2) + eps)."""
    x0: torch.Tensor
    weight: torch.Tensor
    eps: float


class SwiGLUOf(NamedTuple):
    """The projections' input is silu(gate) * up."""
    gate: torch.Tensor
    up: torch.Tensor


Source = torch.Tensor | RMSNormOf | SwiGLUOf


class LinearParams(NamedTuple):
    """What ``Projections`` computes of one Linear: y = x W^T + b + scaling (x A^T) B^T, no adapter when A is None."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float


def linear_params(module: nn.Module) -> LinearParams | None:
    """The parameters of ``module`` if ``Projections`` computes exactly what its forward does: a plain nn.Linear, or a
    PEFT LoRA Linear on a plain nn.Linear running one vanilla adapter without dropout (or with its adapters switched
    off, or merged into the weight: then its base alone). None for anything else (DoRA, dropout, several adapters,
    a quantised base, ...), which then runs its own forward."""
    if type(module) is nn.Linear:
        return LinearParams(module.weight, module.bias, None, None, 0.0)
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear:
        return None
    base = module.base_layer
    if module.disable_adapters or module.merged:
        return LinearParams(base.weight, base.bias, None, None, 0.0)
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if (name in module.lora_variant or not isinstance(module.lora_dropout[name], nn.Identity)
            or module.lora_B[name].bias is not None):
        return None
    return LinearParams(base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                        float(module.scaling[name]))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class Projections(torch.autograd.Function):
    """Several Linears on one input given by its source; see the module docstring. Arguments: how the source is given
    ("x", "rmsnorm" or "swiglu"), the compute dtype, the RMSNorm's eps (or 0), the scalings (one per member), the
    source's tensors (x; x0 and the norm weight; gate and up), then W, b, A, B of each member. One output per member.
    """

    @staticmethod
    def forward(ctx, kind: str, dtype: torch.dtype, eps: float, scalings: tuple[float, ...], *tensors):
        n_src = 1 if kind == "x" else 2
        src, params = tensors[:n_src], tensors[n_src:]
        weights, biases, adapters_a, adapters_b = params[0::4], params[1::4], params[2::4], params[3::4]
        if kind == "x":
            x = src[0].to(dtype)
            kept: tuple = (x,)
        elif kind == "rmsnorm":
            y, rstd = rms_norm_forward(src[0], src[1], eps)
            x = y.to(dtype)
            kept = (src[0], rstd, src[1])  # what RMSNormFunction keeps: x0, 1/rms, the norm weight
        else:  # swiglu
            x = F.silu(src[0]).mul_(src[1]).to(dtype)  # SwiGLUFunction's operations
            kept = (src[0], src[1])
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        ws = [w.to(dtype) for w in weights]  # (out_i, in): the frozen weights of mixed precision are stored in dtype
        lora = [i for i, a in enumerate(adapters_a) if a is not None]
        a_cat = torch.cat([adapters_a[i].to(dtype) for i in lora]) if lora else None  # (sum of r, in)
        xa = x2 @ a_cat.t() if lora else None  # (N, sum of r)
        bs = [_cast(b, dtype) for b in adapters_b]
        cols = list(itertools.accumulate([0] + [a.size(0) if a is not None else 0 for a in adapters_a]))[:-1]
        one_rounding = lora and dtype != torch.float32
        if one_rounding:
            # bf16: x W^T + s (x A^T) B^T as one product [x | x A^T] @ [W | s B]^T, so the sum is rounded to bf16 once.
            # Rounded apart, x W^T lands on the bf16 grid and an adapter's term below half a unit in the last place
            # rounds away entirely: the forward would not see what the adapters learned (the benchmark's LoRA job: a
            # held-out batch's loss +2.4% after 4 steps, +3.2% after 8, while the same adapters evaluated in fp32
            # equalled fp32's; rounded once: +0.0% and +0.3%). PEFT's own forward under autocast rounds apart.
            width, rank = x2.size(1), xa.size(1)
            xx = torch.cat([x2, xa], dim=1)  # (N, in + sum of r)
        outs = []
        for w, bias, a_i, b_i, s, col in zip(ws, biases, adapters_a, bs, scalings, cols):
            if one_rounding and a_i is not None:
                wide = w.new_zeros(w.size(0), width + rank)  # (out, in + sum of r): [W | 0 .. s B_i .. 0]
                wide[:, :width] = w
                torch.mul(b_i, s, out=wide[:, width + col:width + col + a_i.size(0)])
                y_i = torch.addmm(bias.to(dtype), xx, wide.t()) if bias is not None else xx @ wide.t()
            else:
                y_i = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()  # (N, out)
                if a_i is not None:
                    y_i.addmm_(xa[:, col:col + a_i.size(0)], b_i.t(), alpha=s)
            outs.append(y_i.view(*x.shape[:-1], y_i.size(-1)))
        ctx.save_for_backward(*kept, xa, a_cat, *ws, *bs)
        ctx.kind, ctx.dtype, ctx.scalings, ctx.cols, ctx.x_shape = kind, dtype, scalings, cols, x.shape
        ctx.src_dtype = src[0].dtype
        ctx.members = len(weights)
        ctx.ranks = [a.size(0) if a is not None else 0 for a in adapters_a]
        ctx.has_bias = [b is not None for b in biases]
        ctx.param_dtypes = [(w.dtype, b.dtype if b is not None else None, a.dtype if a is not None else None,
                             bb.dtype if bb is not None else None)
                            for w, b, a, bb in zip(weights, biases, adapters_a, adapters_b)]
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not a zero tensor to multiply out
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        m, kind = ctx.members, ctx.kind
        saved = ctx.saved_tensors
        n_kept = {"x": 1, "rmsnorm": 3, "swiglu": 2}[kind]
        kept, (xa, a_cat), rest = saved[:n_kept], saved[n_kept:n_kept + 2], saved[n_kept + 2:]
        ws, bs = rest[:m], rest[m:]
        n_src = 1 if kind == "x" else 2
        need_src, need = ctx.needs_input_grad[4:4 + n_src], ctx.needs_input_grad[4 + n_src:]  # W, b, A, B at 4i..4i+3
        out: list[torch.Tensor | None] = [None] * (4 * m)
        if all(g is None for g in grads):
            return (None, None, None, None, *([None] * n_src), *out)
        gs = [None if g is None else g.reshape(-1, g.size(-1)) for g in grads]  # (N, out_i)
        lora = [i for i in range(m) if ctx.ranks[i]]
        # d/d(x A_i^T), (N, r_i); a scaling every adapter shares (the usual case) goes into the GEMMs' alpha
        shared = len({ctx.scalings[i] for i in lora}) <= 1
        s = ctx.scalings[lora[0]] if lora and shared else 1.0
        g_xa = None
        if lora:
            parts = []
            for i in lora:
                if gs[i] is None:  # an output nobody used: no gradient through its adapter
                    parts.append(xa.new_zeros(xa.size(0), ctx.ranks[i]))
                else:
                    parts.append(gs[i] @ bs[i] if shared else (gs[i] @ bs[i]).mul_(ctx.scalings[i]))
            g_xa = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        # x, the projections' input, where a gradient needs it: kept, or computed again from its source
        x2 = kept[0].reshape(-1, kept[0].size(-1)) if kind == "x" else None
        silu = None

        def input_x():
            nonlocal x2, silu
            if x2 is None and kind == "rmsnorm":
                x2 = _normed(kept, ctx.dtype)
            elif x2 is None:  # swiglu: silu(gate) is computed once, for this product and the SwiGLU backward
                gate, up = kept
                silu = F.silu(gate)
                x2 = (silu * up).to(ctx.dtype).reshape(-1, gate.size(-1))
            return x2

        gx = None
        if any(need_src):
            for g, w in zip(gs, ws):
                if g is not None:
                    gx = g @ w if gx is None else gx.addmm_(g, w)
            if g_xa is not None:
                gx = gx.addmm_(g_xa, a_cat, alpha=s)
            gx = gx.view(ctx.x_shape)
        if lora and any(need[4 * i + 2] and gs[i] is not None for i in lora):
            # (sum of r, in): adapter i's rows are its A's gradient
            if kind == "rmsnorm" and not any(need[4 * i] for i in range(m)):  # x is not needed for anything else
                x0, rstd, w_norm = kept
                x0 = x0.reshape(-1, x0.size(-1))
                ga = torch.mm((g_xa * rstd.reshape(-1, 1)).to(ctx.dtype).t(), x0.to(ctx.dtype)).mul_(w_norm)
            else:
                ga = torch.mm(g_xa.t(), input_x())
            ga = ga.mul_(s)
            row = 0
            for i in lora:  # an unused output leaves its A without a gradient, as autograd would
                if need[4 * i + 2] and gs[i] is not None:
                    out[4 * i + 2] = ga[row:row + ctx.ranks[i]].to(ctx.param_dtypes[i][2])
                row += ctx.ranks[i]
        for i, g in enumerate(gs):
            if g is None:
                continue
            w_dtype, b_dtype, _, bb_dtype = ctx.param_dtypes[i]
            if need[4 * i]:
                out[4 * i] = (g.t() @ input_x()).to(w_dtype)
            if need[4 * i + 1] and ctx.has_bias[i]:
                out[4 * i + 1] = g.sum(0).to(b_dtype)
            if ctx.ranks[i] and need[4 * i + 3]:  # (out, r), computed as its transpose: (r, N) @ (N, out) runs ~2x faster
                c, r = ctx.cols[i], ctx.ranks[i]
                out[4 * i + 3] = torch.mm(xa[:, c:c + r].t(), g).mul_(ctx.scalings[i]).t().to(bb_dtype)
        src_grads: tuple = (None,) * n_src
        if gx is not None:
            if kind == "x":
                src_grads = (gx.to(ctx.src_dtype),)
            elif kind == "rmsnorm":
                x0, rstd, w_norm = kept
                g0, gwn = rms_norm_backward(gx, x0, rstd, w_norm, need_src[0], need_src[1])
                src_grads = (_cast(g0, x0.dtype), _cast(gwn, w_norm.dtype))
            else:
                gate, up = kept
                if silu is None:
                    silu = F.silu(gate)
                d_gate, d_up = swiglu_backward(gx, gate, up, silu, need_src[0], need_src[1])
                src_grads = (d_gate, d_up)
        return (None, None, None, None, *src_grads, *out)


def _normed(kept, dtype) -> torch.Tensor:
    """The RMSNorm output again, from what was kept (x0, 1/rms, weight): (N, hidden) in ``dtype``."""
    x0, rstd, w = kept
    return (x0.float() * rstd).mul_(w).to(dtype).reshape(-1, x0.size(-1))


def project(source: Source, modules: list[nn.Module]) -> list[torch.Tensor]:
    """The outputs of ``modules`` (Linears a block calls on one input, in that order) on the input ``source`` gives:
    one ``Projections`` call where every module is one it computes (``linear_params``), else the source computed
    alone (RMSNorm, SwiGLU) and each module's own forward."""
    params = [linear_params(mod) for mod in modules]
    first = source if isinstance(source, torch.Tensor) else source[0]
    if None in params:
        if isinstance(source, RMSNormOf):
            x = rms_norm(source.x0, source.weight, source.eps)
        elif isinstance(source, SwiGLUOf):
            x = SwiGLUFunction.apply(source.gate, source.up)
        else:
            x = source
        return [mod(x) for mod in modules]
    dtype = compute_dtype(first)
    if isinstance(source, RMSNormOf):
        kind, eps, tensors = "rmsnorm", float(source.eps), (source.x0, source.weight)
    elif isinstance(source, SwiGLUOf):
        kind, eps, tensors = "swiglu", 0.0, (source.gate, source.up)
    else:
        kind, eps, tensors = "x", 0.0, (source,)
    flat = [t for p in params for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    with torch.autocast(first.device.type, enabled=False):  # the function casts for itself, to ``dtype``
        return list(Projections.apply(kind, dtype, eps, tuple(p.scaling for p in params), *tensors, *flat))
