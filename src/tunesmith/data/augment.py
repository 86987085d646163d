"""Per-epoch data augmentation: system-prompt variants, light prompt noise, cached paraphrases.

Every change is drawn from a generator seeded by (seed, epoch, example index), so an epoch's data is
the same on every rank and after a resume. New Examples are returned; inputs are never mutated, and
assistant text is never touched (it is what the model learns to write).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..config import AugmentConfig
from .example import Example, Message


class Paraphraser(Protocol):
    """texts -> for each text, a list of paraphrases (possibly empty)."""

    def __call__(self, texts: list[str]) -> list[list[str]]: ...


# conversations (lists of {"role", "content"}) -> one reply each; e.g. a wrapper of evaluate.generate_batch.
GenerateFn = Callable[[list[list[dict[str, str]]]], list[str]]

# Distinct wordings give distinct paraphrases even under greedy decoding (one per paraphrase_count).
PARAPHRASE_INSTRUCTIONS = (
    "Rewrite the following request in different words. Keep its meaning and every detail (names, numbers, "
    "formats). Reply with the rewritten request only.",
    "Paraphrase the text below so that it reads differently but asks for exactly the same thing. "
    "Reply with the paraphrase only.",
    "Say the following in another way, keeping all facts unchanged. Reply with the new wording only.",
    "Rephrase this more briefly without losing any detail. Reply with the rephrased text only.",
    "Rephrase this more formally without changing what is asked. Reply with the rephrased text only.",
    "Rephrase this more casually without changing what is asked. Reply with the rephrased text only.",
    "Reword the following as a different person might ask it. Reply with the reworded text only.",
    "Restate the following request using other sentence structure. Reply with the restated text only.",
)


class ModelParaphraser:
    """Paraphrases written by a model behind ``generate_fn``; it knows nothing about models itself."""

    def __init__(self, generate_fn: GenerateFn, count: int = 2,
                 instructions: Sequence[str] = PARAPHRASE_INSTRUCTIONS):
        if not 1 <= count <= len(instructions):
            raise ValueError(f"count must be between 1 and {len(instructions)}, got {count}")
        self.generate_fn, self.instructions = generate_fn, list(instructions[:count])

    def __call__(self, texts: list[str]) -> list[list[str]]:
        convs = [[{"role": "user", "content": f"{instr}\n\n{text}"}] for text in texts for instr in self.instructions]
        outputs = self.generate_fn(convs)
        if len(outputs) != len(convs):
            raise ValueError(f"generate_fn returned {len(outputs)} replies for {len(convs)} conversations")
        k = len(self.instructions)
        return [_clean(text, outputs[i * k:(i + 1) * k]) for i, text in enumerate(texts)]


def _clean(original: str, outputs: list[str]) -> list[str]:
    """Drop empty replies, copies of the original and duplicates; strip wrapping quotes."""
    seen, out = {original.strip().lower()}, []
    for o in outputs:
        o = o.strip().strip('"').strip()
        if o and o.lower() not in seen:
            seen.add(o.lower())
            out.append(o)
    return out


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CachedParaphraser:
    """Wraps a Paraphraser with a JSON file keyed by sha256(text): each text is paraphrased once, ever."""

    def __init__(self, inner: Paraphraser, path: str | Path):
        self.inner, self.path = inner, Path(path)
        self.cache: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return dict(data["entries"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # a missing or damaged cache only costs recomputation

    def __call__(self, texts: list[str]) -> list[list[str]]:
        missing = list(dict.fromkeys(t for t in texts if text_key(t) not in self.cache))
        if missing:
            for text, paras in zip(missing, self.inner(missing), strict=True):
                self.cache[text_key(text)] = {"text": text, "paraphrases": list(paras)}
            self._save()
        return [list(self.cache[text_key(t)]["paraphrases"]) for t in texts]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": self.cache}, ensure_ascii=False, indent=1), "utf-8")
        os.replace(tmp, self.path)  # atomic: a crash leaves the old cache or the new one, never half of one


class Augmenter:
    """``apply(examples, epoch)`` gives that epoch's augmented copy of the training examples."""

    def __init__(self, cfg: AugmentConfig, seed: int, paraphraser: Paraphraser | None = None):
        if cfg.paraphrase and paraphraser is None:
            raise ValueError("train.augment.paraphrase is on but no paraphraser was given: pass "
                             "CachedParaphraser(ModelParaphraser(generate_fn, cfg.paraphrase_count), cache_file)")
        self.cfg, self.seed, self.paraphraser = cfg, seed, paraphraser

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.system_prompts) or c.prompt_noise > 0 or c.paraphrase

    def apply(self, examples: Sequence[Example], epoch: int) -> list[Example]:
        paraphrases = self._paraphrases(examples) if self.cfg.paraphrase else {}
        return [self._one(ex, random.Random(f"{self.seed}:{epoch}:{i}"), paraphrases)
                for i, ex in enumerate(examples)]

    def _paraphrases(self, examples: Sequence[Example]) -> dict[str, list[str]]:
        texts = list(dict.fromkeys(m.content for ex in examples if ex.messages
                                   for m in ex.messages if m.role == "user"))
        return dict(zip(texts, self.paraphraser(texts))) if texts else {}

    def _one(self, ex: Example, rng: random.Random, paraphrases: dict[str, list[str]]) -> Example:
        if ex.messages is None:
            return ex
        msgs = list(ex.messages)
        # The draws happen in a fixed order, so one setting does not shift another's randomness.
        if paraphrases:
            # The original stays one of the choices, so the real prompt is still seen in some epochs.
            msgs = [replace(m, content=rng.choice([m.content] + paraphrases.get(m.content, [])))
                    if m.role == "user" else m for m in msgs]
        if self.cfg.system_prompts and rng.random() < self.cfg.system_prompt_prob:
            msgs = _with_system(msgs, rng.choice(self.cfg.system_prompts))
        if self.cfg.prompt_noise > 0:
            msgs = [replace(m, content=noise(m.content, self.cfg.prompt_noise, rng)) if m.role == "user" else m
                    for m in msgs]
        return replace(ex, messages=tuple(msgs))


def _with_system(msgs: list[Message], prompt: str) -> list[Message]:
    if msgs and msgs[0].role == "system":
        return [replace(msgs[0], content=prompt)] + msgs[1:]
    return [Message("system", prompt)] + msgs


def noise(text: str, p: float, rng: random.Random) -> str:
    """Per character with chance p: flip its case, drop it, or double it (typo-like, meaning kept)."""
    out = []
    for c in text:
        if rng.random() >= p:
            out.append(c)
            continue
        op = rng.randrange(3)
        if op == 0:
            out.append(c.swapcase() if len(c.swapcase()) == 1 else c)
        elif op == 2:
            out.append(c + c)
    noisy = "".join(out)
    return noisy if noisy.strip() else text  # never empty a prompt
