"""Helpers for the models tests: a tiny llama GGUF, a few training steps, snapshots, logits.

write_tiny_gguf goes through tunesmith's own GGUF writer (tunesmith.export.gguf), so the real
GGUF -> safetensors conversion is exercised in a fast test; the weights are F32, so the converted
model must give the very logits of the model it was written from.
"""

from __future__ import annotations

import copy
from pathlib import Path


def write_tiny_gguf(path: str | Path, model, tokenizer) -> Path:
    """An F32 GGUF of ``model`` whose metadata says pad = eos, as SmolLM2's does: the loader must fix it."""
    from tunesmith.export import write_gguf

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return write_gguf(model, tok, path, dtype="f32", name="tiny llama")


def train_steps(model, tokenizer, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on one sentence, over the parameters that require grad."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog").input_ids])  # (1, T)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def snapshot(model) -> dict:
    """Every tensor of the state dict, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, tokenizer, text: str = "hello world, what is the capital of france?"):
    import torch

    ids = torch.tensor([tokenizer(text).input_ids])  # (1, T)
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)
