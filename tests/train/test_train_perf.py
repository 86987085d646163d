"""The fast training paths compute the same numbers as the plain ones.

- the loss at target positions only (logits_to_keep) and the fused output-layer cross-entropy equal full
  (B, T, V) logits + cross-entropy, loss and gradients, for full fine-tuning, LoRA, a bias and several chunks;
- a packed row (no padding, attention per example) gives each example the loss it has alone, and an
  example cannot see the others; with gradient checkpointing too;
- length-grouped batching is a seeded permutation that depends only on (seed, epoch) and cuts padding;
- RMSNorm and the rotary embedding in fewer passes give transformers' numbers, and its code where they don't apply.
- fused LoRA (PEFT's loss and gradients), with the projections that share an input computed together where the
  model does feed them one input, and alone where it does not.
"""

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama as llama

from tunesmith.config import MethodConfig, load_config
from tunesmith.data import RenderedExample, collate, collate_packed
from tunesmith.models import adapt
from tunesmith.testing import assert_close_scaled, tiny_model
from tunesmith.train import train
from tunesmith.train import fused_ops
from tunesmith.train.fused_ops import RMSNormFunction, SwiGLUFunction, fuse_rmsnorm, fuse_swiglu, fused_rotary
from tunesmith.train.perf import (IGNORE, base_model, compile_blocks, enable_packing, fuse_lora, fused_head, head_loss,
                                  linear_cross_entropy, packs, plain_loss, shifted_targets)
from tunesmith.train.steps import epoch_order, length_grouped_order


