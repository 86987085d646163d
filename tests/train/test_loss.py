"""The loss at target positions only (logits_to_keep) and the output layer fused with the cross-entropy equal full
(B, T, V) logits + cross-entropy, loss and gradients: full fine-tuning, LoRA, a bias, several chunks, no targets, an
architecture that is not allow-listed, and bf16 products with the softmax in fp32."""

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_same, examples, loss_and_grads

from tunesmith.config import MethodConfig
from tunesmith.data import IGNORE, collate
from tunesmith.models import adapt
from tunesmith.testing import assert_close_scaled, tiny_model
from tunesmith.train.loss import fused_head, linear_cross_entropy, plain_loss, shifted_targets, token_loss


def test_shifted_targets_pair_each_kept_position_with_its_next_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, IGNORE, IGNORE]])
    keep, targets = shifted_targets(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("fused", [True, False])
def test_target_only_loss_equals_full_logits_loss(tok, method, fused):
    batch = collate(examples(tok, [9, 14, 5, 11]), tok.pad_token_id)
    model, _ = adapt(tiny_model(tok, seed=2), MethodConfig(name=method, lora={"r": 4, "dropout": 0.0}))
    assert fused_head(model) is not None  # llama is allow-listed, through the PEFT wrapper too
    plain = loss_and_grads(model, plain_loss, batch)
    fast = loss_and_grads(model, lambda m, b: token_loss(m, b, fused=fused), batch)
    assert_same(fast, plain)
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
    assert_close_scaled(loss.detach(), ref.detach())
    assert int(correct) == int((logits.argmax(-1) == y).sum())
    for a, t in zip(got, (h, w, b)):
        assert_close_scaled(a, t.grad)


def test_fused_cross_entropy_without_gradients_and_without_targets():
    h, w = torch.randn(6, 8), torch.randn(20, 8)
    with torch.no_grad():  # evaluation: loss only
        loss, _ = linear_cross_entropy(h, w, None, torch.arange(6))
    assert_close_scaled(loss, F.cross_entropy(h @ w.t(), torch.arange(6), reduction="sum"))
    h0 = torch.zeros(0, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(h0, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()  # a micro-batch with no target still backpropagates (DDP needs every rank's pass)
    assert float(loss) == 0.0 and int(correct) == 0 and h0.grad.shape == (0, 8)


def test_fused_cross_entropy_in_bf16_takes_the_softmax_in_fp32_and_returns_the_parameters_dtypes():
    """Mixed precision: h (bf16, the model's last norm) and a frozen bf16 head, or an fp32 master head under autocast.
    The products run in bf16 as autocast would run them; the loss and softmax are fp32; the gradients come back in h's
    and W's dtypes, within bf16 rounding of the fp32 computation."""
    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(29, 16, generator=g)
    w32 = torch.randn(40, 16, generator=g) * 0.3
    y = torch.randint(0, 40, (29,), generator=g)
    ref_h, ref_w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.t(), y, reduction="sum")
    ref.backward()
    h = h32.bfloat16().requires_grad_()
    w = w32.clone().requires_grad_()  # an fp32 master weight, multiplied in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, None, y, chunk_rows=8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_close_scaled(loss.detach(), ref.detach(), rtol=1e-2)
    assert_close_scaled(h.grad.float(), ref_h.grad, rtol=3e-2)
    assert_close_scaled(w.grad, ref_w.grad, rtol=3e-2)


def test_an_architecture_not_allow_listed_takes_the_exact_unfused_path(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert fused_head(model) is None
    batch = collate(examples(tok, [8, 13, 6]), tok.pad_token_id)
    assert_same(loss_and_grads(model, token_loss, batch), loss_and_grads(model, plain_loss, batch))
