"""Packing without padding (``train.packing``): a micro-batch's examples run as one row, attention per example.

A packed micro-batch (data.collate_packed) is one row: position ids restart per example, and the example
boundaries travel to every attention call as a ``PackedRow`` keyword argument of the model's forward, which
transformers hands through its layers to the attention function (``model_forward`` makes it, and checks afterwards
that an attention kept the examples apart). So examples cannot see each other and no padding is computed at all.
transformers' own answer to a packed row with sdpa is one block-diagonal (T, T) mask over the whole row; on a CPU
that costs the full T_total^2 attention, so the per-example loop here is cheaper.

Answers that share a prompt (a preference pair, a group of sampled answers) can hold it once (data.collate_prefixed,
``row_layout`` "prefixed"): the row is prompt, first answer, then each further answer after a copy of the prompt's
last token, and ``PackedRow.shared`` gives every answer's attention its rows: the prompt's, then its own. Each such
sequence is attended exactly as it would be alone, so the saving is the prompt's projections and MLPs (most of a
layer's work), not its attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import base_model

PACKED_ATTENTION = "tunesmith_packed"

# Keys of a collated batch that the model's forward takes (the packed ones follow transformers'
# FlashAttention kwargs, so a flash_attention_2 model on a GPU runs a packed row natively).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")


@dataclass
class PackedRow:
    """The examples of one packed row, given to the model's forward as ``packed_row=``: their boundaries
    [0, n1, n1 + n2, ..., N] as Python ints (read from ``cu_seq_lens_q`` once per forward: reading a device tensor
    waits for the device, which would stall at every layer), whether the attention may use its kernel, and how many
    attention calls kept the examples apart."""
    bounds: tuple[int, ...]
    fused: bool = True  # train.kernels: the CPU flash kernel per example (PackedCausalAttention), else sdpa per example
    attention_calls: int = 0
    # answers sharing a prompt (data.collate_prefixed's attention_spans): per segment (s, p, b, e), the rows [s, p)
    # then [b, e) attend causally as one sequence; None: every segment [s, e) of ``bounds`` is one sequence
    shared: tuple[tuple[int, int, int, int], ...] | None = None

    def spans(self) -> tuple[tuple[int, int, int, int], ...]:
        """(s, p, b, e) per segment: its attention runs over rows [s, p) + [b, e); it outputs rows [b, e), and [s, p)
        too when p == b (a plain example, or the first answer of a shared prompt, which holds the prompt)."""
        if self.shared is not None:
            return self.shared
        return tuple((s, s, s, e) for s, e in zip(self.bounds[:-1], self.bounds[1:]))

    def longest(self) -> int:
        return max(p - s + e - b for s, p, b, e in self.spans())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs of a collated batch: ids, mask, and the packed-row boundaries when present."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def model_forward(model, batch: dict, fused: bool = True, **kw):
    """model(batch), with a packed row's boundaries passed to its attention, and a guard: a packed row must be split
    per example by the attention, or it is an error (silently attending across examples is the failure that matters).
    ``fused`` (train.kernels): on a CPU the attention runs ``PackedCausalAttention``, else sdpa per example."""
    if batch.get("cu_seq_lens_q") is None:
        return model(**model_inputs(batch), use_cache=False, **kw)
    impl = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) or ""
    if impl.startswith("flash_attention"):  # varlen kernels: boundaries and longest example, no mask
        if batch.get("attention_spans") is not None:
            raise RuntimeError("a batch with shared prompts (data.collate_prefixed) reached a FlashAttention model, whose "
                               "varlen kernel would cut each answer off its prompt: collate it packed (row_layout)")
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "attention_mask"}
        longest = int((batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).max())
        return model(**inputs, max_length_q=longest, max_length_k=longest, use_cache=False, **kw)
    if impl != PACKED_ATTENTION:
        raise RuntimeError("a packed batch reached a model without per-example attention: call "
                           "packing.enable_packing(model) first, or set train.packing: false")
    spans = batch.get("attention_spans")
    row = PackedRow(tuple(batch["cu_seq_lens_q"].tolist()), fused,
                    shared=None if spans is None else tuple(map(tuple, spans.tolist())))
    out = model(**model_inputs(batch), packed_row=row, use_cache=False, **kw)
    if row.attention_calls == 0:
        raise RuntimeError(f"packed batch: the {type(base_model(model)).__name__} attention never saw the example "
                           "boundaries; set train.packing: false for this model")
    return out


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_flash_applies(query, key, value, dropout: float, kwargs: dict) -> bool:
    """Whether ``PackedCausalAttention`` computes what sdpa would: a CPU tensor, no dropout, none of the extras
    (logit soft-capping, attention sinks, a position bias, a paged cache) that sdpa_attention_forward handles."""
    return (_FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None and query.device.type == "cpu" and not dropout
            and query.dtype == key.dtype == value.dtype and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and query.size(-1) == key.size(-1) == value.size(-1) and query.size(1) % key.size(1) == 0
            and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias", "cache"))
            and not kwargs.get("output_attentions"))


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each example of a packed row, on the CPU: the same flash kernel sdpa calls per
    example (so the same numbers, bit for bit), without autograd's per-slice bookkeeping. ``spans``
    (``PackedRow.spans``): an answer after a shared prompt is one more call, on the prompt's rows and its own joined,
    of which it keeps its own outputs; the prompt's keys and values sum the gradients of all its answers.

    Slicing the row per example and concatenating the outputs (the loop in ``packed_attention_forward``) makes
    autograd's backward allocate a zero-filled, full-row gradient for every slice of q, k and v and add them up, and
    copy the outputs once more in ``cat``: about 0.2 of the attention's time at the benchmark's lengths. Here the
    forward writes each example's output into one (1, T, H, D) tensor and the backward writes each example's
    gradients into their rows of three preallocated tensors. GQA (fewer key/value heads) is the kernel's own.

    Measured and not done: the kernel's backward gains only 1.3x from a second thread (it splits the work by
    head), and running different examples on single-threaded worker threads is 0.70x the loop's time alone,
    but inside a training step it gained nothing, because the OpenMP threads of the step's matmuls spin ~3 ms
    waiting for more work and take a core from the workers; with libgomp's spin shortened (GOMP_SPINCOUNT,
    read only at process start) the job gained 0.5-1.5%, within this machine's run-to-run noise.
    """

    @staticmethod
    def forward(ctx, query, key, value, spans: tuple, scale: float):  # (1, H, T, D), (1, Hkv, T, D) x 2
        b, h, t, d = query.shape
        out = query.new_empty(b, t, h, d)
        lses = []
        for s, p, first, e in spans:
            o, lse = _FLASH_CPU(*(joined_rows(x, s, p, first, e) for x in (query, key, value)), 0.0, True, scale=scale)
            if first == p:  # the whole segment is this sequence
                out[:, s:e] = o.transpose(1, 2)
            else:  # an answer after a shared prompt: its own rows only (the prompt's are the first answer's)
                out[:, first:e] = o[:, :, p - s:].transpose(1, 2)
            lses.append(lse)
        # the output is saved once, as the tensor returned (the next projection saves the same one): the kernel's
        # backward reads each example's rows through a (1, H, L, D) view of it, bit-identical to its own copy
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (1, T, H, D)
        query, key, value, out, *lses = ctx.saved_tensors
        # (1, heads, T, D) views of (1, T, heads, D) memory, the layout the projections' outputs had
        gq = query.new_empty(query.size(0), query.size(2), query.size(1), query.size(3)).transpose(1, 2)
        gk = key.new_empty(key.size(0), key.size(2), key.size(1), key.size(3)).transpose(1, 2)
        gv = torch.empty_like(gk)
        # bf16 (mixed precision): the kernel's bf16 backward is 1.6x slower than its fp32 one at these lengths (measured:
        # 459 against 287 ms a LoRA step of the built-in model), so each example's slices are taken to fp32 for it
        f = (lambda t: t.float()) if query.dtype in (torch.bfloat16, torch.float16) else (lambda t: t)
        grad_t, out_t = grad_out.transpose(1, 2), out.transpose(1, 2)  # (1, H, T, D) views
        for i, (s, p, first, e) in enumerate(ctx.spans):
            if first == p:
                g = grad_t[:, :, s:e]
            else:  # the prompt rows' outputs belong to the first answer: no gradient through this sequence's copy
                g = torch.cat((grad_t.new_zeros(grad_t.size(0), grad_t.size(1), p - s, grad_t.size(3)),
                               grad_t[:, :, first:e]), dim=2)
            # rows with no gradient add nothing whatever their output (dS = P * (dO V^T - rowsum(dO * O)) = 0), so the
            # first answer's prompt outputs stand in for this sequence's identical ones
            dq, dk, dv = _FLASH_CPU_BACKWARD(f(g), *(f(joined_rows(x, s, p, first, e)) for x in (query, key, value, out_t)),
                                             lses[i], 0.0, True, scale=ctx.scale)
            if first == p:
                gq[:, :, s:e] = dq
                gk[:, :, s:e] = dk
                gv[:, :, s:e] = dv
            else:  # the shared prompt's keys and values collect the gradient of every answer attending to them
                n = p - s
                gq[:, :, first:e] = dq[:, :, n:]
                gk[:, :, s:p] += dk[:, :, :n]
                gk[:, :, first:e] = dk[:, :, n:]
                gv[:, :, s:p] += dv[:, :, :n]
                gv[:, :, first:e] = dv[:, :, n:]
        return gq, gk, gv, None, None


