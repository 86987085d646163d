"""Faster training steps that compute the same numbers (each has a test against the plain path).

The loss: logits only where a target is, and never the whole (B, T, V) at once.

With assistant-only labels most positions carry no loss, yet a plain causal-LM forward projects every
position onto the vocabulary (49k for SmolLM2) and a cross-entropy then reads all of it in fp32.
Two things here remove that work without changing the number computed:

1. ``logits_to_keep`` as a (B, T) bool mask (transformers' ``slice_logits_to_keep``): the model
   applies its output layer only at positions whose *next* token is a target, returning (N, V).
2. ``LinearCrossEntropy``: for architectures whose logits are exactly ``lm_head(h)`` (allow-listed
   below, checked in their transformers source), the output layer is skipped inside the model and
   applied here in row chunks, with the gradients of h, W and b computed in the same pass (the
   chunk's logits are freed at once, and backward only scales them). Peak memory for the head is one
   (chunk, V) tile instead of (N, V) logits plus their softmax and gradient. This is the fused
   linear-cross-entropy of Liger-Kernel / Apple's Cut Cross-Entropy, written in plain torch ops
   because those ship GPU kernels only.

``head_loss`` falls back, path by path, to the plain full-logits loss whenever the model did not do
what was asked (an unknown architecture, a wrapped output layer), so an exotic model is slower but
never wrong.

Packing without padding (``train.packing``): a micro-batch's examples are concatenated into one row
(data.collate.collate_packed), position ids restart per example, and attention runs per example
(``packed_attention_forward``), so examples cannot see each other and no padding is computed at all.
transformers' own answer to a packed row with sdpa is one block-diagonal (T, T) mask over the whole
row; on a CPU that costs the full T_total^2 attention, so the per-example loop here is cheaper.

LoRA (``fuse_lora``): PEFT's adapter forward with the scaling and the sums moved inside the GEMMs, and the
projections that read one input (q, k, v; gate, up) computed together, so their rank-r products read it once.

Measured on the built-in model (bench/bench_train_vs_trl.py; README "Speed and memory" has the figures).
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE
from .fused_ops import fuse_rmsnorm, fuse_swiglu, fused_rotary, normed_from, swiglu_from

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


def base_model(model):
    """The transformers model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


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

    Forward walks rows in chunks: logits (n, V) -> log-softmax -> loss; if gradients are needed, the same
    tile becomes softmax - onehot (the gradient of the summed loss w.r.t. the logits) and is multiplied
    out into dL/dh (n, d), dL/dW (V, d) and dL/db at once. Backward only scales them by the incoming
    scalar, so no logits are kept or recomputed. The FLOPs equal the plain path's; the memory is one tile.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int, count_correct: bool = True):  # h (N, d), weight (V, d)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            hc, yc = h[s:s + chunk_rows], targets[s:s + chunk_rows]  # (n, d), (n,)
            logits = F.linear(hc, weight, bias).float()  # (n, V)
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
                    grad_h[s:s + chunk_rows] = (g.to(weight.dtype) @ weight).to(h.dtype)
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
        gh = next(saved) * grad_loss.to(h_dtype) if need_h else None
        gw = (next(saved) * grad_loss).to(w_dtype) if need_w else None
        gb = (next(saved) * grad_loss).to(w_dtype) if need_b else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(h, weight, bias, targets, chunk_rows: int = CHUNK_ROWS, count_correct: bool = True):
    """(summed loss, correct count) of the output layer on h (N, d); see ``LinearCrossEntropy``."""
    return LinearCrossEntropy.apply(h, weight, bias, targets, chunk_rows, count_correct)


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_params(type(model))


def plain_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """The reference: full (B, T, V) logits, then cross-entropy over the shifted targets."""
    out = _forward(model, batch)
    logits = out.logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != IGNORE
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        correct = int(((logits.argmax(-1) == labels) & mask).sum())
    return loss_sum, int(mask.sum()), correct


