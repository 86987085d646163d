"""Preflight for preference objectives (dpo, orpo, simpo, kto): the PreflightReport of ``preflight.py``,
filled from the pairs (or unpaired answers) that training would read and render.

Per split: examples are pairs (kto: labelled answers, a pair counting as two), tokens the prompt plus
every answer, trained the scored answer tokens, both before data.max_length (which bounds the prompt
plus the longest answer: a pair is two sequences sharing the prompt). A sample shows the prompt once,
then each answer with its scored tokens marked, as ``preference.show_pair`` writes it.
"""

from __future__ import annotations

from ..config import Config
from .errors import DataError, Issue
from .example import Example
from .preference import (Pair, Preference, PreferenceSplits, RenderedPair, RenderedUnpaired, pair_spans,
                         collect_preference_splits, render_preferences_all)
from .preflight import SAMPLES, LengthStats, PreflightReport, SplitReport

STATS_NOTE = ("tokens: prompt + answers, trained: scored answer tokens; min/mean/p50/p95/max per item, before "
              "max_length (which bounds prompt + the longest answer)")


def preflight_preferences(cfg: Config, tokenizer,
                          collected: tuple[PreferenceSplits | None, list[Issue]] | None = None) -> PreflightReport:
    """``preflight`` for ``cfg.objective.name`` other than sft; ``collected`` is what
    ``collect_preference_splits(cfg.data, cfg.train.seed, cfg.objective.name)`` returned, if the caller has it."""
    d, objective = cfg.data, cfg.objective.name
    settings = {"objective": objective, "format": d.format, "max_length": d.max_length, "overflow": d.overflow,
                "chat_template": cfg.model.chat_template or "tokenizer's own"}
    splits, issues = collected if collected is not None else collect_preference_splits(d, cfg.train.seed, objective)
    issues = list(issues)  # the caller's list stays as it was
    named = []
    if splits is not None:
        named = [("train", d.train, splits.format, splits.train),
                 ("valid", d.valid or f"{d.train} (held out: valid_fraction={d.valid_fraction})",
                  splits.valid_format or splits.format, splits.valid)]
    if d.test:  # read as the run's base-versus-tuned comparison reads it
        test_cfg = d.model_copy(update={"train": d.test, "valid": None, "valid_fraction": 0.0})
        test, test_issues = collect_preference_splits(test_cfg, cfg.train.seed, objective)
        issues += test_issues
        named.append(("test", d.test, test.format if test else None, test.train if test else []))
    reports, samples = [], []
    for name, path, fmt, items in named:
        report, rendered = _split_report(name, path, fmt, items, tokenizer, cfg, issues)
        reports.append(report)
        if name == "train":
            samples = [(str(it.origin), pair_spans(it, tokenizer)) for it in rendered[:SAMPLES]]
    return PreflightReport(not issues, settings, reports, issues, samples, STATS_NOTE)


def _split_report(name, path, fmt, items: list[Preference], tokenizer, cfg: Config, issues: list[Issue]):
    report = SplitReport(name, path, fmt, len(items))
    try:
        result = render_preferences_all(items, tokenizer, cfg.data, cfg.model.chat_template)
    except DataError as e:  # the chat template itself is missing or unknown
        issues += e.issues
        return report, []
    issues += result.issues
    report.tokens = LengthStats.of([sum(n) for n in result.lengths])  # (prompt, answer...) per item
    report.trained = LengthStats.of([sum(n[1:]) for n in result.lengths])
    report.truncated, report.dropped, report.overflows = result.truncated, result.dropped, result.overflows
    return report, result.items


def screened_chats(items: list[Preference]) -> list[Example]:
    """Each item as the chat the data screen checks, as training's screen (objectives.preference.screen_pairs) builds
    it: the prompt and the answer trained toward (a pair's chosen one, a desirable answer). Rejected and undesirable
    answers are what the model is trained away from, and safety preference data holds harmful ones on purpose, so
    an undesirable answer's prompt is screened alone."""
    out = []
    for it in items:
        answer = it.chosen if isinstance(it, Pair) else (it.completion if it.desirable else None)
        out.append(Example(tuple(it.prompt) + ((answer,) if answer else ()), None, it.origin))
    return out