def _examples(tok, lengths, seed=0, prompt_frac=0.5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
        k = int(n * prompt_frac)
        out.append(RenderedExample(ids, [IGNORE] * k + ids[k:], origin=None))
    return out


def _record_calls(monkeypatch, fn_class) -> list[tuple]:
    """The arguments of every ``fn_class.apply`` call from here on (an autograd Function), in order."""
    calls = []
    real = fn_class.apply
    monkeypatch.setattr(fn_class, "apply", lambda *a: calls.append(a) or real(*a))
    return calls


def _members(calls) -> list[int]:
    """How many LoRA Linears each recorded LoraLinearFunction call computed (x, scalings, then 4 per member)."""
    return [len(a[2:]) // 4 for a in calls]


def _loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss, n, correct = fn(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, correct, grads


def _assert_same(a, b, rtol=None):
    """Loss, target count, hits and every gradient of two computations agree: the counts exactly, the float tensors to
    rounding of their scale (assert_close_scaled: SCALED_RTOL of the dtype unless ``rtol`` is given)."""
    assert a[1:3] == b[1:3]
    assert_close_scaled(torch.tensor(a[0]), torch.tensor(b[0]), rtol, msg="loss")
    assert a[3].keys() == b[3].keys() and a[3]
    for k in a[3]:
        assert_close_scaled(a[3][k], b[3][k], rtol, msg=k)


# ---------------------------------------------------------------- loss at target positions, fused head


def test_shifted_targets_pair_each_kept_position_with_its_next_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, IGNORE, IGNORE]])
    keep, targets = shifted_targets(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("fused", [True, False])
def test_target_only_loss_equals_full_logits_loss(tok, method, fused):
    exs = _examples(tok, [9, 14, 5, 11])
    batch = collate(exs, tok.pad_token_id)
    model, _ = adapt(tiny_model(tok, seed=2), MethodConfig(name=method, lora={"r": 4, "dropout": 0.0}))
    assert fused_head(model) is not None  # llama is allow-listed, through the PEFT wrapper too
    plain = _loss_and_grads(model, plain_loss, batch)
    fast = _loss_and_grads(model, lambda m, b: head_loss(m, b, fused=fused), batch)
    _assert_same(fast, plain)
    if method == "full":
        assert "lm_head.weight" in plain[3] or "model.embed_tokens.weight" in plain[3]  # the tied head trains


def test_fused_cross_entropy_matches_torch_over_chunks_with_bias():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    loss, correct = linear_cross_entropy(h, w, b, y, chunk_rows=8)  # 5 chunks, the last one short
    (loss * 0.37).backward()  # a scale, as backward_step applies one
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    logits = F.linear(h, w, b)
    ref = F.cross_entropy(logits, y, reduction="sum")
    (ref * 0.37).backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert int(correct) == int((logits.argmax(-1) == y).sum())
    for a, t in zip(got, (h, w, b)):
        assert_close_scaled(a, t.grad)


def test_fused_cross_entropy_without_gradients_and_without_targets():
    h, w = torch.randn(6, 8), torch.randn(20, 8)
    with torch.no_grad():  # evaluation: loss only
        loss, _ = linear_cross_entropy(h, w, None, torch.arange(6))
    assert float(loss) == pytest.approx(float(F.cross_entropy(h @ w.t(), torch.arange(6), reduction="sum")), rel=1e-6)
    h0 = torch.zeros(0, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(h0, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()  # a micro-batch with no target still backpropagates (DDP needs every rank's pass)
    assert float(loss) == 0.0 and int(correct) == 0 and h0.grad.shape == (0, 8)


def test_an_architecture_not_allow_listed_takes_the_exact_unfused_path(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert fused_head(model) is None
    batch = collate(_examples(tok, [8, 13, 6]), tok.pad_token_id)
    _assert_same(_loss_and_grads(model, head_loss, batch), _loss_and_grads(model, plain_loss, batch))


def _lora_model(tok, dropout=0.0):
    model, _ = adapt(tiny_model(tok, seed=2), MethodConfig(name="lora", lora={"r": 4, "dropout": dropout}))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give it values so the adapter path carries gradient to A and x
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_fused_lora_equals_peft_loss_and_gradients(tok):
    batch = collate(_examples(tok, [9, 14, 6]), tok.pad_token_id)
    ref = _loss_and_grads(_lora_model(tok), head_loss, batch)
    model = _lora_model(tok)
    assert fuse_lora(model) == 14  # 7 projections x 2 blocks
    fused = _loss_and_grads(model, head_loss, batch)
    _assert_same(fused, ref)
    assert any("lora_A" in k for k in fused[3]) and any("lora_B" in k for k in fused[3])


def test_fused_lora_runs_projections_that_share_an_input_together(tok, monkeypatch):
    """q, k, v (and gate, up) read one input: one function call computes them, in the forward and again in
    gradient checkpointing's recomputation; o and down are alone. Loss and gradients stay PEFT's."""
    from tunesmith.train import perf

    batch = collate_packed(_examples(tok, [9, 14, 6]))
    ref_model = _lora_model(tok)
    enable_packing(ref_model)
    ref = _loss_and_grads(ref_model, head_loss, batch)
    for checkpointing in (False, True):
        model = _lora_model(tok)
        enable_packing(model)
        fuse_lora(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        with monkeypatch.context() as mp:
            calls = _record_calls(mp, perf.LoraLinearFunction)
            fused = _loss_and_grads(model, head_loss, batch)
        assert _members(calls) == [3, 1, 2, 1] * 2 * (2 if checkpointing else 1)  # per block: q/k/v, o, gate/up, down
        _assert_same(fused, ref)


def test_fused_lora_group_with_other_ranks_and_scalings_and_an_unused_output(tok):
    """Members of a group may differ in rank and scaling (PEFT's rank_pattern/alpha_pattern), and an output the
    model never reads gets no gradient through it; A and B gradients equal PEFT's forward + autograd."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.train.perf import fuse_lora

    def build():
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"],
                         rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
        model = get_peft_model(tiny_model(tok, seed=4), cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        return model

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        model = build()
        attn = base_model(model).model.layers[0].self_attn
        if fused:
            assert fuse_lora(model) == 6
            assert attn.q_proj._tunesmith_group is attn.k_proj._tunesmith_group
        xi = x.clone().requires_grad_(True)
        q, k = attn.q_proj(xi), attn.k_proj(xi)  # v_proj's output is never asked for
        ((q ** 2).sum() + (k * 0.5).sum()).backward()
        results.append((q.detach(), k.detach(), xi.grad, {n: p.grad for n, p in attn.named_parameters()
                                                         if p.grad is not None}))
    (q0, k0, gx0, g0), (q1, k1, gx1, g1) = results
    assert_close_scaled(q1, q0)
    assert_close_scaled(k1, k0)
    assert_close_scaled(gx1, gx0)
    assert g1.keys() == g0.keys() and not any("v_proj" in n for n in g0)
    for n in g0:
        assert_close_scaled(g1[n], g0[n], msg=n)


def test_fused_lora_group_turns_off_when_the_model_feeds_members_other_inputs(tok, monkeypatch):
    """A model whose k and v read another tensor than q (cross-attention, say): each is computed on its own
    input, correctly, and the group stops computing ahead after the first mismatch."""
    from tunesmith.train import perf

    model = _lora_model(tok)
    fuse_lora(model)
    attn = base_model(model).model.layers[0].self_attn
    x, other = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    ref_k = type(attn.k_proj).forward(attn.k_proj, other)
    attn.q_proj(x)
    assert_close_scaled(attn.k_proj(other), ref_k)
    assert not attn.q_proj._tunesmith_group.active
    with monkeypatch.context() as mp:
        calls = _record_calls(mp, perf.LoraLinearFunction)
        attn.q_proj(x), attn.k_proj(other)
    assert _members(calls) == [1, 1]


def test_fused_lora_after_a_fused_norm_keeps_the_norm_input_not_its_output(tok):
    """The q/k/v and gate/up projections read an RMSNorm's output: for backward they keep what the norm keeps (its
    input and 1/rms) instead of that output, so no norm output is among the saved tensors; gradients unchanged."""
    from tunesmith.train.fused_ops import normed_from

    batch = collate_packed(_examples(tok, [9, 14, 6]))
    model = _lora_model(tok)
    enable_packing(model)
    fuse_lora(model)
    assert fuse_rmsnorm(model) == 5
    outputs, saved = [], []
    inner = base_model(model).model
    for layer in inner.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _, _ = head_loss(model, batch)
    assert len(outputs) == 4 and all(normed_from(o) is not None for o in outputs)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert not any(o.untyped_storage().data_ptr() in ptrs for o in outputs)
    loss.backward()  # the equality of these gradients with PEFT's: test_model_with_fused_norms_and_rotary_...


def test_fused_lora_down_projection_keeps_gate_and_up_not_the_swiglu_product(tok, monkeypatch):
    """The MLP's down projection reads silu(gate) * up: for backward it keeps gate and up (SwiGLUFunction keeps them
    anyway) and computes the product again for its A gradient, handing silu(gate) on to SwiGLUFunction's backward.
    No product is among the saved tensors, and every gradient is bit for bit what keeping the product gives."""
    from tunesmith.train import perf
    from tunesmith.train.fused_ops import SiluStash

    batch = collate_packed(_examples(tok, [9, 14, 6]))
    grads = []
    for recompute in (False, True):
        model = _lora_model(tok)
        enable_packing(model)
        fuse_lora(model)
        assert fuse_swiglu(model) == 2
        products, saved, taken = [], [], []
        for layer in base_model(model).model.layers:
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: products.append(args[0]))
        with monkeypatch.context() as mp:
            if not recompute:  # the down projection does not see where its input came from: it keeps it
                mp.setattr(perf, "swiglu_from", lambda y: None)
            real = SiluStash.take
            mp.setattr(SiluStash, "take", lambda self: taken.append(self.silu is not None) or real(self))
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                loss, _, _ = head_loss(model, batch)
            loss.backward()
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        assert len(products) == 2 and all((p.untyped_storage().data_ptr() in ptrs) != recompute for p in products)
        assert taken == [recompute] * 2  # silu(gate) handed on only where the product was computed again
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("down_proj.lora_A" in n for n in grads[0])
    assert all(torch.equal(grads[1][n], grads[0][n]) for n in grads[0])


def test_fused_lora_on_a_norm_output_changed_in_place_keeps_that_output(tok):
    """A norm output modified in place after the norm is no longer what the norm computed: the projection keeps
    the tensor itself, and its gradients are those of the modified input (as for a copy, which is no norm output)."""
    from tunesmith.train.fused_ops import normed_from

    grads = []
    for in_place in (False, True):
        model = _lora_model(tok)
        fuse_lora(model)
        fuse_rmsnorm(model)
        layer = base_model(model).model.layers[1]
        x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = layer.input_layernorm(x)
        assert normed_from(y) is not None
        y = y.mul_(2.0) if in_place else y.clone().mul_(2.0)
        assert normed_from(y) is None
        (layer.self_attn.q_proj(y) ** 2).sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters() if p.grad is not None} | {"x": x.grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3
    for n in grads[0]:
        assert_close_scaled(grads[1][n], grads[0][n], msg=n)


def test_fused_lora_leaves_dropout_to_peft(tok, monkeypatch):
    from tunesmith.train.perf import LoraLinearFunction

    model = _lora_model(tok, dropout=0.1)
    fuse_lora(model)
    calls = _record_calls(monkeypatch, LoraLinearFunction)
    head_loss(model, collate(_examples(tok, [8]), tok.pad_token_id))
    assert calls == []  # dropout on the adapter input: PEFT's own forward


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                    reason="torch.compile on CPU needs a C++ compiler (train.compile refuses with C009 without one)")
def test_fused_lora_leaves_autocast_to_peft(tok, monkeypatch):
    """Under autocast (bf16 mixed precision) the fused GEMMs would mix dtypes: PEFT's own forward runs instead."""
    from tunesmith.train import perf

    def refuse(*args):
        raise AssertionError("the fused LoRA function ran under autocast")

    model = _lora_model(tok)
    fuse_lora(model)
    monkeypatch.setattr(perf.LoraLinearFunction, "apply", refuse)
    batch = collate(_examples(tok, [8, 5]), tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n, _ = head_loss(model, batch)
    loss.backward()
    assert n > 0 and torch.isfinite(loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)


def test_compiled_blocks_give_the_eager_loss_and_gradients_on_packed_rows(tok):
    """train.compile: each decoder layer through inductor, the per-example attention left eager; two packed
    rows of different lengths (dynamic shapes, no recompile per length)."""
    eager, compiled = _lora_model(tok), _lora_model(tok)
    for m in (eager, compiled):
        enable_packing(m)
        fuse_lora(m)
    assert compile_blocks(compiled) == 2
    from torch._dynamo.utils import counters

    counters.clear()
    for lengths in ([9, 14, 6], [11, 5, 8, 7]):
        batch = collate_packed(_examples(tok, lengths))
        _assert_same(_loss_and_grads(compiled, head_loss, batch), _loss_and_grads(eager, head_loss, batch))  # inductor fuses and reorders float sums: rounding only
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile (forward graphs before/after the attention)


# ---------------------------------------------------------------- packing


def _per_example_losses(model, exs, pad_id):
    return [float(head_loss(model, collate([e], pad_id))[0]) for e in exs]


def test_packed_row_gives_each_example_its_own_loss(tok):
    exs = _examples(tok, [7, 19, 4, 12, 9])
    model = tiny_model(tok, seed=1)
    assert enable_packing(model) and packs(model)
    alone = _per_example_losses(model, exs, tok.pad_token_id)
    packed = collate_packed(exs)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in exs))  # no padding at all
    assert packed["position_ids"][0, :7].tolist() == list(range(7)) and packed["position_ids"][0, 7] == 0
    loss, n, _ = head_loss(model, packed)
    padded_loss, padded_n, _ = head_loss(model, collate(exs, tok.pad_token_id))
    assert n == padded_n == sum(e.n_targets for e in exs)
    assert float(loss) == pytest.approx(sum(alone), rel=1e-5)
    assert float(loss) == pytest.approx(float(padded_loss), rel=1e-5)


def test_packed_examples_cannot_attend_to_each_other(tok):
    """Change every token of example 0: the per-token losses of the examples after it do not move."""
    exs = _examples(tok, [10, 8, 12])
    changed = [_examples(tok, [10], seed=99)[0]] + exs[1:]
    model = tiny_model(tok, seed=1)
    enable_packing(model)

    def token_losses(examples):
        batch = collate_packed(examples)
        with torch.no_grad():
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q",
                                                    "cu_seq_lens_k")}).logits[0, :-1]
        return F.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")

    a, b = token_losses(exs), token_losses(changed)
    assert_close_scaled(a[10:], b[10:])
    assert not torch.allclose(a[:9], b[:9])


