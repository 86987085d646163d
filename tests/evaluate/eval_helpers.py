"""Shared helpers for the evaluate tests (imported by name, so the module name is unique)."""

import torch


def lively_model(tok, seed: int = 0):
    """The tiny model with its block weights re-drawn at std 0.3.

    At the default init (std 0.02) the tied embeddings dominate the residual stream and greedy
    decoding just repeats the last prompt token; larger weights give varied, well-separated
    continuations, which is what the batched-versus-single comparisons need to mean anything.
    """
    from tunesmith.testing import tiny_model

    model = tiny_model(tok, hidden=64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def chat(user: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


CONVERSATIONS = [
    chat("hello"),
    chat("the quick brown fox jumps over the lazy dog " * 6, system="answer question"),
    chat("convert the date to iso format please"),
    chat("what is the capital of france?", system="system user assistant answer question 0123456789"),
    chat("abc"),
    chat("January February March April May June July August September October November December " * 2),
]
