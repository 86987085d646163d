"""Precision and recall of the data screen's harmful-content screens on the labelled sets.

    python -m tunesmith.safety.screen_eval                     # the held-out part, with the default screens
    python -m tunesmith.safety.screen_eval --part dev --misses # the development part, each miss listed
    python -m tunesmith.safety.screen_eval --set moderator=PATH --set moderator_threshold=0.7
    python -m tunesmith.safety.screen_eval --pii               # the PII finders on the held-out PII lines

The held-out part (``labelled/screen_test.jsonl``) was written before the lexicon was tuned and is kept
apart: only its totals are printed (``--misses`` lists rows of the development part only). Each row is
screened as training does it: the texts of its messages joined, through the screens the SafetyConfig
builds (``safety.harmful_screens``, the moderator when ``safety.moderator`` is set).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

LABELLED = Path(__file__).resolve().parent / "labelled"
PARTS = {"test": LABELLED / "screen_test.jsonl", "dev": LABELLED / "screen_dev.jsonl"}
PII_PARTS = {"test": LABELLED / "pii_test.jsonl", "dev": LABELLED / "pii_dev.jsonl"}


def load_rows(part: str = "test") -> list[dict]:
    path = PARTS[part] if part in PARTS else Path(part)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def row_text(row: dict) -> str:
    """What the screen sees of a labelled row: its messages' texts joined, as screen.py joins an example's."""
    return "\n".join(m["content"] for m in row["messages"]) if "messages" in row else row["text"]


@dataclass
class ScreenScore:
    harmful: int = 0
    benign: int = 0
    caught: int = 0  # harmful rows flagged
    false_flags: int = 0  # benign rows flagged
    misses: list[dict] = field(default_factory=list)
    wrong: list[dict] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.harmful if self.harmful else 0.0

    @property
    def false_positive_rate(self) -> float:
        return self.false_flags / self.benign if self.benign else 0.0

    @property
    def precision(self) -> float:
        flagged = self.caught + self.false_flags
        return self.caught / flagged if flagged else 0.0

    def to_dict(self) -> dict:
        return {"harmful": self.harmful, "benign": self.benign, "caught": self.caught, "false_flags": self.false_flags,
                "recall": self.recall, "false_positive_rate": self.false_positive_rate, "precision": self.precision}


def score_screens(rows: list[dict], cfg=None) -> ScreenScore:
    """Run every screen a SafetyConfig builds over ``rows``; a row is flagged when any screen flags it."""
    from ..config import SafetyConfig
    from .harmful import build_screens

    cfg = cfg or SafetyConfig()
    texts = [row_text(r) for r in rows]
    flags = [set() for _ in rows]
    for name, screen in build_screens(cfg).items():
        for i, cats in enumerate(screen(texts)):
            flags[i] |= {f"{name}:{c}" for c in cats}
    out = ScreenScore()
    for row, hit in zip(rows, flags):
        if row["label"] == "harmful":
            out.harmful += 1
            out.caught += bool(hit)
            if not hit:
                out.misses.append(row)
        else:
            out.benign += 1
            out.false_flags += bool(hit)
            if hit:
                out.wrong.append(row | {"flagged": sorted(hit)})
    return out


# ---------------------------------------------------------------- PII


@dataclass
class PiiScore:
    lines: int = 0
    spans: int = 0  # marked spans
    found: int = 0  # marked spans overlapped by a finding of the same category
    findings: int = 0
    true_findings: int = 0  # findings that overlap a marked span of their category
    per_category: dict = field(default_factory=dict)  # category -> [marked, found]
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (category, span, line)
    false: list[tuple[str, str, str]] = field(default_factory=list)  # (category, value, line)

    @property
    def recall(self) -> float:
        return self.found / self.spans if self.spans else 0.0

    @property
    def precision(self) -> float:
        return self.true_findings / self.findings if self.findings else 0.0

    def to_dict(self) -> dict:
        return {"lines": self.lines, "spans": self.spans, "found": self.found, "findings": self.findings,
                "true_findings": self.true_findings, "recall": self.recall, "precision": self.precision,
                "per_category": self.per_category}


def score_pii(rows: list[dict], find) -> PiiScore:
    """``find(text) -> [Finding]`` against the marked spans: a span counts as found when a finding of its category
    overlaps it; a finding counts as true when it overlaps a marked span of its category."""
    out = PiiScore()
    for row in rows:
        text = row["text"]
        out.lines += 1
        marked = []
        for cat, value in row.get("spans", []):
            start = text.find(value)
            if start < 0:
                raise ValueError(f"{row.get('id')}: span {value!r} is not in its text")
            marked.append((cat, start, start + len(value), value))
        findings = find(text)
        out.findings += len(findings)
        for f in findings:
            if any(c == f.category and f.start < e and s < f.end for c, s, e, _ in marked):
                out.true_findings += 1
            else:
                out.false.append((f.category, f.value, text))
        for cat, s, e, value in marked:
            counts = out.per_category.setdefault(cat, [0, 0])
            counts[0] += 1
            out.spans += 1
            if any(f.category == cat and f.start < e and s < f.end for f in findings):
                out.found += 1
                counts[1] += 1
            else:
                out.misses.append((cat, value, text))
    return out


def pii_finder(cfg=None, engine: str = "default"):
    """The screen's finder under a SafetyConfig: ``default`` (what training uses), or ``regex`` (the pattern
    and checksum finders alone, as before Presidio)."""
    from ..config import SafetyConfig
    from .pii import find_pii

    cfg = cfg or SafetyConfig()
    if engine == "regex":
        return lambda text: find_pii(text, cfg.pii_categories, cfg.phone_regions, presidio=False)
    return lambda text: find_pii(text, cfg.pii_categories, cfg.phone_regions, ner=cfg.pii_ner)


# ---------------------------------------------------------------- command


def _config(sets: list[str]):
    import yaml

    from ..config import SafetyConfig

    values = {}
    for item in sets:
        key, _, value = item.partition("=")
        values[key.removeprefix("safety.")] = yaml.safe_load(value)
    return SafetyConfig(**values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunesmith.safety.screen_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="test", help="test (held out, default), dev, or a JSONL file of labelled rows")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a safety: setting, e.g. moderator=PATH")
    p.add_argument("--misses", action="store_true", help="list the rows the screen got wrong (not for the test part)")
    p.add_argument("--pii", action="store_true", help="score the PII finders on labelled/pii_test.jsonl (or pii_dev.jsonl "
                   "with --part dev) instead")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--train-words", action="store_true", help="retrain the lexicon's word model on the development "
                   "part and write labelled/screen_words.json")
    args = p.parse_args(argv)
    if args.train_words:
        from .lexicon import WORDS_FILE, train_word_model

        rows = load_rows("dev")
        model = train_word_model([(row_text(r), r["label"] == "harmful") for r in rows])
        WORDS_FILE.write_text(json.dumps(model, indent=0, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {WORDS_FILE} ({len(model['weights'])} features from {len(rows)} development rows)")
        return 0
    cfg = _config(args.set)
    if args.misses and args.part == "test":
        p.error("--misses lists rows of the development part only: the held-out part stays unread while tuning")
    if args.pii:
        path = PII_PARTS.get(args.part, Path(args.part))
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        result = {}
        for engine in ("regex", "default"):
            s = score_pii(rows, pii_finder(cfg, engine))
            result[engine] = s
        if args.json:
            print(json.dumps({k: v.to_dict() for k, v in result.items()}, indent=2))
            return 0
        from .pii import pii_engine_note

        print(f"PII finders on {path.name}: {result['default'].lines} lines, {result['default'].spans} marked spans")
        for engine, s in result.items():
            label = "patterns and checksums only" if engine == "regex" else "the screen (" + pii_engine_note(cfg.pii_ner) + ")"
            print(f"  {label}: recall {s.recall:.3f} ({s.found}/{s.spans}), precision {s.precision:.3f} "
                  f"({s.true_findings}/{s.findings})")
            print("    " + ", ".join(f"{c} {f}/{m}" for c, (m, f) in sorted(s.per_category.items())))
        if args.misses:
            s = result["default"]
            for cat, value, text in s.misses:
                print(f"  missed {cat}: {value!r} in {text!r}")
            for cat, value, text in s.false:
                print(f"  false {cat}: {value!r} in {text!r}")
        return 0
    rows = load_rows(args.part)
    s = score_screens(rows, cfg)
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    from .harmful import screen_names

    screens = ", ".join(screen_names(cfg))
    print(f"data screen ({screens}) on the {args.part} part: {s.harmful} harmful rows, {s.benign} benign rows")
    print(f"  recall {s.recall:.3f} ({s.caught}/{s.harmful} harmful flagged)")
    print(f"  false positives {s.false_positive_rate:.3f} ({s.false_flags}/{s.benign} benign flagged)")
    print(f"  precision {s.precision:.3f}")
    if args.misses:
        for r in s.misses:
            print(f"  missed {r['id']} ({r['topic']}): {row_text(r)[:160]!r}")
        for r in s.wrong:
            print(f"  flagged {r['id']} ({r['topic']}) as {r['flagged']}: {row_text(r)[:160]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
