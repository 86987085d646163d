"""A local model as the harmful-content screen: any Hugging Face sequence-classification model on disk.

``safety.moderator: PATH`` names the folder of a text classifier (a toxicity or harm classifier saved with
``save_pretrained``: config, weights, tokenizer). It runs offline on the machine that trains: nothing is sent
anywhere. Which of its labels mean harmful comes from ``safety.moderator_labels``, or from the label names
(``toxic``, ``unsafe``, ``hate``, ``violence``, ... are harmful; ``safe``, ``non-toxic``, ``neutral`` are not), or,
for a two-label model with unnamed labels (``LABEL_0``/``LABEL_1``), label 1. A text is flagged in every harmful
label whose probability reaches ``safety.moderator_threshold``: softmax over the labels for a single-label model,
a sigmoid per label for a multi-label one (``problem_type: multi_label_classification``). Texts longer than
``safety.moderator_max_length`` tokens are read in overlapping windows and scored by their worst window.

The classifier's quality is the user's to know: the screen only applies it. ``python -m
tunesmith.safety.screen_eval --set moderator=PATH`` measures it on the project's labelled held-out set.
"""

from __future__ import annotations

import re
from pathlib import Path

_BENIGN = re.compile(r"^(?:non|not|no)[-_ ]?|^(?:safe|benign|neutral|ok|okay|normal|clean|none|acceptable|"
                     r"appropriate|negative|harmless|label_0)$")
_HARMFUL = re.compile(r"toxic|harm|unsafe|hate|hateful|violen|threat|insult|obscen|sexual|harass|offensive|abus|"
                      r"danger|illegal|crim|weapon|terror|nsfw|porn|self[-_ ]?harm|extrem|flag|severe|identity_attack|"
                      r"jailbreak|injection")


class ModeratorError(Exception):
    """The moderator model cannot be loaded or its labels cannot be read (a configuration problem)."""


def harmful_labels(id2label: dict[int, str], wanted: list[str] | None = None) -> dict[int, str]:
    """``{index: label}`` of the labels that mean harmful (``wanted`` names them; else inferred from the names)."""
    names = {int(i): str(n) for i, n in id2label.items()}
    if wanted:
        low = {w.lower(): w for w in wanted}
        picked = {i: n for i, n in names.items() if n.lower() in low}
        unknown = sorted(set(low) - {n.lower() for n in picked.values()})
        if unknown:
            raise ModeratorError(f"safety.moderator_labels names {unknown}, which the model does not have; its "
                                 f"labels: {sorted(names.values())}")
        return picked
    picked = {i: n for i, n in names.items() if not _BENIGN.search(n.lower()) and _HARMFUL.search(n.lower())}
    if picked:
        return picked
    if len(names) == 2 and sorted(names) == [0, 1]:
        return {1: names[1]}  # the usual convention of an unnamed binary classifier: label 1 is the positive class
    raise ModeratorError(f"cannot tell which of the moderator's labels {sorted(names.values())} mean harmful: "
                         "name them in safety.moderator_labels")


class Moderator:
    """``Moderator(path)(texts) -> [set of harmful label names]``; ``.scores(texts)`` gives the probabilities."""

    def __init__(self, path: str | Path, labels: list[str] | None = None, threshold: float = 0.5,
                 max_length: int = 512, batch_size: int = 16, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModeratorError(f"safety.moderator: {path} is not a saved Hugging Face model folder (no config.json); "
                                 "unset it to use the built-in lexicon")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModeratorError(f"safety.moderator: cannot load a sequence classifier from {path}: {e}") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.labels = {int(i): str(n) for i, n in cfg.id2label.items()}
        self.harmful = harmful_labels(self.labels, labels)
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification" or len(self.labels) == 1
        self.threshold, self.batch_size, self.path = threshold, batch_size, path
        limit = getattr(self.tokenizer, "model_max_length", None) or max_length
        self.max_length = min(max_length, limit if limit < 100_000 else max_length)

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], <s> ... </s>)."""
        tok = self.tokenizer
        full, body = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
        for i in range(len(full) - len(body) + 1):
            if full[i:i + len(body)] == body:
                return full[:i], full[i + len(body):]
        return [], []

    def _windows(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each window (special tokens added) and the text each belongs to."""
        head, tail = self._specials()
        room = max(1, self.max_length - len(head) - len(tail))
        stride = max(1, room // 2)
        ids, owner = [], []
        for i, text in enumerate(texts):
            body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            starts = range(0, max(1, len(body) - room + stride), stride) if len(body) > room else [0]
            for s in starts:
                ids.append(head + body[s:s + room] + tail)
                owner.append(i)
        return ids, owner

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, the probability of each label (the worst window's, for a long text)."""
        import torch

        ids, owner = self._windows(texts)
        out: list[dict[str, float] | None] = [None] * len(texts)
        pad = self.tokenizer.pad_token_id or 0
        for b in range(0, len(ids), self.batch_size):
            chunk = ids[b:b + self.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            for row, i in zip(probs.tolist(), owner[b:b + self.batch_size]):
                got = {self.labels[j]: p for j, p in enumerate(row)}
                prev = out[i]
                out[i] = got if prev is None or _worst(got, self.harmful) > _worst(prev, self.harmful) else prev
        return [o or {} for o in out]

    def __call__(self, texts: list[str]) -> list[set[str]]:
        return [{n for n in self.harmful.values() if s.get(n, 0.0) >= self.threshold} for s in self.scores(texts)]


def _worst(scores: dict[str, float], harmful: dict[int, str]) -> float:
    return max(scores.get(n, 0.0) for n in harmful.values())


def moderator_factory(cfg) -> Moderator:
    if not cfg.moderator:
        raise ModeratorError("safety.harmful_screens names `moderator` but safety.moderator (a local model folder) "
                             "is not set")
    return Moderator(cfg.moderator, cfg.moderator_labels, cfg.moderator_threshold, cfg.moderator_max_length)
