"""Packed rows (no padding, attention per example) give each example the loss it has alone, and an example cannot see
the others: with gradient checkpointing, with the CPU kernel or sdpa per example, in bf16; the boundaries reach the
attention as an argument of the forward; length-grouped batching is a seeded permutation that cuts padding; a run
with and without packing trains to the same losses."""

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_same, examples, loss_and_grads, record_calls

from tunesmith.config import MethodConfig, load_config
from tunesmith.data import collate, collate_packed
from tunesmith.models import adapt
from tunesmith.testing import assert_close_scaled, tiny_model
from tunesmith.train import packing, train
from tunesmith.train.loss import token_loss
from tunesmith.train.packing import PackedCausalAttention, PackedRow, enable_packing, packs
from tunesmith.train.steps import epoch_order, length_grouped_order


def _per_example_losses(model, exs, pad_id):
    return [float(token_loss(model, collate([e], pad_id))[0]) for e in exs]


def test_packed_row_gives_each_example_its_own_loss(tok):
    exs = examples(tok, [7, 19, 4, 12, 9])
    model = tiny_model(tok, seed=1)
    assert enable_packing(model) and packs(model)
    alone = _per_example_losses(model, exs, tok.pad_token_id)
    packed = collate_packed(exs)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in exs))  # no padding at all
    assert packed["position_ids"][0, :7].tolist() == list(range(7)) and packed["position_ids"][0, 7] == 0
    loss, n, _ = token_loss(model, packed)
    padded_loss, padded_n, _ = token_loss(model, collate(exs, tok.pad_token_id))
    assert n == padded_n == sum(e.n_targets for e in exs)
    assert_close_scaled(loss.detach(), torch.tensor(sum(alone)))
    assert_close_scaled(loss.detach(), padded_loss.detach())


@pytest.mark.parametrize("through", ["model_forward", "a direct call"])
def test_packed_examples_cannot_attend_to_each_other(tok, through):
    """Change every token of example 0: the per-token losses of the examples after it do not move. Through the training
    forward (boundaries given as a PackedRow) and through a direct call with transformers' cu_seq_lens_q."""
    exs = examples(tok, [10, 8, 12])
    changed = [examples(tok, [10], seed=99)[0]] + exs[1:]
    model = tiny_model(tok, seed=1)
    enable_packing(model)

    def token_losses(exs):
        batch = collate_packed(exs)
        with torch.no_grad():
            if through == "model_forward":
                logits = packing.model_forward(model, batch).logits[0, :-1]
            else:
                logits = model(**packing.model_inputs(batch)).logits[0, :-1]
        return F.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")

    a, b = token_losses(exs), token_losses(changed)
    assert_close_scaled(a[10:], b[10:])
    assert not torch.allclose(a[:9], b[:9])


def test_the_boundaries_reach_every_attention_call_as_an_argument(tok, monkeypatch):
    """model_forward reads the boundaries once and passes them as ``packed_row``; each layer's attention counts itself
    in it (the guard that a packed row was split), and nothing is left in module state between calls."""
    model = tiny_model(tok, seed=1)
    enable_packing(model)
    rows = []
    real = packing.packed_attention_forward

    def spy(module, q, k, v, mask, packed_row=None, **kw):
        rows.append(packed_row)
        return real(module, q, k, v, mask, packed_row=packed_row, **kw)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, packing.PACKED_ATTENTION, spy)
    packing.model_forward(model, collate_packed(examples(tok, [5, 9, 3])))
    assert len(rows) == 2 and rows[0] is rows[1] and isinstance(rows[0], PackedRow)
    assert rows[0].bounds == (0, 5, 14, 17) and rows[0].attention_calls == 2


def test_packed_gradients_equal_padded_with_and_without_checkpointing(tok):
    exs = examples(tok, [6, 15, 9, 11])
    ref_model, _ = adapt(tiny_model(tok, seed=4), MethodConfig(name="full"))
    ref = loss_and_grads(ref_model, token_loss, collate(exs, tok.pad_token_id))
    for checkpointing in (False, True):
        model, _ = adapt(tiny_model(tok, seed=4), MethodConfig(name="full"))
        enable_packing(model)
        if checkpointing:  # the recomputation in backward must split the row per example too
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        assert_same(loss_and_grads(model, token_loss, collate_packed(exs)), ref)


