"""What the loss, packing and kernel tests share: random examples, a LoRA model whose adapters carry gradient, the loss
and gradients of one pass, and comparing two of them at float-rounding tolerance."""

import torch

from tunesmith.config import MethodConfig
from tunesmith.data import IGNORE, RenderedExample
from tunesmith.models import adapt
from tunesmith.testing import assert_close_scaled, tiny_model


def examples(tok, lengths, seed=0, prompt_frac=0.5):
    """Random token sequences of ``lengths``; the first ``prompt_frac`` of each is prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
        k = int(n * prompt_frac)
        out.append(RenderedExample(ids, [IGNORE] * k + ids[k:], origin=None))
    return out


def lora_model(tok, dropout=0.0, seed=2, **lora):
    """The tiny model with LoRA r 4 on every linear layer, its B matrices non-zero (they start at zero) so that the
    adapter path carries gradient to A and to the input."""
    model, _ = adapt(tiny_model(tok, seed=seed), MethodConfig(name="lora", lora={"r": 4, "dropout": dropout, **lora}))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, fn, batch):
    """(loss, target count, hits, gradients by name) of one forward/backward of ``fn(model, batch)``."""
    model.zero_grad(set_to_none=True)
    loss, n, correct = fn(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, correct, grads


def assert_same(a, b, rtol=None):
    """Loss, target count, hits and every gradient of two ``loss_and_grads`` agree: the counts exactly, the float
    tensors to rounding of their scale (testing.assert_close_scaled: SCALED_RTOL of the dtype unless ``rtol``)."""
    assert a[1:3] == b[1:3]
    assert_close_scaled(torch.tensor(a[0]), torch.tensor(b[0]), rtol, msg="loss")
    assert a[3].keys() == b[3].keys() and a[3]
    for k in a[3]:
        assert_close_scaled(a[3][k], b[3][k], rtol, msg=k)


def record_calls(monkeypatch, fn_class) -> list[tuple]:
    """The arguments of every ``fn_class.apply`` call from here on (an autograd Function), in order."""
    calls = []
    real = fn_class.apply
    monkeypatch.setattr(fn_class, "apply", lambda *a: calls.append(a) or real(*a))
    return calls
