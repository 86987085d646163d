"""Load an export back and compare it with the model it was written from.

Every export is read back the way its users will read it (plain transformers for a folder, PEFT
for an adapter, transformers' GGUF loader for a GGUF file) and its logits on a probe conversation
are compared with the source's. Two numbers, relative to the largest logit so that one scale fits
models whose logits span 1 or 40:

- the check: the read-back model against the source with its weights rounded exactly as the file
  stores them (f16, bf16, or Q8_0 blocks, quantised and dequantised in memory). Same weights, so
  only float rounding may remain: tolerance 1e-4. A wrong tensor layout, a lost adapter or a
  mangled tokenizer shows up here, whatever the dtype; f32 files compare with the source itself.
- the cost of the dtype, reported (not judged): the read-back model against the unrounded source.
  Measured on SmolLM2-135M: f16 0.001, q8_0 0.04 of the largest logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = 1e-4  # max |Δlogit| / max |logit| between two computations with the same weights

PROBE = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France? Answer in one word, then explain why."}]
PROBE_TEXTS = ["Hello world! The date is 2021-03-04, 10:30.", "naïve café, 東京 😀",
               "def f(x):\n    return x * 2\n",
               "   leading spaces and\ttabs"]


@dataclass
class Check:
    """One comparison of an export with its source; ``info`` lines report a figure without judging it."""

    name: str
    ok: bool
    detail: str
    info: bool = False

    def __str__(self) -> str:
        return f"{'info' if self.info else 'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def probe_ids(tokenizer) -> torch.Tensor:
    """The probe conversation rendered with the chat template (plain text without one), (1, T)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(" ".join(m["content"] for m in PROBE))["input_ids"]
    return torch.tensor([list(ids)])


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits (1, T, V) of ``ids`` on the model's device."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def round_weights_(model, fmt: str, dtype: str):
    """Round every weight in place as an export of ``fmt``/``dtype`` stores it; compute stays fp32.

    hf: every floating tensor through f16/bf16. gguf: matrices through F16 or Q8_0 (F16 where a row
    does not split into 32-value blocks), 1-D tensors kept F32 -- the rule of ``gguf.as_stored``.
    """
    if dtype == "f32":
        return model
    from .gguf import as_stored

    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            if fmt == "hf":
                p.copy_(p.to(torch_dtype).float())
            else:
                p.copy_(torch.from_numpy(as_stored(p.detach().float().cpu().numpy(), dtype)))
    return model


def _relative(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float, float]:
    diff = (other - reference).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    top1 = (other.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return diff, scale, diff / scale, top1


def compare_logits(reference: torch.Tensor, other: torch.Tensor, what: str, tolerance: float = TOLERANCE) -> Check:
    """Pass when max |Δlogit| / max |logit| <= tolerance (and nothing is NaN/inf)."""
    if reference.shape != other.shape:
        return Check(what, False, f"logits shape {tuple(other.shape)} != {tuple(reference.shape)}")
    if not torch.isfinite(other).all():
        return Check(what, False, "logits hold NaN or inf")
    diff, scale, rel, top1 = _relative(reference, other)
    return Check(what, rel <= tolerance, f"max |Δlogit| {diff:.3g} = {rel:.2g} of max |logit| {scale:.3g} "
                 f"(tolerance {tolerance:g}); same top-1 token at {top1:.0%} of positions")


def dtype_effect(reference: torch.Tensor, other: torch.Tensor, dtype: str) -> Check:
    """How far rounding to ``dtype`` moved the logits (reported, not judged)."""
    diff, scale, rel, top1 = _relative(reference, other)
    return Check(f"{dtype} weights vs the f32 source", True, f"max |Δlogit| {diff:.3g} = {rel:.2g} of max |logit| "
                 f"{scale:.3g}; same top-1 token at {top1:.0%} of positions", info=True)


def compare_tokenizers(reference, other, what: str = "tokenizer round trip") -> Check:
    """Same ids for probe texts and the rendered probe conversation, same chat template and special tokens."""
    problems = []
    if (reference.chat_template or None) != (other.chat_template or None):
        problems.append("chat template differs")
    for kind in ("eos", "bos", "pad"):
        mine, theirs = getattr(reference, f"{kind}_token"), getattr(other, f"{kind}_token")
        if mine != theirs:
            problems.append(f"{kind} token {theirs!r} != {mine!r}")
    texts = list(PROBE_TEXTS)
    if reference.chat_template:
        texts.append(reference.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False))
    for text in texts:
        if reference(text)["input_ids"] != other(text)["input_ids"]:
            problems.append(f"tokenizes {text[:30]!r} differently")
    return Check(what, not problems, "; ".join(problems) or
                 f"same ids on {len(texts)} texts, same chat template and eos/bos/pad tokens")
