"""Screen a dataset before training: personal data and secrets (report / redact / refuse), harmful content.

``screen_splits(splits, safety_cfg) -> (splits, ScreenReport)`` never raises for what it finds: it
returns the splits to train on (redacted under ``pii_policy: redact``) and a report whose ``refusals``
say why the data must not be used. ``screen_training_data`` is what the training loop calls: it raises
``SafetyDataError`` (exit code 2) on a refusal. ``tunesmith check`` prints the report.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from .harmful import build_screens
from .pii import find_pii, pii_engine_note, redact

LISTED = 10  # rows of findings shown in the terminal (to_dict has them all)


@dataclass(frozen=True)
class PiiHit:
    split: str
    where: str  # file:line (or file[record])
    field: str  # messages[1].content (user), or text
    category: str
    kind: str
    preview: str  # masked: a report must not repeat the secret it found


@dataclass(frozen=True)
class Flagged:
    split: str
    where: str
    screens: dict[str, list[str]]  # screen name -> categories


@dataclass
class ScreenReport:
    examples: int
    pii_policy: str
    harmful_policy: str
    harmful_limit: str  # the refusal threshold, in words
    pii_hits: list[PiiHit] = field(default_factory=list)
    pii_examples: int = 0  # examples with at least one finding
    redacted: int = 0  # findings replaced by placeholders
    flagged: list[Flagged] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the screen ran (e.g. names without NER)

    @property
    def ok(self) -> bool:
        return not self.refusals

    @property
    def pii_counts(self) -> dict[str, int]:
        return dict(Counter(h.category for h in self.pii_hits).most_common())

    def harmful_counts(self) -> dict[str, dict[str, int]]:
        """screen -> category -> examples flagged."""
        out: dict[str, Counter] = {}
        for f in self.flagged:
            for screen, cats in f.screens.items():
                out.setdefault(screen, Counter()).update(cats)
        return {s: dict(c.most_common()) for s, c in out.items()}

    @property
    def flagged_fraction(self) -> float:
        return len(self.flagged) / self.examples if self.examples else 0.0

    def to_dict(self) -> dict:
        return {"ok": self.ok, "examples": self.examples, "refusals": self.refusals, "notes": self.notes,
                "pii": {"policy": self.pii_policy, "counts": self.pii_counts, "examples_with_pii": self.pii_examples,
                        "redacted": self.redacted, "findings": [dataclasses.asdict(h) for h in self.pii_hits]},
                "harmful": {"policy": self.harmful_policy, "limit": self.harmful_limit,
                            "flagged_examples": len(self.flagged), "flagged_fraction": self.flagged_fraction,
                            "counts": self.harmful_counts(), "flagged": [dataclasses.asdict(f) for f in self.flagged]}}

    def summary(self) -> str:
        """One line: counts per category and what was done."""
        pii = ", ".join(f"{c} {n}" for c, n in self.pii_counts.items()) or "none"
        done = f", {self.redacted} redacted" if self.redacted else ""
        harm = "; ".join(f"{s}: " + ", ".join(f"{c} {n}" for c, n in cats.items())
                         for s, cats in self.harmful_counts().items()) or "none"
        return (f"safety screen of {self.examples} examples: personal data {pii}{done}; "
                f"harmful content {len(self.flagged)} flagged ({self.flagged_fraction:.1%}; {harm})")

    def format(self) -> str:
        lines = [f"safety screen: {'OK' if self.ok else 'REFUSED'} ({self.examples} examples)"]
        lines += [f"  refused: {r}" for r in self.refusals]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"personal data and secrets (safety.pii_policy: {self.pii_policy}): {len(self.pii_hits)} "
                     f"finding(s) in {self.pii_examples} example(s)"
                     + (f", {self.redacted} redacted" if self.redacted else ""))
        if self.pii_hits:
            lines.append("  " + ", ".join(f"{c} {n}" for c, n in self.pii_counts.items()))
        lines += [f"  {h.where} {h.field}: {h.category} ({h.kind}) {h.preview}" for h in self.pii_hits[:LISTED]]
        if len(self.pii_hits) > LISTED:
            lines.append(f"  ... and {len(self.pii_hits) - LISTED} more (--json lists them all)")
        lines.append(f"harmful content (safety.harmful_policy: {self.harmful_policy}, {self.harmful_limit}): "
                     f"{len(self.flagged)} example(s) flagged ({self.flagged_fraction:.1%})")
        for screen, cats in self.harmful_counts().items():
            lines.append(f"  {screen}: " + ", ".join(f"{c} {n}" for c, n in cats.items()))
        lines += [f"  {f.where}: " + "; ".join(f"{s}: {', '.join(c)}" for s, c in f.screens.items())
                  for f in self.flagged[:LISTED]]
        if len(self.flagged) > LISTED:
            lines.append(f"  ... and {len(self.flagged) - LISTED} more (--json lists them all)")
        return "\n".join(lines)


class SafetyDataError(Exception):
    """The data was refused by the safety screen; carries the report. Exit code 2."""

    def __init__(self, report: ScreenReport):
        self.report = report
        super().__init__("the safety screen refused the data:\n  " + "\n  ".join(report.refusals) + "\n"
                         + report.summary() + "\n(`tunesmith check CONFIG` lists every finding)")


# ---------------------------------------------------------------- screening


def _fields(example) -> list[tuple[str, str]]:
    """(field name, text) for every piece of text in an example."""
    if example.messages is None:
        return [("text", example.text)]
    return [(f"messages[{i}].content ({m.role})", m.content) for i, m in enumerate(example.messages)]


def _with_texts(example, texts: list[str]):
    if example.messages is None:
        return dataclasses.replace(example, text=texts[0])
    return dataclasses.replace(example, messages=tuple(dataclasses.replace(m, content=t)
                                                       for m, t in zip(example.messages, texts)))


def _limit_words(cfg) -> str:
    parts = [f"refused above {cfg.harmful_max_fraction:.0%} of examples"]
    if cfg.harmful_max_count is not None:
        parts.append(f"or at {cfg.harmful_max_count + 1} or more examples")
    return " ".join(parts)


def screen_examples(named: list[tuple[str, list]], cfg) -> tuple[list[list], ScreenReport]:
    """Screen ``[(split name, examples)]`` under a SafetyConfig; returns the examples to use and the report."""
    report = ScreenReport(sum(len(ex) for _, ex in named), cfg.pii_policy, cfg.harmful_policy, _limit_words(cfg))
    if "person" in cfg.pii_categories:
        report.notes.append("personal data: " + pii_engine_note(cfg.pii_ner))
    kept: list[list] = []
    for split, examples in named:
        out = []
        for ex in examples:
            texts, hit = [], False
            for name, text in _fields(ex):
                found = find_pii(text, cfg.pii_categories, cfg.phone_regions, ner=cfg.pii_ner)
                hit = hit or bool(found)
                report.pii_hits += [PiiHit(split, str(ex.origin), name, f.category, f.kind, f.masked()) for f in found]
                if found and cfg.pii_policy == "redact":
                    text = redact(text, found)
                    report.redacted += len(found)
                texts.append(text)
            report.pii_examples += hit
            changed = texts != [t for _, t in _fields(ex)]
            out.append(_with_texts(ex, texts) if changed else ex)
        kept.append(out)
    if report.pii_hits and cfg.pii_policy == "refuse":
        counts = ", ".join(f"{c} {n}" for c, n in report.pii_counts.items())
        report.refusals.append(f"personal data or secrets in {report.pii_examples} example(s) ({counts}) and "
                               "safety.pii_policy is refuse: remove them, or set safety.pii_policy to redact")
    _screen_harmful(named, kept, cfg, report)
    return kept, report


def _screen_harmful(named, kept, cfg, report: ScreenReport) -> None:
    # Screens see the text after redaction, so a remote moderation API never receives redacted data.
    rows = [(split, ex) for (split, _), examples in zip(named, kept) for ex in examples]
    texts = ["\n".join(t for _, t in _fields(ex)) for _, ex in rows]
    per_screen = {name: screen(texts) for name, screen in build_screens(cfg).items()} if texts else {}
    for i, (split, ex) in enumerate(rows):
        hits = {name: sorted(cats[i]) for name, cats in per_screen.items() if cats[i]}
        if hits:
            report.flagged.append(Flagged(split, str(ex.origin), hits))
    n = len(report.flagged)
    over_fraction = report.examples and n / report.examples > cfg.harmful_max_fraction
    over_count = cfg.harmful_max_count is not None and n > cfg.harmful_max_count
    if cfg.harmful_policy == "refuse" and n and (over_fraction or over_count):
        counts = "; ".join(f"{s}: " + ", ".join(f"{c} {k}" for c, k in cats.items())
                           for s, cats in report.harmful_counts().items())
        report.refusals.append(f"{n} of {report.examples} examples ({report.flagged_fraction:.1%}) flagged as harmful "
                               f"({counts}); limit: {report.harmful_limit} (safety.harmful_max_fraction, "
                               "safety.harmful_max_count; safety.harmful_policy: report only counts)")


def screen_splits(splits, cfg):
    """(splits with the examples to train on, ScreenReport) for the train and validation splits."""
    (train, valid), report = screen_examples([("train", splits.train), ("valid", splits.valid)], cfg)
    return dataclasses.replace(splits, train=train, valid=valid), report


def screen_training_data(splits, cfg, emit=None):
    """The training loop's call: screen, tell, and refuse (SafetyDataError) or return the splits to use."""
    new, report = screen_splits(splits, cfg)
    if emit is not None:
        from ..events import Message

        found = report.pii_hits or report.flagged
        for note in report.notes:
            emit(Message("info", note))
        emit(Message("warning" if found else "info", report.summary()))
    if not report.ok:
        raise SafetyDataError(report)
    return new


def screen_config(config) -> ScreenReport | None:
    """The report `tunesmith check` prints: the splits a Config names, screened (None without data)."""
    from ..data import collect_splits

    splits, _ = collect_splits(config.data, config.train.seed)  # data issues are the preflight's to report
    if splits is None:
        return None
    return screen_splits(splits, config.safety)[1]