def test_packed_gradients_equal_padded_with_and_without_checkpointing(tok):
    exs = _examples(tok, [6, 15, 9, 11])
    ref_model, _ = adapt(tiny_model(tok, seed=4), MethodConfig(name="full"))
    ref = _loss_and_grads(ref_model, head_loss, collate(exs, tok.pad_token_id))
    for checkpointing in (False, True):
        model, _ = adapt(tiny_model(tok, seed=4), MethodConfig(name="full"))
        enable_packing(model)
        if checkpointing:  # the recomputation in backward must split the row per example too
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        _assert_same(_loss_and_grads(model, head_loss, collate_packed(exs)), ref)


def _packed_qkv(lengths, heads=6, kv_heads=2, d=16, seed=0):
    """q (1, H, T, D), k and v (1, Hkv, T, D) as the model makes them: transposed views of one projection output."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    x = torch.randn(1, t, (heads + 2 * kv_heads) * d, generator=g, requires_grad=True)
    q, k, v = x.split([heads * d, kv_heads * d, kv_heads * d], -1)
    views = [y.view(1, t, -1, d).transpose(1, 2) for y in (q, k, v)]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return x, views, bounds


def test_packed_cpu_attention_is_sdpa_per_example_bit_for_bit():
    """PackedCausalAttention (the flash kernel called per example, gradients written in place) against sdpa run
    on each example alone, GQA, one-token examples included: outputs and input gradients identical."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunesmith.train.perf import PackedCausalAttention

    lengths = [1, 17, 5, 40, 1, 9]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = torch.randn(1, sum(lengths), 6, 16, generator=torch.Generator().manual_seed(1))

    x1, (q, k, v), bounds = _packed_qkv(lengths)
    ref = torch.cat([sdpa_attention_forward(module, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, scaling=0.25,
                                            is_causal=True)[0] for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
    ref.backward(g)
    x2, (q, k, v), _ = _packed_qkv(lengths)
    out = PackedCausalAttention.apply(q, k, v, tuple(bounds), 0.25)
    out.backward(g)
    assert out.shape == ref.shape == (1, sum(lengths), 6, 16)
    assert torch.equal(out, ref) and torch.equal(x1.grad, x2.grad)


def test_packed_attention_takes_the_cpu_kernel_path_in_the_model_and_the_sdpa_loop_with_dropout(tok, monkeypatch):
    from tunesmith.train import perf

    exs = _examples(tok, [7, 12, 5])
    calls = _record_calls(monkeypatch, perf.PackedCausalAttention)
    model = tiny_model(tok, seed=1)
    enable_packing(model)
    model.train()
    fast = _loss_and_grads(model, head_loss, collate_packed(exs))
    assert len(calls) == model.config.num_hidden_layers
    assert not perf._cpu_flash_applies(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8),
                                       0.1, {})
    assert not perf._cpu_flash_applies(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8),
                                       0.0, {"softcap": 30.0})
    monkeypatch.setattr(perf, "_cpu_flash_applies", lambda *a: False)  # the per-example sdpa loop
    _assert_same(_loss_and_grads(model, head_loss, collate_packed(exs)), fast)
    assert len(calls) == model.config.num_hidden_layers


