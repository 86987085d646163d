"""Per-token log-probabilities (token_logprobs) equal full (B, T, V) logits + log-softmax + gather, and so do the
gradients of a nonlinear function of per-sequence sums (a DPO-style pair loss plus a per-token term, so every token's
gradient has its own weight): fused head and fallbacks, full fine-tuning and LoRA, several chunks, a bias, a packed
row against the padded batch, bf16 products with the softmax in fp32; and a broken line fails these tests."""

import pytest
import torch
import torch.nn.functional as F
from test_tolerances import _broken
from train_helpers import examples, lora_model, record_calls

from tunesmith.config import MethodConfig
from tunesmith.data import IGNORE, collate, collate_packed
from tunesmith.models import adapt
from tunesmith.testing import SCALED_RTOL, assert_close_scaled, tiny_model
from tunesmith.train import logprobs
from tunesmith.train import loss as loss_module
from tunesmith.train.loss import example_count, fused_head, target_rows, token_logprobs, token_loss
from tunesmith.train.packing import enable_packing, model_inputs

LENGTHS = [9, 14, 5, 11]  # two (chosen, rejected) pairs
BF16 = SCALED_RTOL[torch.bfloat16]


def reference_logprobs(model, batch):
    """The plain computation: full logits, fp32 log-softmax over every position, gather, keep the targets; the row of
    each from the padded layout."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    rows = torch.arange(labels.size(0))[:, None].expand_as(labels)
    return logp[mask], rows[mask]


def objective(logps, rows, n_examples):
    """DPO-style: -logsigmoid(beta (seq[2k] - seq[2k+1])) over pairs of sequence sums, plus a per-token term."""
    seq = torch.zeros(n_examples).index_add(0, rows, logps)
    return -F.logsigmoid(0.5 * (seq[0::2] - seq[1::2])).sum() + 0.3 * logps.exp().sum()


def value_and_grads(model, fn, batch, n_examples=len(LENGTHS)):
    """(objective, logps, rows, gradients by name) of one forward/backward of ``fn(model, batch) -> (logps, rows)``."""
    model.zero_grad(set_to_none=True)
    logps, rows = fn(model, batch)
    value = objective(logps, rows, n_examples)
    value.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return value.detach(), logps.detach(), rows, grads


def assert_same(a, b, rtol=None):
    assert torch.equal(a[2], b[2]), "rows"
    assert_close_scaled(a[0], b[0], rtol, msg="objective")
    assert_close_scaled(a[1], b[1], rtol, msg="logps")
    assert a[3].keys() == b[3].keys() and a[3]
    for k in a[3]:
        assert_close_scaled(a[3][k], b[3][k], rtol, msg=k)


def _model(tok, method):
    if method == "lora":
        return lora_model(tok)  # B matrices non-zero: the adapters carry gradient
    return adapt(tiny_model(tok, seed=2), MethodConfig(name="full"))[0]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("fused", [True, False])
def test_logprobs_and_a_preference_objectives_gradients_equal_full_logits(tok, monkeypatch, method, fused):
    batch = collate(examples(tok, LENGTHS), tok.pad_token_id)
    model = _model(tok, method)
    assert fused_head(model) is not None
    calls = record_calls(monkeypatch, logprobs.LinearTokenLogprobs)
    got = value_and_grads(model, lambda m, b: token_logprobs(m, b, fused=fused), batch)
    assert len(calls) == int(fused)  # the fused head, or logits at the targets only
    ref = value_and_grads(model, reference_logprobs, batch)
    assert_same(got, ref)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.long
    assert got[1].numel() == sum(e.n_targets for e in examples(tok, LENGTHS))
    if method == "full":
        assert "lm_head.weight" in ref[3] or "model.embed_tokens.weight" in ref[3]  # the tied head trains
    else:
        assert any("lora_A" in k for k in ref[3]) and not any("embed" in k for k in ref[3])


def test_fused_over_several_chunks_equals_logits_to_keep_and_full_logits(tok, monkeypatch):
    batch = collate(examples(tok, LENGTHS, seed=3), tok.pad_token_id)
    model = _model(tok, "full")
    keep = value_and_grads(model, lambda m, b: token_logprobs(m, b, fused=False), batch)
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # 20 targets: 3 chunks, the last one short
    calls = record_calls(monkeypatch, logprobs.LinearTokenLogprobs)
    fused = value_and_grads(model, token_logprobs, batch)
    assert len(calls) == 1 and calls[0][4] == 7
    monkeypatch.setattr(loss_module, "_takes_logits_to_keep", lambda m: False)  # a model without logits_to_keep
    full = value_and_grads(model, token_logprobs, batch)
    assert len(calls) == 1
    assert_same(fused, keep)
    assert_same(full, keep)


def test_minus_the_sum_of_logprobs_is_token_loss(tok):
    batch = collate(examples(tok, LENGTHS, seed=1), tok.pad_token_id)
    model = lora_model(tok)
    for fused in (True, False):
        with torch.no_grad():
            logps, _ = token_logprobs(model, batch, fused=fused)
            loss, n, _ = token_loss(model, batch, fused=fused)
        assert logps.numel() == n
        assert_close_scaled(-logps.sum(), loss)


def test_a_packed_row_gives_the_padded_batchs_logprobs_rows_and_gradients(tok):
    exs = examples(tok, LENGTHS, seed=2)
    model = _model(tok, "full")
    padded = collate(exs, tok.pad_token_id)
    ref = value_and_grads(model, token_logprobs, padded)
    assert enable_packing(model)
    packed = collate_packed(exs)
    assert example_count(packed) == example_count(padded) == len(exs)
    got = value_and_grads(model, token_logprobs, packed)
    assert_same(got, ref)  # rows exactly: the example within the row is the padded batch's row
    assert got[2].tolist() == [i for i, e in enumerate(exs) for _ in range(e.n_targets)]


def test_target_rows_of_a_packed_row_follow_its_boundaries():
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE, IGNORE, 7, IGNORE, IGNORE, 8]])  # examples of 3, 4 and 2 tokens
    batch = {"labels": labels, "cu_seq_lens_q": torch.tensor([0, 3, 7, 9], dtype=torch.int32)}
    assert target_rows(batch).tolist() == [0, 0, 1, 2]
    assert target_rows({"labels": labels}).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="one row"):
        target_rows({"labels": labels.expand(2, -1), "cu_seq_lens_q": batch["cu_seq_lens_q"]})


def test_fused_logprobs_match_torch_over_chunks_with_a_bias_and_per_token_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    weights = torch.randn(37, generator=g)  # every token's own gradient, of both signs
    logp = logprobs.linear_token_logprobs(h, w, b, y, chunk_rows=8)  # 5 chunks, the last one short
    (logp * weights).sum().backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    ref = torch.log_softmax(F.linear(h, w, b), -1).gather(1, y[:, None]).squeeze(1)
    (ref * weights).sum().backward()
    assert_close_scaled(logp.detach(), ref.detach())
    for name, a, t in zip("hwb", got, (h, w, b)):
        assert_close_scaled(a, t.grad, msg=name)


def test_the_entropy_beside_the_logprobs_is_the_softmaxs_and_changes_nothing_else(monkeypatch):
    """with_entropy: the entropy of each row's distribution from the forward's own tile (over chunks and in blocks of
    rows), equal to -sum p log p of the full softmax; the log-probabilities and gradients are those without it."""
    monkeypatch.setattr(logprobs, "ENTROPY_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(21, 16, generator=g, requires_grad=True)
    w, y = torch.randn(50, 16, generator=g) * 2, torch.randint(0, 50, (21,), generator=g)
    logp, entropy = logprobs.linear_token_logprobs(h, w, None, y, chunk_rows=8, with_entropy=True)
    logp.sum().backward()
    grad = h.grad.clone()
    h.grad = None
    plain = logprobs.linear_token_logprobs(h, w, None, y, chunk_rows=8)
    plain.sum().backward()
    assert torch.equal(logp, plain) and torch.equal(grad, h.grad) and not entropy.requires_grad
    p = torch.softmax(h.detach() @ w.t(), -1)
    assert_close_scaled(entropy, -(p * p.log()).sum(-1))


@pytest.mark.parametrize("fused", [True, False])
def test_token_logprobs_give_the_models_entropy_at_each_target(tok, fused):
    batch = collate(examples(tok, LENGTHS, seed=4), tok.pad_token_id)
    model = _model(tok, "full")
    with torch.no_grad():
        logps, rows, entropy = token_logprobs(model, batch, fused=fused, with_entropy=True)
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    mask = batch["labels"][:, 1:] != IGNORE
    p = torch.softmax(logits, -1)[mask]  # (N, V)
    assert entropy.shape == logps.shape
    assert_close_scaled(entropy, -(p * p.log()).sum(-1))


def test_fused_logprobs_without_gradients_without_targets_and_for_a_frozen_head():
    h, w = torch.randn(6, 8), torch.randn(20, 8)
    with torch.no_grad():  # a reference model's log-probabilities
        logp = logprobs.linear_token_logprobs(h, w, None, torch.arange(6), chunk_rows=4)
    assert_close_scaled(logp, torch.log_softmax(h @ w.t(), -1)[torch.arange(6), torch.arange(6)])
    h0 = torch.zeros(0, 8, requires_grad=True)
    logprobs.linear_token_logprobs(h0, w, None, torch.zeros(0, dtype=torch.long), chunk_rows=4).sum().backward()
    assert h0.grad.shape == (0, 8)  # a micro-batch with no target still backpropagates
    h1 = h.clone().requires_grad_()  # LoRA: the head is frozen, only h needs a gradient
    logprobs.linear_token_logprobs(h1, w, None, torch.arange(6), chunk_rows=4).sum().backward()
    assert w.grad is None and h1.grad is not None


def test_fused_logprobs_in_bf16_take_the_softmax_in_fp32_and_return_the_parameters_dtypes():
    """h in bf16 (the model's last norm), an fp32 master head multiplied in bf16 under autocast: fp32 log-probabilities,
    gradients in h's and W's dtypes, within bf16 rounding of the fp32 computation."""
    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(29, 16, generator=g)
    w32 = torch.randn(40, 16, generator=g) * 0.3
    y = torch.randint(0, 40, (29,), generator=g)
    weights = torch.randn(29, generator=g)
    ref_h, ref_w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref = torch.log_softmax(ref_h @ ref_w.t(), -1).gather(1, y[:, None]).squeeze(1)
    (ref * weights).sum().backward()
    h = h32.bfloat16().requires_grad_()
    w = w32.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = logprobs.linear_token_logprobs(h, w, None, y, chunk_rows=8)
    (logp * weights).sum().backward()
    assert logp.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_close_scaled(logp.detach(), ref.detach(), rtol=BF16)
    assert_close_scaled(h.grad.float(), ref_h.grad, rtol=BF16)
    assert_close_scaled(w.grad, ref_w.grad, rtol=BF16)


def test_a_model_under_bf16_autocast_equals_the_plain_path_under_autocast(tok):
    batch = collate(examples(tok, LENGTHS), tok.pad_token_id)
    model = lora_model(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = value_and_grads(model, token_logprobs, batch)
        ref = value_and_grads(model, reference_logprobs, batch)
    assert_same(got, ref, rtol=BF16)


# Lines of the fused function broken as a plausible bug would break them; the equality tests must fail.
BROKEN = {
    "softmax term dropped": ("g.mul_(-gc[:, None])  # -grad_i * softmax", "g.zero_()"),
    "one-hot term dropped": ("] += gc  # + grad_i * onehot", "] += 0.0"),
    "one weight for every token": ("g.mul_(-gc[:, None])  # -grad_i * softmax", "g.mul_(-gc.mean())"),
    "1e-4 error in the softmax": ("g.sub_(lse[s:s + n_rows, None]).exp_()",
                                  "g.sub_(lse[s:s + n_rows, None] * 1.0001).exp_()"),
    "max shift not undone": ("exp_().sum(dim=-1).log_().add_(top)", "exp_().sum(dim=-1).log_()"),
}


@pytest.mark.parametrize("old,new", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_line_fails_the_equality_tests(tok, monkeypatch, old, new):
    with monkeypatch.context() as mp:
        _broken(mp, "tunesmith.train.logprobs", old, new)
        with pytest.raises(AssertionError):
            test_fused_logprobs_match_torch_over_chunks_with_a_bias_and_per_token_gradients()
        with pytest.raises(AssertionError):
            test_logprobs_and_a_preference_objectives_gradients_equal_full_logits(tok, mp, "lora", True)