def head_loss(model, batch: dict[str, torch.Tensor], fused: bool = True,
              count_correct: bool = True) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over target tokens, their count, and argmax hits: the plain loss, computed
    only at target positions (and, with ``fused`` on an allow-listed model, without any (N, V) tensor).
    ``count_correct=False`` skips the argmax (the count is then 0): training does not read it."""
    if not _takes_logits_to_keep(base_model(model)):
        return plain_loss(model, batch)
    keep, targets = shifted_targets(batch["labels"])
    n = int(targets.numel())
    head = fused_head(model) if fused else None
    if head is not None:
        with head_returns_hidden(head):
            out = _forward(model, batch, logits_to_keep=keep)
        h = out.logits
        if h.dim() == 3:  # the model ignored logits_to_keep: select the rows here
            h = h[keep]
        if h.shape == (n, head.in_features):
            loss, correct = linear_cross_entropy(h, head.weight, head.bias, targets, count_correct=count_correct)
            return loss, n, int(correct) if count_correct else 0  # int() of a device tensor waits for the device
        # the head swap did not take (the forward calls something else): fall through to logits_to_keep
    out = _forward(model, batch, logits_to_keep=keep)
    logits = out.logits
    if logits.dim() == 3:  # not honoured: the plain path on the logits we already have
        logits = logits[keep]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(-1) == targets).sum()) if count_correct else 0
    return loss, n, correct


# Keys of a collated batch that the model's forward takes (the packed ones follow transformers'
# FlashAttention kwargs, so a flash_attention_2 model on a GPU runs a packed row natively).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs of a collated batch: ids, mask, and the packed-row boundaries when present."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


# ---------------------------------------------------------------- packed rows: attention per example

PACKED_ATTENTION = "tunesmith_packed"
_packed_calls = 0  # how many attention calls honoured segment boundaries (a safety check in head_loss)
_bounds: tuple[torch.Tensor, list[int]] | None = None  # the last cu_seq_lens_q seen, and its values


def _segment_bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """``cu_seq_lens.tolist()``, read once per forward: every layer gets the same tensor, and reading a device
    tensor waits for the device, which would stall the launch queue at each layer. The reference held here
    keeps the tensor alive, so a new micro-batch's boundaries can never be mistaken for it."""
    global _bounds
    if _bounds is None or _bounds[0] is not cu_seq_lens:
        _bounds = (cu_seq_lens, cu_seq_lens.tolist())
    return _bounds[1]


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_flash_applies(query, key, value, dropout: float, kwargs: dict) -> bool:
    """Whether ``PackedCausalAttention`` computes what sdpa would: a CPU tensor, no dropout, none of the extras
    (logit soft-capping, attention sinks, a position bias, a paged cache) that sdpa_attention_forward handles."""
    return (_FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None and query.device.type == "cpu" and not dropout
            and query.dtype == key.dtype == value.dtype and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and query.size(-1) == key.size(-1) == value.size(-1) and query.size(1) % key.size(1) == 0
            and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias", "cache"))
            and not kwargs.get("output_attentions"))


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each example of a packed row, on the CPU: the same flash kernel sdpa calls per
    example (so the same numbers, bit for bit), without autograd's per-slice bookkeeping.

    Slicing the row per example and concatenating the outputs (the loop below) makes autograd's backward
    allocate a zero-filled, full-row gradient for every slice of q, k and v and add them up, and copy the
    outputs once more in ``cat``: about 0.2 of the attention's time at the benchmark's lengths. Here the forward
    writes each example's output into one (1, T, H, D) tensor and the backward writes each example's gradients
    into their rows of three preallocated tensors. GQA (fewer key/value heads) is the kernel's own.

    Measured and not done: the kernel's backward gains only 1.3x from a second thread (it splits the work by
    head), and running different examples on single-threaded worker threads is 0.70x the loop's time alone,
    but inside a training step it gained nothing, because the OpenMP threads of the step's matmuls spin ~3 ms
    waiting for more work and take a core from the workers; with libgomp's spin shortened (GOMP_SPINCOUNT,
    read only at process start) the job gained 0.5-1.5%, within this machine's run-to-run noise.
    """

    @staticmethod
    def forward(ctx, query, key, value, bounds: tuple[int, ...], scale: float):  # (1, H, T, D), (1, Hkv, T, D) x 2
        b, h, t, d = query.shape
        out = query.new_empty(b, t, h, d)
        lses = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, lse = _FLASH_CPU(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], 0.0, True, scale=scale)
            out[:, s:e] = o.transpose(1, 2)
            lses.append(lse)
        # the output is saved once, as the tensor returned (the next projection saves the same one): the kernel's
        # backward reads each example's rows through a (1, H, L, D) view of it, bit-identical to its own copy
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.bounds, ctx.scale = bounds, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (1, T, H, D)
        query, key, value, out, *lses = ctx.saved_tensors
        # (1, heads, T, D) views of (1, T, heads, D) memory, the layout the projections' outputs had
        gq = query.new_empty(query.size(0), query.size(2), query.size(1), query.size(3)).transpose(1, 2)
        gk = key.new_empty(key.size(0), key.size(2), key.size(1), key.size(3)).transpose(1, 2)
        gv = torch.empty_like(gk)
        for i, (s, e) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out[:, s:e].transpose(1, 2), query[:, :, s:e], key[:, :, s:e],
                                             value[:, :, s:e], out[:, s:e].transpose(1, 2), lses[i], 0.0, True,
                                             scale=ctx.scale)
            gq[:, :, s:e] = dq
            gk[:, :, s:e] = dk
            gv[:, :, s:e] = dv
        return gq, gk, gv, None, None


@torch.compiler.disable  # the loop over examples is Python; compiled blocks (train.compile) break the graph here
def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, **kwargs):
    """sdpa, except on a packed row (``cu_seq_lens_q`` given): causal attention within each example.

    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D), like transformers' sdpa_attention_forward.
    On a CPU ``PackedCausalAttention`` calls the flash kernel sdpa would call, per example; elsewhere (or with
    dropout, soft-capping, ...) sdpa_attention_forward does the work for every segment, so the numbers are its own.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    global _packed_calls
    _packed_calls += 1
    bounds = _segment_bounds(cu_seq_lens_q)
    if _cpu_flash_applies(query, key, value, dropout, kwargs):
        scale = scaling if scaling is not None else query.size(-1) ** -0.5
        return PackedCausalAttention.apply(query, key, value, tuple(bounds), float(scale)), None
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout,
                                   scaling=scaling, is_causal=True)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