def test_a_packed_batch_is_refused_by_a_model_without_per_example_attention(tok):
    model = tiny_model(tok, seed=1)  # enable_packing not called: plain sdpa would attend across examples
    with pytest.raises(RuntimeError, match="packed"):
        head_loss(model, collate_packed(_examples(tok, [5, 6])))


# ---------------------------------------------------------------- length-grouped batching


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(10, 500, (203,), generator=g).tolist()
    a = length_grouped_order(lengths, micro=8, seed=1, epoch=0, shuffle=True, window=8)
    assert a == length_grouped_order(lengths, micro=8, seed=1, epoch=0, shuffle=True, window=8)  # resume-safe
    assert sorted(a) == list(range(203))
    assert a != length_grouped_order(lengths, micro=8, seed=1, epoch=1, shuffle=True, window=8)  # new each epoch

    def padded(order):
        return sum(8 * max(lengths[i] for i in order[s:s + 8]) for s in range(0, len(order), 8))

    random_order = epoch_order(203, 1, 0, True)
    assert padded(a) < 0.75 * padded(random_order)
    assert len(set(a[-3:]) & set(a[:200])) == 0  # 203 = 25 x 8 + 3: the short micro-batch is the last one


# ---------------------------------------------------------------- the loop


def _cfg(tmp_path, tiny_model_dir, tiny_data, *overrides):
    train_f, valid_f = tiny_data
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                              f"output_dir={tmp_path / 'run'}", "data.max_length=64", "train.batch_size=4",
                              "train.max_steps=3", "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=3",
                              "eval.samples=0", "eval.metric_examples=0", "eval.compare_base=false",
                              "method.lora.r=4", "method.lora.dropout=0.0", *overrides])


