"""Tiny, seeded, randomly initialised models and tokenizers for tests and examples.

They are built in memory in well under a second, so the suite exercises the real code paths
(chat templates, label masks, PEFT, accelerate) without loading a real checkpoint.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

# The same ChatML layout SmolLM2 uses, so templates, masks and stop tokens behave as on the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "convert the date to iso format please",
    "what is the capital of france? paris is the capital of france.",
    "hello world, this is a tiny tokenizer for tests.",
    "system user assistant answer question 0123456789 - : / , . ! ?",
    "January February March April May June July August September October November December",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tokenizer=None, *, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0,
               dropout: float = 0.0):
    """A seeded random Llama-architecture causal LM (the built-in model's architecture)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512, attention_dropout=dropout, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str | Path, **kw) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (safetensors) and return its path."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_model(tok, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


WORDS = ["fox", "dog", "paris", "france", "date", "iso", "hello", "world", "quick", "brown", "lazy", "capital"]


def write_chat_jsonl(path, n, seed=0):
    """A tiny learnable task: answer with the user's words reversed."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            rec = {"messages": [{"role": "system", "content": "reverse"},
                                {"role": "user", "content": " ".join(words)},
                                {"role": "assistant", "content": " ".join(reversed(words))}]}
            f.write(json.dumps(rec) + "\n")
    return path


def write_pair_jsonl(path, n, seed=0, fmt="openai"):
    """Preference pairs on the same task: chosen = the user's words reversed, rejected = them repeated as given.
    ``fmt``: openai (input / preferred_output / non_preferred_output) or trl (prompt / chosen / rejected strings)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            prompt = [{"role": "system", "content": "reverse"}, {"role": "user", "content": " ".join(words)}]
            chosen, rejected = " ".join(reversed(words)), " ".join(words)
            if fmt == "trl":
                rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}
            else:
                rec = {"input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": chosen}],
                       "non_preferred_output": [{"role": "assistant", "content": rejected}]}
            f.write(json.dumps(rec) + "\n")
    return path


def write_prompt_jsonl(path, n, seed=0):
    """OpenAI reinforcement fine-tuning rows on write_pair_jsonl's task: messages ending with the user's words, and
    ``reference_answer`` (them reversed) for the grader to read as {{item.reference_answer}}."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            rec = {"messages": [{"role": "system", "content": "reverse"}, {"role": "user", "content": " ".join(words)}],
                   "reference_answer": " ".join(reversed(words))}
            f.write(json.dumps(rec) + "\n")
    return path


def reward_char_overlap(sample: dict, item: dict) -> float:
    """A reward function (module:function) with partial credit everywhere: difflib's similarity ratio of the answer to
    the reference answer, character by character (0 to 1), so even a tiny random model's answers differ in reward."""
    import difflib

    return difflib.SequenceMatcher(None, sample["output_text"], item["reference_answer"]).ratio()


# ---------------------------------------------------------------- comparing two computations of one quantity

# The largest elementwise difference allowed between two computations of the same tensor that sum in different orders
# (a fused function against the plain one, another CPU's or GPU's kernels, several processes against one), relative
# to the reference's largest magnitude. Rounding moves every element by about (terms summed) x eps x (the magnitudes
# summed), and those magnitudes are bounded by the tensor's scale, not by each element's own value: an element that is
# a near-cancelling sum of large terms carries the large terms' rounding. So an elementwise relative tolerance
# (torch.testing.assert_close's rtol) fails on such elements on another machine's kernels (measured: up to 6e-3
# elementwise between fused and PEFT LoRA gradients), while a tolerance relative to the tensor's largest magnitude
# holds everywhere and still catches a wrong formula, which moves a tensor by a sizeable fraction of its scale
# (tests/train/test_tolerances.py breaks the fused code a line at a time and checks that the comparisons fail).
# fp32: 5e-5 is ~400 units in the last place of the largest element; the worst seen in the suite was 7.7e-6 (LoRA
# gradients through two fused blocks), over three kernel sets (AVX-512 + AMX, AVX2-only dispatch, MKL's
# reproducible-sums path: `make test-kernels`). bf16 keeps 8 bits of mantissa (eps 7.8e-3), fp16 11 bits (9.8e-4).
SCALED_RTOL = {torch.float32: 5e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _record(err: float, tol: float, msg: str) -> None:
    """With ``TUNESMITH_SCALED_ERRORS=FILE`` set, append each comparison (test, tensor, error, allowed) to FILE: how the
    margins of SCALED_RTOL are measured on a new machine (README "Tests on every machine")."""
    path = os.environ.get("TUNESMITH_SCALED_ERRORS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{test}\t{msg}\t{err:.3e}\t{tol:.1e}\n")


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in float64; 0 for two empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    diff = float((a - e).abs().max())
    return diff / scale if scale > 0 else diff


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, msg: str = "") -> float:
    """Assert that ``actual`` equals ``expected`` up to float rounding of the tensor's scale: same shape and dtype, finite
    where the reference is, and max |actual - expected| <= rtol * max |expected| (``SCALED_RTOL`` of the dtype unless
    ``rtol`` is given). Returns the measured ratio max |difference| / max |expected|."""
    where = f"{msg}: " if msg else ""
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{where}dtype {actual.dtype} != {expected.dtype}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{where}non-finite values differ"
    tol = SCALED_RTOL[expected.dtype] if rtol is None else rtol
    err = scaled_error(actual[finite], expected[finite])
    _record(err, tol, msg)
    assert err <= tol, (f"{where}max |difference| is {err:.3g} of the reference's largest magnitude "
                        f"({float(expected.detach().abs().max()):.4g}); allowed {tol:.3g}")
    return err