def _packed_qkv(lengths, heads=6, kv_heads=2, d=16, seed=0, dtype=torch.float32):
    """q (1, H, T, D), k and v (1, Hkv, T, D) as the model makes them: transposed views of one projection output."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    x = torch.randn(1, t, (heads + 2 * kv_heads) * d, generator=g).to(dtype).requires_grad_()
    q, k, v = x.split([heads * d, kv_heads * d, kv_heads * d], -1)
    views = [y.view(1, t, -1, d).transpose(1, 2) for y in (q, k, v)]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return x, views, bounds


def _sdpa_per_example(q, k, v, bounds):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    return torch.cat([sdpa_attention_forward(module, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, scaling=0.25,
                                             is_causal=True)[0] for s, e in zip(bounds[:-1], bounds[1:])], dim=1)


def test_packed_cpu_attention_is_sdpa_per_example_bit_for_bit():
    """PackedCausalAttention (the flash kernel called per example, gradients written in place) against sdpa run
    on each example alone, GQA, one-token examples included: outputs and input gradients identical (the same kernel)."""
    lengths = [1, 17, 5, 40, 1, 9]
    g = torch.randn(1, sum(lengths), 6, 16, generator=torch.Generator().manual_seed(1))
    x1, (q, k, v), bounds = _packed_qkv(lengths)
    ref = _sdpa_per_example(q, k, v, bounds)
    ref.backward(g)
    x2, (q, k, v), _ = _packed_qkv(lengths)
    out = PackedCausalAttention.apply(q, k, v, PackedRow(tuple(bounds)).spans(), 0.25)
    out.backward(g)
    assert out.shape == ref.shape == (1, sum(lengths), 6, 16)
    assert torch.equal(out, ref) and torch.equal(x1.grad, x2.grad)


def test_packed_cpu_attention_in_bf16_takes_its_backward_in_fp32():
    """bf16 (mixed precision): the forward is sdpa's bf16 kernel per example, bit for bit; the backward runs the fp32
    kernel on the upcast slices (faster on a CPU), so its gradients are the fp32 computation's on the same inputs,
    rounded to bf16 once: closer to fp32's than sdpa's bf16 backward, and within bf16 rounding of it."""
    lengths = [3, 17, 40, 9]
    g = torch.randn(1, sum(lengths), 6, 16, generator=torch.Generator().manual_seed(1))
    x32, (q, k, v), bounds = _packed_qkv(lengths)
    _sdpa_per_example(q, k, v, bounds).backward(g)
    xb, (q, k, v), _ = _packed_qkv(lengths, dtype=torch.bfloat16)
    ref = _sdpa_per_example(q, k, v, bounds)
    ref.backward(g.bfloat16())
    x, (q, k, v), _ = _packed_qkv(lengths, dtype=torch.bfloat16)
    out = PackedCausalAttention.apply(q, k, v, PackedRow(tuple(bounds)).spans(), 0.25)
    out.backward(g.bfloat16())
    assert torch.equal(out, ref) and x.grad.dtype == torch.bfloat16
    assert_close_scaled(x.grad, xb.grad)
    from tunesmith.testing import scaled_error

    assert scaled_error(x.grad.float(), x32.grad) <= scaled_error(xb.grad.float(), x32.grad)


def test_packed_attention_takes_the_cpu_kernel_path_and_the_sdpa_loop_with_dropout_or_kernels_off(tok, monkeypatch):
    exs = examples(tok, [7, 12, 5])
    calls = record_calls(monkeypatch, PackedCausalAttention)
    model = tiny_model(tok, seed=1)
    enable_packing(model)
    model.train()
    fast = loss_and_grads(model, token_loss, collate_packed(exs))
    assert len(calls) == model.config.num_hidden_layers
    assert not packing.cpu_flash_applies(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8),
                                         0.1, {})
    assert not packing.cpu_flash_applies(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8),
                                         0.0, {"softcap": 30.0})
    # train.kernels off: the per-example sdpa loop, plain autograd
    assert_same(loss_and_grads(model, lambda m, b: token_loss(m, b, fused=False), collate_packed(exs)), fast)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(packing, "cpu_flash_applies", lambda *a: False)  # dropout, soft-capping, ...: the loop too
    assert_same(loss_and_grads(model, token_loss, collate_packed(exs)), fast)
    assert len(calls) == model.config.num_hidden_layers


def test_a_packed_batch_is_refused_by_a_model_without_per_example_attention(tok):
    model = tiny_model(tok, seed=1)  # enable_packing not called: plain sdpa would attend across examples
    with pytest.raises(RuntimeError, match="packed"):
        token_loss(model, collate_packed(examples(tok, [5, 6])))


def test_a_packed_example_longer_than_a_sliding_window_is_refused(tok):
    """The per-example kernels are plain causal: an example longer than the model's attention window (Mistral, Qwen2
    with sliding windows) would attend further back than the model does. Refused, with what to do instead."""
    x, (q, k, v), _ = _packed_qkv([5, 9])
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    ok = packing.packed_attention_forward(module, q, k, v, None, scaling=0.25, packed_row=PackedRow((0, 5, 14)),
                                          sliding_window=9)[0]
    assert ok.shape == (1, 14, 6, 16)
    with pytest.raises(ValueError, match="attention window.*train.packing: false"):
        packing.packed_attention_forward(module, q, k, v, None, scaling=0.25, packed_row=PackedRow((0, 5, 14)),
                                         sliding_window=8)


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
    assert_close_scaled(torch.tensor(_losses(on.output_dir)), torch.tensor(_losses(off.output_dir)))
    assert_close_scaled(torch.tensor(on.best_val_loss), torch.tensor(off.best_val_loss))


def test_group_by_length_run_resumes_to_the_same_losses(tmp_path, tiny_model_dir, tiny_data):
    over = ["train.group_by_length=true", "train.packing=false", "train.max_steps=4", "eval.every_steps=4",
            "checkpoint.every_steps=4"]
    straight = train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, *over), quiet=True)
    calls = iter(range(100))
    cfg = _cfg(tmp_path / "b", tiny_model_dir, tiny_data, *over)
    first = train(cfg, quiet=True, stop_requested=lambda: next(calls) >= 1)
    assert first.status == "interrupted"
    second = train(cfg, resume=True, quiet=True)
    assert _losses(second.output_dir) == _losses(straight.output_dir)  # resume is bit-exact: one kernel, twice
