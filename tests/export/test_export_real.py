"""The built-in SmolLM2-135M with a LoRA adapter, exported to a Q8_0 GGUF and read back.

Measured (largest logit difference over the largest logit, probe conversation): merge 3.5e-6;
the Q8_0 file against the merged model with its weights Q8_0-rounded in memory: 0 (exact);
against the unrounded merged model: 0.034 (tolerance 0.1); greedy answers identical to the
Q8_0-rounded model's (and, on most adapters, to the unrounded model's).
"""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import models
from tunesmith.evaluate import generate_batch
from tunesmith.export import compare_tokenizers, export_model, logits, probe_ids, round_weights_

# Prompts whose greedy answers never hang on a near-tie: the smallest top-2 logit margin over 12
# tokens is 0.95 / 0.55 / 0.18 on the merged model. Q8_0 moves logits by up to ~1.3, so a prompt
# with a 0.006 margin (e.g. "Answer with a number. What is 2 + 2?") may legitimately change a word.
PROMPTS = [[{"role": "user", "content": "What is the capital of Japan?"}],
           [{"role": "user", "content": "How many days are in a week?"}],
           [{"role": "user", "content": "What color is the sky on a clear day?"}]]


@pytest.mark.real_model
def test_builtin_model_with_lora_exports_to_q8_0_gguf_that_answers_the_same(tmp_path):
    from tunesmith.config import MethodConfig

    t00 = t0 = time.time()
    base = models.ensure_local("smollm2-135m-instruct")
    tok = models.load_tokenizer(base)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    lora, _ = models.adapt(models.load_model(base, dtype=torch.float32, tokenizer=tok), MethodConfig(name="lora"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a small, non-zero adapter (PEFT starts B at zero)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2e-3)
    run = tmp_path / "run"
    models.save_model(lora, tok, run / "best", base_ref=str(base), method="lora")
    (run / "config.resolved.yaml").write_text("method:\n  name: lora\n")
    t_setup = time.time() - t0

    merged = lora.merge_and_unload().eval()
    ids = probe_ids(tok)
    ref = logits(merged, ids)
    want = generate_batch(merged, tok, PROMPTS, max_new_tokens=12)

    t0 = time.time()  # the read-back checks are made below, once, rather than also inside export_model
    export_model(run, "gguf", tmp_path / "smol.gguf", dtype="q8_0", verify=False)
    t_export = time.time() - t0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol.gguf", dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smol.gguf")
    got = logits(loaded, ids)
    answers = generate_batch(loaded, gguf_tok, PROMPTS, max_new_tokens=12)
    assert "Tokyo" in want[0] and "Tokyo" in answers[0], (want, answers)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 0.1, rel
    rounded = round_weights_(merged, "gguf", "q8_0")
    assert torch.equal(got, logits(rounded, ids))  # exactly the Q8_0-rounded weights
    # Greedy answers equal those of the same weights rounded in memory. Against the unrounded model they
    # usually agree too, but Q8_0 may legitimately flip a near-tie late in a 12-token answer.
    assert answers == generate_batch(rounded, tok, PROMPTS, max_new_tokens=12)
    assert compare_tokenizers(tok, gguf_tok).ok and gguf_tok.eos_token == "<|im_end|>"
    print(f"\nq8_0 vs merged: {rel:.3f} of max |logit|; setup {t_setup:.1f} s, export {t_export:.1f} s, "
          f"total {time.time() - t00:.1f} s; answers {want}")