def _losses(run_dir):
    return [e["loss"] for e in map(json.loads, open(run_dir / "metrics.jsonl")) if e["kind"] == "train"]


def test_training_with_and_without_packing_gives_the_same_losses(tmp_path, tiny_model_dir, tiny_data):
    on = train(_cfg(tmp_path / "on", tiny_model_dir, tiny_data, "train.packing=true"), quiet=True)
    off = train(_cfg(tmp_path / "off", tiny_model_dir, tiny_data, "train.packing=false"), quiet=True)
    assert _losses(on.output_dir) == pytest.approx(_losses(off.output_dir), rel=1e-5)
    assert on.best_val_loss == pytest.approx(off.best_val_loss, rel=1e-5)


def test_group_by_length_run_resumes_to_the_same_losses(tmp_path, tiny_model_dir, tiny_data):
    over = ["train.group_by_length=true", "train.packing=false", "train.max_steps=4", "eval.every_steps=4",
            "checkpoint.every_steps=4"]
    straight = train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, *over), quiet=True)
    calls = iter(range(100))
    cfg = _cfg(tmp_path / "b", tiny_model_dir, tiny_data, *over)
    first = train(cfg, quiet=True, stop_requested=lambda: next(calls) >= 1)
    assert first.status == "interrupted"
    second = train(cfg, resume=True, quiet=True)
    assert _losses(second.output_dir) == _losses(straight.output_dir)


