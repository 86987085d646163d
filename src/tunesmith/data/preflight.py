"""Preflight: everything `tunesmith check CONFIG` shows, computed with the tokenizer only.

Per split: examples, format, token-length statistics (before max_length is applied), what
max_length would truncate or drop and why, every data issue, and two rendered training examples
with the trained spans marked ``[[like this]]`` (green in the terminal).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..config import Config
from .errors import DataError, Issue
from .loading import Splits, collect_splits, read_examples
from .render import IGNORE, Overflow, RenderedExample, render_all

if TYPE_CHECKING:
    from .preference import PreferenceSplits  # preference.py imports this module

SAMPLES = 2
LISTED = 10  # overflow rows and issues shown in the terminal (to_dict has them all)
_HEADER = ("split", "examples", "format", "tokens", "trained", "truncated", "dropped")
_STATS_NOTE = "tokens / trained: min/mean/p50/p95/max per example, before max_length"


@dataclass(frozen=True)
class LengthStats:
    min: int
    mean: float
    p50: int
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> "LengthStats | None":
        if not values:
            return None
        v = sorted(values)
        rank = lambda q: v[max(0, math.ceil(q * len(v)) - 1)]  # noqa: E731  nearest-rank percentile
        return cls(v[0], round(sum(v) / len(v), 1), rank(0.5), rank(0.95), v[-1])

    def format(self) -> str:
        return f"{self.min}/{self.mean:g}/{self.p50}/{self.p95}/{self.max}"


@dataclass
class SplitReport:
    name: str
    path: str | None
    format: str | None
    examples: int
    tokens: LengthStats | None = None  # rendered length, before max_length
    trained: LengthStats | None = None  # target tokens (after the causal shift), before max_length
    truncated: int = 0
    dropped: int = 0
    overflows: list[Overflow] = field(default_factory=list)


@dataclass
class PreflightReport:
    ok: bool
    settings: dict
    splits: list[SplitReport]
    issues: list[Issue]
    samples: list[tuple[str, list[tuple[str, bool]]]]  # (origin, [(text, trained)])
    note: str = _STATS_NOTE  # what the tokens / trained columns count

    def marked_samples(self) -> list[str]:
        """Plain-text renderings with trained text wrapped in [[...]]."""
        return [mark_plain(spans) for _, spans in self.samples]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "settings": self.settings,
            "splits": [_split_dict(s) for s in self.splits],
            "issues": [i.to_dict() for i in self.issues],
            "issue_counts": dict(sorted(Counter(i.code for i in self.issues).items())),
            "note": self.note,
            "samples": [{"origin": o, "marked": mark_plain(sp), "spans": [{"text": t, "trained": tr} for t, tr in sp]}
                        for o, sp in self.samples],
        }

    def format(self) -> str:
        lines = [f"data check: {'OK' if self.ok else f'{len(self.issues)} issue(s)'}",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        rows = [list(_HEADER)] + [_split_row(s) for s in self.splits]
        widths = [max(len(r[c]) for r in rows) for c in range(len(_HEADER))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines += [self.note] + [f"{s.name}: {s.path}" for s in self.splits]
        lines += _overflow_lines(self)
        if self.issues:
            lines += ["", DataError(self.issues).format(limit=LISTED)]
        for n, (origin, spans) in enumerate(self.samples, 1):
            lines += ["", f"example {n} ({origin}); trained tokens in [[...]]:", mark_plain(spans)]
        return "\n".join(lines)

    def print(self, console) -> None:
        """Rich rendering for the terminal: a table of splits, issues, examples with trained text in green."""
        from rich.table import Table
        from rich.text import Text

        console.print(Text(f"data check: {'OK' if self.ok else f'{len(self.issues)} issue(s)'}",
                           style="bold green" if self.ok else "bold red"))
        console.print(Text("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())))
        table = Table(*_HEADER, caption=self.note)
        for s in self.splits:
            table.add_row(*_split_row(s))
        console.print(table)
        for s in self.splits:
            console.print(Text(f"{s.name}: {s.path}"))
        for line in _overflow_lines(self):
            console.print(Text(line))
        if self.issues:
            console.print(Text(DataError(self.issues).format(limit=LISTED), style="red"))
        for n, (origin, spans) in enumerate(self.samples, 1):
            console.print(Text(f"\nexample {n} ({origin}); trained tokens in green:", style="bold"))
            console.print(Text.assemble(*[(t, "bold green" if tr else "dim") for t, tr in spans]))


def _split_row(s: SplitReport) -> list[str]:
    return [s.name, str(s.examples), str(s.format), s.tokens.format() if s.tokens else "-",
            s.trained.format() if s.trained else "-", str(s.truncated), str(s.dropped)]


def _split_dict(s: SplitReport) -> dict:
    d = asdict(s)
    d["overflows"] = [{"origin": str(o.origin), "length": o.length, "trained": o.trained, "action": o.action,
                       "trained_after": o.trained_after} for o in s.overflows]
    return d


def _overflow_lines(report: PreflightReport) -> list[str]:
    rows = [(s.name, o) for s in report.splits for o in s.overflows]
    if not rows:
        return []
    limit = report.settings["max_length"]
    lines = ["", f"{len(rows)} example(s) longer than max_length={limit} (overflow={report.settings['overflow']}):"]
    for name, o in rows[:LISTED]:
        left = f", {o.trained_after} trained tokens left" if o.trained_after is not None else ""
        lines.append(f"  {name} {o.origin}: {o.length} tokens ({o.trained} trained) -> {o.action}{left}")
    if len(rows) > LISTED:
        lines.append(f"  ... and {len(rows) - LISTED} more")
    return lines


# ---------------------------------------------------------------- marking trained spans


def trained_spans(item: RenderedExample, tokenizer) -> list[tuple[str, bool]]:
    """Decode runs of consecutive trained / untrained tokens: [(text, trained)]."""
    spans: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(item.input_ids) + 1):
        if t == len(item.input_ids) or (item.labels[t] != IGNORE) != (item.labels[start] != IGNORE):
            text = tokenizer.decode(item.input_ids[start:t], skip_special_tokens=False)
            spans.append((text, item.labels[start] != IGNORE))
            start = t
    return spans


def mark_plain(spans: list[tuple[str, bool]]) -> str:
    return "".join(f"[[{t}]]" if tr else t for t, tr in spans)


# ---------------------------------------------------------------- the check


def preflight(cfg: Config, tokenizer,
              collected: tuple[Splits | PreferenceSplits | None, list[Issue]] | None = None) -> PreflightReport:
    """Load, validate and render every split as training would, without raising; see PreflightReport.

    ``collected``: what ``collect_splits(cfg.data, cfg.train.seed)`` returned (for a preference objective,
    ``collect_preference_splits(cfg.data, cfg.train.seed, cfg.objective.name)``), when the caller has it
    already (``tunesmith check`` screens the same splits), so the files are not read twice.
    """
    if cfg.objective.name != "sft":
        from .preflight_preference import preflight_preferences  # imports this module

        return preflight_preferences(cfg, tokenizer, collected)
    d = cfg.data
    settings = {"objective": "sft", "format": d.format, "max_length": d.max_length, "overflow": d.overflow,
                "train_on": d.train_on, "chat_template": cfg.model.chat_template or "tokenizer's own"}
    splits, issues = collected if collected is not None else collect_splits(d, cfg.train.seed)
    issues = list(issues)  # the caller's list stays as it was
    named = []
    if splits is not None:
        named = [("train", d.train, splits.format, splits.train),
                 ("valid", d.valid or f"{d.train} (held out: valid_fraction={d.valid_fraction})",
                  splits.valid_format or splits.format, splits.valid)]
    if d.test:
        test = read_examples(d.test, d.format)
        issues += test.issues
        named.append(("test", d.test, test.format, test.examples))
    reports, samples = [], []
    for name, path, fmt, examples in named:
        report, split_issues, items = _split_report(name, path, fmt, examples, tokenizer, cfg)
        reports.append(report)
        issues += split_issues
        if name == "train":
            samples = [(str(it.origin), trained_spans(it, tokenizer)) for it in items[:SAMPLES]]
    return PreflightReport(not issues, settings, reports, issues, samples)


def _split_report(name, path, fmt, examples, tokenizer, cfg: Config):
    report = SplitReport(name, path, fmt, len(examples))
    try:
        result, issues = render_all(examples, tokenizer, cfg.data, cfg.model.chat_template)
    except DataError as e:  # the chat template itself is missing or unknown
        return report, e.issues, []
    report.tokens = LengthStats.of([n for n, _ in result.lengths])
    report.trained = LengthStats.of([t for _, t in result.lengths])
    report.truncated, report.dropped, report.overflows = result.truncated, result.dropped, result.overflows
    return report, issues, result.items