def _register_packed_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # padded batches: sdpa's own masks


def enable_packing(model) -> bool:
    """Make ``model`` run packed rows per example; False if it cannot (then batches stay padded).

    Models whose attention goes through transformers' AttentionInterface (``_supports_attention_backend``)
    with sdpa or eager get the per-example function above (padded batches still run plain sdpa); a
    FlashAttention model already honours ``cu_seq_lens_q``. Anything else is left alone.
    """
    inner = base_model(model)
    config = getattr(inner, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not getattr(inner, "_supports_attention_backend", False) or impl is None:
        return False
    if not impl.startswith("flash_attention"):
        if impl not in ("sdpa", "eager", PACKED_ATTENTION):
            return False
        _register_packed_attention()
        config._attn_implementation = PACKED_ATTENTION
    inner._tunesmith_packing = True
    return True


def packs(model) -> bool:
    """Whether ``enable_packing`` turned packing on for this model (then batches are collate_packed)."""
    return bool(getattr(base_model(model), "_tunesmith_packing", False))


def _forward(model, batch: dict, **kw):
    """model(batch) with a guard: a packed row must be split per example by the attention, or it is an error
    (silently attending across examples is the failure that matters). The rotary embedding runs in fewer
    passes where the model's is Llama's (fused_ops.py)."""
    with fused_rotary(base_model(model)):
        return _guarded_forward(model, batch, **kw)


def _guarded_forward(model, batch: dict, **kw):
    if batch.get("cu_seq_lens_q") is None:
        return model(**_inputs(batch), use_cache=False, **kw)
    impl = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) or ""
    if impl.startswith("flash_attention"):  # varlen kernels: boundaries and longest example, no mask
        inputs = {k: v for k, v in _inputs(batch).items() if k != "attention_mask"}
        longest = int((batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).max())
        return model(**inputs, max_length_q=longest, max_length_k=longest, use_cache=False, **kw)
    if impl != PACKED_ATTENTION:
        raise RuntimeError("a packed batch reached a model without per-example attention: call "
                           "perf.enable_packing(model) first, or set train.packing: false")
    before = _packed_calls
    out = model(**_inputs(batch), use_cache=False, **kw)
    if _packed_calls == before:
        raise RuntimeError(f"packed batch: the {type(base_model(model)).__name__} attention never saw the example "
                           "boundaries; set train.packing: false for this model")
    return out