# ---------------------------------------------------------------- RMSNorm and rotary embedding (fused_ops.py)


def _close(a, b):
    assert_close_scaled(a, b)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_rmsnorm_function_equals_llama_rmsnorm_values_and_gradients(weight_trains):
    torch.manual_seed(0)
    norm = llama.LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_trains)
    x = (torch.randn(2, 7, 48) * 3).requires_grad_()
    g = torch.randn(2, 7, 48)
    ref = norm(x)
    ref.backward(g)
    ref_grads = x.grad.clone(), norm.weight.grad.clone() if weight_trains else None
    x.grad, norm.weight.grad = None, None
    out, _ = RMSNormFunction.apply(x, norm.weight, 1e-5)
    out.backward(g)
    _close(out, ref)
    _close(x.grad, ref_grads[0])
    if weight_trains:
        _close(norm.weight.grad, ref_grads[1])
    else:
        assert norm.weight.grad is None


def test_fused_rotary_equals_transformers_and_restores_the_module_function():
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    original = llama.apply_rotary_pos_emb
    # HF's layout: (B, T, H, D) projections viewed as (B, H, T, D); cos/sin (B, T, D) from the rotary module
    q = torch.randn(1, 11, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 11, 2, 8).transpose(1, 2).requires_grad_()
    cos, sin = model.model.rotary_emb(q, torch.arange(11)[None])
    gq, gk = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8)
    ref = original(q, k, cos, sin)
    torch.autograd.backward(ref, [gq, gk])
    ref_grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    with fused_rotary(model):
        fused_fn = llama.apply_rotary_pos_emb
        assert fused_fn is not original
        out = fused_fn(q, k, cos, sin)
    assert llama.apply_rotary_pos_emb is original
    torch.autograd.backward(out, [gq, gk])
    for a, b in zip(out, ref):
        _close(a, b)
    _close(q.grad, ref_grads[0])
    _close(k.grad, ref_grads[1])
    # bf16 falls back to transformers' own function: identical bits
    qb, kb = q.detach().bfloat16(), k.detach().bfloat16()
    assert all(torch.equal(a, b) for a, b in zip(fused_fn(qb, kb, cos.bfloat16(), sin.bfloat16()),
                                                  original(qb, kb, cos.bfloat16(), sin.bfloat16())))


def test_fused_rotary_restores_the_module_function_after_an_error():
    model = tiny_model(seed=0)
    original = llama.apply_rotary_pos_emb
    with pytest.raises(RuntimeError), fused_rotary(model):
        raise RuntimeError("boom")
    assert llama.apply_rotary_pos_emb is original


