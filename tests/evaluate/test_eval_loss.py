import math

import pytest
import torch
import torch.nn.functional as F

from eval_helpers import chat
from tunesmith.evaluate import reference_loss, render_prompt

CONVS = [chat("hello"), chat("the quick brown fox jumps over the lazy dog", system="reverse")]
REFS = ["paris is the capital of france.", "dog"]


def _hand_token_losses(model, tok, conv, ref):
    """Per-token cross-entropy of ref + eos after the prompt, one unpadded sequence at a time."""
    prompt = render_prompt(tok, conv)
    target = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(ids).logits[0]  # (T, V)
    pred = logits[len(prompt) - 1: -1]  # positions whose next token is a target
    return F.cross_entropy(pred, torch.tensor(target), reduction="none")


def test_reference_loss_is_token_weighted_cross_entropy(model, eval_tok):
    per_example = [_hand_token_losses(model, eval_tok, c, r) for c, r in zip(CONVS, REFS)]
    tokens = sum(len(t) for t in per_example)
    expected = float(sum(t.sum() for t in per_example) / tokens)
    assert len(per_example[0]) != len(per_example[1])

    got = reference_loss(model, eval_tok, CONVS, REFS, batch_size=2)  # one left-padded batch
    assert got["tokens"] == tokens
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # not the mean of per-example means
    mean_of_means = float(sum(t.mean() for t in per_example) / 2)
    assert abs(mean_of_means - expected) > 1e-3

    assert reference_loss(model, eval_tok, CONVS, REFS, batch_size=1)["loss"] == pytest.approx(expected, rel=1e-5)


def test_reference_loss_includes_the_eos(model, eval_tok):
    hand = _hand_token_losses(model, eval_tok, CONVS[1], REFS[1])
    got = reference_loss(model, eval_tok, CONVS[1:], REFS[1:])
    assert got["tokens"] == len(eval_tok("dog", add_special_tokens=False)["input_ids"]) + 1
    assert got["loss"] == pytest.approx(float(hand.mean()), rel=1e-5)


def test_reference_loss_keeps_mode_and_checks_pairs(model, eval_tok):
    model.train()
    try:
        reference_loss(model, eval_tok, CONVS, REFS)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="2 conversations but 1 references"):
        reference_loss(model, eval_tok, CONVS, REFS[:1])


def test_reference_loss_through_peft(eval_tok):
    from peft import LoraConfig, get_peft_model

    from eval_helpers import lively_model

    base = lively_model(eval_tok)
    expected = reference_loss(base, eval_tok, CONVS, REFS)["loss"]
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert reference_loss(lora, eval_tok, CONVS, REFS)["loss"] == pytest.approx(expected, rel=1e-5)