def joined_rows(x: torch.Tensor, s: int, p: int, first: int, e: int) -> torch.Tensor:
    """Rows [s, p) then [first, e) of x (1, heads, T, D) along T: one sequence of a packed row (``PackedRow.spans``); a
    view where they are contiguous."""
    if first == p:
        return x[:, :, s:e]
    if p == s:
        return x[:, :, first:e]
    return torch.cat((x[:, :, s:p], x[:, :, first:e]), dim=2)


@torch.compiler.disable  # the loop over examples is Python; compiled blocks (train.compile) break the graph here
def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, packed_row: PackedRow | None = None, **kwargs):
    """sdpa, except on a packed row (``packed_row``, or transformers' ``cu_seq_lens_q``): causal attention within each of
    its examples.

    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D), like transformers' sdpa_attention_forward.
    On a CPU ``PackedCausalAttention`` calls the flash kernel sdpa would call, per example; elsewhere (or with
    dropout, soft-capping, ...) sdpa_attention_forward does the work for every segment, so the numbers are its own.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_row is None and kwargs.get("cu_seq_lens_q") is not None:  # a direct call with transformers' packed-row
        packed_row = PackedRow(tuple(kwargs["cu_seq_lens_q"].tolist()))  # arguments (model_forward reads them once)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("cu_seq_lens")}
    if packed_row is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.pop("sliding_window", None)
    if window is not None and packed_row.longest() > window:  # the per-example kernels below are plain causal
        raise ValueError(f"train.packing: an example of {packed_row.longest()} tokens is longer than this model's "
                         f"attention window ({window}); set train.packing: false (padded batches use the model's "
                         "sliding-window mask) or data.max_length <= the window")
    packed_row.attention_calls += 1
    spans = packed_row.spans()
    if packed_row.fused and cpu_flash_applies(query, key, value, dropout, kwargs):
        scale = scaling if scaling is not None else query.size(-1) ** -0.5
        return PackedCausalAttention.apply(query, key, value, spans, float(scale)), None
    outs = []
    for s, p, first, e in spans:
        o = sdpa_attention_forward(module, *(joined_rows(x, s, p, first, e) for x in (query, key, value)), None,
                                   dropout=dropout, scaling=scaling, is_causal=True)[0]  # (1, L, H, D)
        outs.append(o if first == p else o[:, p - s:])  # an answer after a shared prompt: its own rows
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


def row_layout(model) -> str:
    """How an objective lays out a micro-batch for ``model`` (``Objective.collate``'s ``layout``): "padded" (collate),
    "packed" (collate_packed: one row, attention per example) or "prefixed" (packed, and answers sharing a prompt hold
    it once: collate_prefixed), which needs the attention function here (a FlashAttention model's varlen kernel
    cannot let two answers see one prompt without seeing each other)."""
    if not packs(model):
        return "padded"
    impl = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None)
    return "prefixed" if impl == PACKED_ATTENTION else "packed"