@pytest.mark.parametrize("method,checkpointing", [("full", False), ("lora", False), ("lora", True)])
def test_model_with_fused_norms_and_rotary_gives_the_same_loss_and_gradients(tok, method, checkpointing):
    """The whole training forward/backward (packed rows, fused LoRA, fused head) with and without them; with
    gradient checkpointing, the recomputation in backward runs them again."""
    batch = collate_packed(_examples(tok, [9, 14, 6]))

    def build(fused):
        model, _ = adapt(tiny_model(tok, seed=3), MethodConfig(name=method, lora={"r": 4, "dropout": 0.0}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        enable_packing(model)
        fuse_lora(model)
        if fused:
            assert fuse_rmsnorm(model) == 2 * 2 + 1  # two per block, and the final norm
            assert fuse_swiglu(model) == 2  # one MLP per block
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        return model

    def plain_rotary(model, b):  # head_loss with the rotary swap turned off for this model
        name = type(base_model(model)).__module__
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(fused_ops._FUSED_ROTARY, name, None)
            return head_loss(model, b)

    real = llama.apply_rotary_pos_emb
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_calls(mp, fused_ops.RotaryFunction)
        ref = _loss_and_grads(build(False), plain_rotary, batch)
        assert calls == []
        fused = _loss_and_grads(build(True), head_loss, batch)
    assert llama.apply_rotary_pos_emb is real
    # q and k in each block; checkpointing's recomputation runs in backward, outside the forward's swap, so it
    # takes transformers' own function (values equal to rounding, which the recomputation tolerates)
    assert len(calls) == 2 * 2
    _assert_same(fused, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_equals_autograd_bit_for_bit_and_keeps_two_tensors_not_three(dtype):
    g = torch.Generator().manual_seed(0)
    gate0, up0 = torch.randn(2, 7, 24, generator=g, dtype=dtype), torch.randn(2, 7, 24, generator=g, dtype=dtype)
    grad = torch.randn(2, 7, 24, generator=g, dtype=dtype)
    results = []
    for fused in (False, True):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = SwiGLUFunction.apply(gate, up) if fused else F.silu(gate) * up
        out.backward(grad)
        results.append((out, gate.grad, up.grad, saved))
    (out, d_gate, d_up, saved_plain), (fused_out, fused_d_gate, fused_d_up, saved_fused) = results
    assert torch.equal(fused_out, out) and torch.equal(fused_d_gate, d_gate) and torch.equal(fused_d_up, d_up)
    assert len(saved_plain) == 3 and len(saved_fused) == 2  # gate, up (autograd also keeps silu(gate))
    # only the input that needs a gradient gets one
    gate = gate0.clone().requires_grad_()
    SwiGLUFunction.apply(gate, up0).backward(grad)
    assert torch.equal(gate.grad, d_gate)


def test_only_llama_formula_silu_mlps_are_fused(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    model = tiny_model(tok, layers=3)
    assert fuse_swiglu(model) == 3
    assert fuse_swiglu(model) == 0  # already replaced: not wrapped twice
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, 32)
    assert torch.equal(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))

    gelu = tiny_model(tok)
    gelu.config.hidden_act = "gelu"
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert fuse_swiglu(gelu) == 0  # a GELU MLP is not SwiGLU
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    assert fuse_swiglu(phi3) == 0  # one gate_up_proj and its own forward: not Llama's code


def test_only_llama_formula_norms_are_replaced():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    model = torch.nn.ModuleList([Qwen2RMSNorm(16), GemmaRMSNorm(16), torch.nn.LayerNorm(16)])
    assert fuse_rmsnorm(model) == 1  # Qwen2's is a copy of Llama's; Gemma's scales by 1 + weight
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    x = torch.randn(3, 16, dtype=torch.bfloat16)  # not fp32: the module's own forward, bit for bit
    model[0].weight.data = model[0].weight.data.bfloat16()
    assert torch.equal(model[0](x), Qwen2RMSNorm.forward(model[0], x))
    assert fuse_rmsnorm(model) == 0  # already replaced: not wrapped twice


def test_a_model_whose_rotary_is_not_llamas_is_left_alone():
    class Other(torch.nn.Module):
        pass

    Other.__module__ = __name__  # this test module has no apply_rotary_pos_emb
    before = dict(vars(sys.modules[__name__]))
    with fused_rotary(Other()):
        assert "apply_rotary_pos_emb" not in vars(sys.modules[__name__])
    assert dict(vars(sys.modules[__name__])).keys() == before.keys()
