"""Prompt-only data for reinforcement fine-tuning: the prompts the model answers, with the fields its grader reads.

| format   | a record                                                        | as                                     |
|----------|-----------------------------------------------------------------|----------------------------------------|
| messages | ``messages`` ending with a user turn, plus any other fields     | OpenAI's reinforcement fine-tuning JSONL |
| prompt   | ``prompt`` (a string or a message list), plus any other fields  | TRL's prompt-only format               |

The whole record is the grader's ``item`` (``{{item.reference_answer}}``, a reward function's extra columns); the
conversation is what the model answers. Every issue of every file is gathered before anything raises, with file,
line and code, as for the other formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, Issue
from .example import Message, Origin
from .formats import convert, not_an_object
from .loading import holdout_split
from .readers import read_file

PROMPT_ROW_FORMATS = ("messages", "prompt")


@dataclass(frozen=True)
class PromptRow:
    messages: tuple[Message, ...]  # ends with the user turn the model answers
    item: dict[str, Any]  # the record as read: what a grader reads as {{item.<field>}}
    origin: Origin


@dataclass
class PromptSplits:
    train: list[PromptRow]
    valid: list[PromptRow]
    format: str | None = None
    issues: list[Issue] = field(default_factory=list)


def read_prompt_rows(path: str | Path) -> tuple[list[PromptRow], str | None, list[Issue]]:
    """(rows, format, issues) of one file; a record needs ``messages`` or ``prompt`` and must end with a user turn."""
    raw = read_file(path)
    issues, rows, fmt = list(raw.issues), [], None
    for rec, origin in raw.records:
        if not isinstance(rec, dict):
            issues.append(not_an_object(rec, origin))
            continue
        own = next((f for f in PROMPT_ROW_FORMATS if f in rec), None)
        if own is None:
            issues.append(Issue("E035", f"fields {sorted(rec)}: a reinforcement fine-tuning row needs 'messages' (ending "
                                        "with a user turn) or 'prompt'", origin.path, origin.line, None, origin.unit))
            continue
        fmt = fmt or own
        example, found = convert(rec, own, origin, prompt_only=True)
        issues += found
        if example is None:
            continue
        if example.messages[-1].role != "user":
            issues.append(Issue("E036", "the conversation must end with a user turn: the answer is what the model "
                                        "samples and the grader scores (move a reference answer to a field of its own, "
                                        "e.g. 'reference_answer', and read it in the grader as {{item.reference_answer}})",
                                origin.path, origin.line, own, origin.unit))
            continue
        rows.append(PromptRow(example.messages, rec, origin))
    return rows, fmt, issues


def collect_prompt_splits(cfg, seed: int) -> PromptSplits:
    """Training and validation prompts (data.valid, else data.valid_fraction held out of data.train), every issue."""
    if not cfg.train:
        return PromptSplits([], [], None, [Issue("E016", "no training file: set data.train (or pass --data FILE)")])
    train, fmt, issues = read_prompt_rows(cfg.train)
    if cfg.valid:
        valid, _, more = read_prompt_rows(cfg.valid)
        issues += more
    else:
        train, valid = holdout_split(train, cfg.valid_fraction, seed)
    if not issues and len(train) < cfg.min_examples:
        issues.append(Issue("E015", f"{len(train)} training prompts; data.min_examples is {cfg.min_examples}: add "
                                    "prompts or lower data.min_examples", cfg.train))
    return PromptSplits(train, valid, fmt, issues)


def load_prompt_splits(cfg, seed: int) -> PromptSplits:
    """``collect_prompt_splits``, raising DataError with every issue."""
    splits = collect_prompt_splits(cfg, seed)
    if splits.issues:
        raise DataError(splits.issues)
    return splits