# ---------------------------------------------------------------- LoRA in fused GEMMs


class LoraLinearFunction(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T (Hu et al., 2021, arXiv:2106.09685) for one LoRA Linear, or for
    several that read the same x (a block's q, k and v projections; gate and up), with the scaling and the sums
    inside the GEMMs (addmm's alpha/beta).

    PEFT's ``result + lora_B(lora_A(x)) * scaling`` makes two extra passes over the (N, out) output forward and
    more backward, which on a CPU cost about as much as the adapter matmuls themselves. For a group, the rank-r
    products, which are memory-bound (each reads all of x, or of g, for r outputs), run once for every member:
    x A^T and the A gradients read x once, and the input gradient sum_i g_i W_i + s_i (g_i B_i) A_i is summed
    inside the GEMMs (beta=1) instead of autograd adding up one (N, in) tensor per member. Same gradients for
    x, A, B (and W, b when they train).

    Arguments: x, the scalings (one float per member), then W, b, A, B of each member; one output per member.
    """

    @staticmethod
    def forward(ctx, x, scalings: tuple[float, ...], *params):  # x (..., in); W (out, in), A (r, in), B (out, r)
        weights, biases, adapters_a, adapters_b = params[0::4], params[1::4], params[2::4], params[3::4]
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        a = adapters_a[0] if len(adapters_a) == 1 else torch.cat(adapters_a)  # (sum of r, in)
        xa = x2 @ a.t()  # (N, sum of r)
        outs, col = [], 0
        for weight, bias, a_i, b_i, s in zip(weights, biases, adapters_a, adapters_b, scalings):
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, out)
            y.addmm_(xa[:, col:col + a_i.size(0)], b_i.t(), alpha=s)
            col += a_i.size(0)
            outs.append(y.view(*x.shape[:-1], y.size(-1)))
        # x is an RMSNorm's output (fused_ops.normed_from) or a SwiGLU product (fused_ops.swiglu_from): keep what that
        # function keeps anyway instead of x, unless a base weight trains (its gradient needs x itself)
        trains = any(ctx.needs_input_grad[2::4])
        src = None if trains else normed_from(x)
        glu = None if trains or src is not None else swiglu_from(x)
        ctx.normed, ctx.stash = src is not None, glu.stash if glu is not None else None
        kept = (src.x, src.rstd, src.weight) if src is not None else (glu.gate, glu.up) if glu is not None else (x2,)
        ctx.save_for_backward(*kept, xa, a, *weights, *adapters_b)
        ctx.scalings, ctx.ranks, ctx.x_shape = scalings, [a_i.size(0) for a_i in adapters_a], x.shape
        ctx.has_bias = [bias is not None for bias in biases]
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not a zero tensor to multiply out
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.normed:  # x = x0 * rstd * w_norm, row by row
            x0, rstd, w_norm, xa, a, *rest = ctx.saved_tensors
            x0, rstd, x2 = x0.reshape(-1, x0.size(-1)), rstd.reshape(-1, 1), None
        elif ctx.stash is not None:  # x = silu(gate) * up: computed again below, only if the A gradients need it
            gate, up, xa, a, *rest = ctx.saved_tensors
            x2 = None
        else:
            x2, xa, a, *rest = ctx.saved_tensors
        m = len(grads)
        weights, adapters_b, scalings, ranks = rest[:m], rest[m:], ctx.scalings, ctx.ranks
        need = ctx.needs_input_grad[2:]  # W, b, A, B of member i at 4i, ..., 4i + 3
        out: list[torch.Tensor | None] = [None] * (4 * m)
        if all(g is None for g in grads):
            return (None, None, *out)
        gs = [None if g is None else g.reshape(-1, g.size(-1)) for g in grads]  # (N, out_i)
        # d/d(x A_i^T), (N, r_i); a scaling every member shares (the usual case) goes into the GEMMs' alpha
        shared = len(set(scalings)) == 1
        s = scalings[0] if shared else 1.0
        parts = []
        for g, b_i, r, s_i in zip(gs, adapters_b, ranks, scalings):
            if g is None:  # an output nobody used: no gradient through its adapter
                parts.append(xa.new_zeros(xa.size(0), r))
            else:
                parts.append(g @ b_i if shared else (g @ b_i).mul_(s_i))
        g_xa = parts[0] if m == 1 else torch.cat(parts, dim=1)
        gx = None
        if ctx.needs_input_grad[0]:
            for g, weight in zip(gs, weights):
                if g is not None:
                    gx = g @ weight if gx is None else gx.addmm_(g, weight)
            gx = gx.addmm_(g_xa, a, alpha=s).view(ctx.x_shape)
        if any(need[4 * i + 2] and g is not None for i, g in enumerate(gs)):
            # (sum of r, in): member i's rows are its A's gradient
            if ctx.stash is not None:  # SwiGLUFunction's backward, which runs next, takes this silu(gate) too
                ctx.stash.silu = F.silu(gate)
                x2 = (ctx.stash.silu * up).reshape(-1, gate.size(-1))
            ga = (torch.mm(g_xa.t(), x2) if x2 is not None else torch.mm((g_xa * rstd).t(), x0).mul_(w_norm)).mul_(s)
            row = 0
            for i, r in enumerate(ranks):  # an unused output leaves its A without a gradient, as autograd would
                out[4 * i + 2] = ga[row:row + r] if need[4 * i + 2] and gs[i] is not None else None
                row += r
        col = 0
        for i, (g, r) in enumerate(zip(gs, ranks)):
            if g is not None:
                if need[4 * i]:
                    out[4 * i] = g.t() @ x2
                if need[4 * i + 1] and ctx.has_bias[i]:
                    out[4 * i + 1] = g.sum(0)
                if need[4 * i + 3]:  # (out, r), computed as its transpose: (r, N) @ (N, out) runs ~2x faster
                    out[4 * i + 3] = torch.mm(xa[:, col:col + r].t(), g).mul_(scalings[i]).t()
            col += r
        return (gx, None, *out)


def _plain_adapter(module, x) -> str | None:
    """The adapter a PEFT lora.Linear runs on x if that is plain LoRA, which LoraLinearFunction computes: one
    vanilla adapter, no dropout, not merged, a plain Linear base, one dtype, no autocast (its GEMMs would return
    bf16/fp16 and the in-place adds inside the function would mix dtypes). None otherwise."""
    if module.disable_adapters or module.merged or torch.is_autocast_enabled(x.device.type):
        return None
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    plain = (name not in module.lora_variant and isinstance(module.lora_dropout[name], nn.Identity)
             and type(module.base_layer) is nn.Linear and module.lora_B[name].bias is None
             and x.dtype == module.base_layer.weight.dtype == module.lora_A[name].weight.dtype)
    return name if plain else None


def _lora_params(module, name: str) -> tuple:
    return (module.base_layer.weight, module.base_layer.bias, module.lora_A[name].weight, module.lora_B[name].weight)


class SharedInputGroup:
    """LoRA Linears of one block that the model calls one after another on the same input: q, k, v; gate, up.

    The first member's call computes every member's output in one LoraLinearFunction and keeps the others'
    until their own calls, which receive them if their input is the very same tensor, unchanged (identity and
    version counter). Anything else (another input, another order, a member not plain) is computed alone, as
    without the group; a member called on another input turns the group off, since the model evidently does not
    feed them one input. Inside torch.compile (train.compile), and on inference tensors (no version counter),
    every member is computed alone.
    """

    def __init__(self, members: list):
        self.members = members
        self.active = True
        self._x: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[int, torch.Tensor] = {}  # index of a member -> its output for self._x

    def output(self, module, x) -> torch.Tensor | None:
        """module's output for x if the group computes it, else None (then the caller computes it alone)."""
        if not self.active or torch.compiler.is_compiling() or x.is_inference():
            return None
        i = next(j for j, m in enumerate(self.members) if m is module)
        if i == 0:
            names = [_plain_adapter(m, x) for m in self.members]
            if None in names:
                self._forget()
                return None
            params = [p for m, name in zip(self.members, names) for p in _lora_params(m, name)]
            outs = LoraLinearFunction.apply(x, tuple(float(m.scaling[n]) for m, n in zip(self.members, names)),
                                            *params)
            self._x, self._version, self._pending = x, x._version, dict(enumerate(outs[1:], 1))
            return outs[0]
        if self._x is None:  # the first member computed its output alone
            return None
        out = self._pending.pop(i, None) if self._x is x and x._version == self._version else None
        if out is None:  # not the input the first member was called on: the model does not share one input
            self.active = False
        if out is None or not self._pending:
            self._forget()
        return out

    def _forget(self) -> None:
        self._x, self._pending = None, {}


def _fused_lora_forward(self, x, *args, **kwargs):
    """PEFT lora.Linear.forward, through LoraLinearFunction in the plain case (``_plain_adapter``), together with
    the other members of its SharedInputGroup where it has one; anything else takes PEFT's own forward."""
    if not args and not kwargs:
        group = self.__dict__.get("_tunesmith_group")
        out = group.output(self, x) if group is not None else None  # (the group checks its members are plain)
        if out is not None:
            return out
        name = _plain_adapter(self, x)
        if name is not None:
            return LoraLinearFunction.apply(x, (float(self.scaling[name]),), *_lora_params(self, name))[0]
    return type(self).forward(self, x, *args, **kwargs)


# Sibling projections that decoder blocks call on one input, in the order they call them (Llama's attention and
# MLP, and the many models that copy them); SharedInputGroup checks at every call that the input is the same.
SHARED_INPUT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora(model) -> int:
    """Route every PEFT LoRA Linear of ``model`` through LoraLinearFunction, grouping the projections that read
    one input (SHARED_INPUT_PROJECTIONS); returns how many Linears."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_PROJECTIONS:
            members = [children[k] for k in names if type(children.get(k)) is LoraLinear]
            if len(members) > 1:
                group = SharedInputGroup(members)
                for member in members:
                    member._tunesmith_group = group
        for module in children.values():
            if type(module) is LoraLinear:
                module.forward = types.MethodType(_fused_lora_forward, module)
                n += 1
    return n


def fuse_for_training(model) -> dict[str, int]:
    """Every rewrite of the model's modules that ``train()`` makes, each computing the same numbers in fewer passes
    or less memory: LoRA inside the GEMMs (``fuse_lora``), Llama-formula RMSNorm and SwiGLU (fused_ops.py; the
    rotary embedding is swapped per forward, in ``_forward``). One list, so the benchmarks and tests that measure
    "tunesmith's step" run the step train() runs. Returns how many modules each rewrite took."""
    return {"lora": fuse_lora(model), "rmsnorm": fuse_rmsnorm(model), "swiglu": fuse_swiglu(model)}


# ---------------------------------------------------------------- torch.compile, one block at a time


def compile_blocks(model) -> int:
    """``torch.compile`` each transformer block in place (regional compilation); returns how many.

    The blocks are the classes the model names in ``_no_split_modules`` (its decoder layers): they share
    one code path, so inductor compiles once and reuses the kernels for every layer, and compiling in
    place keeps parameter names, the optimizer and checkpoints as they are. Shapes are dynamic because a
    packed row has a different length at every step. The per-example attention stays eager (a graph
    break); what compiles is the norms, rotary embedding, projections (LoRA included) and the MLP, whose
    elementwise work inductor fuses into fewer passes over memory.
    """
    inner = base_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)

