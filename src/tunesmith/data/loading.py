"""Files to validated Examples, and the train/validation split: what the training loop calls first.

Everything here runs before any model is loaded, and gathers every issue of every file before
raising, so one `tunesmith check` shows the whole list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from .errors import DataError, Issue
from .example import Example
from .formats import (FORMATS, PREFERENCE_REQUIRED, PROMPT_FORMATS, convert, detect, expected_fields, not_an_object,
                      required_fields)
from .readers import read_file


@dataclass
class Loaded:
    """One file, read and converted: examples, the format used, and every issue found."""

    path: str
    examples: list[Example] = field(default_factory=list)
    format: str | None = None
    issues: list[Issue] = field(default_factory=list)


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    format: str  # of the training file
    valid_format: str | None = None  # of the validation file; None when held out from train


def read_examples(path: str | Path, fmt: str = "auto", *, prompt_only: bool = False) -> Loaded:
    """Read and validate one file without raising; ``fmt`` is ``auto`` or one of FORMATS.

    ``prompt_only`` is for generation and eval, never training: records may hold a prompt without an
    answer (a conversation ending with a user turn, or one of PROMPT_FORMATS), and a file of preference
    records gives the prompts of its pairs (or KTO answers), whose answers are not used.
    """
    formats = (*FORMATS, *PROMPT_FORMATS, *PREFERENCE_REQUIRED) if prompt_only else FORMATS
    if fmt != "auto" and fmt not in formats:
        raise ValueError(f"unknown format {fmt!r}; use auto or one of {', '.join(formats)}")
    if prompt_only and fmt in PREFERENCE_REQUIRED:
        return _preference_prompts(path, fmt)
    raw = read_file(path)
    out = Loaded(str(path), issues=list(raw.issues))
    if not raw.records:
        return out
    out.format = _file_format(raw, out, prompt_only) if fmt == "auto" else _stated_format(raw, out, fmt)
    if prompt_only and out.format in PREFERENCE_REQUIRED:
        return _preference_prompts(path, fmt)  # read again by preference.py's reader, with its checks
    if out.format is None:
        return out
    for rec, origin in raw.records:
        own = detect(rec, prompt_only=prompt_only) if fmt == "auto" and isinstance(rec, dict) else out.format
        if own is None:
            out.issues.append(Issue("E005", f"fields {sorted(rec)} match no format; expected "
                                            f"{expected_fields(prompt_only)}", origin.path, origin.line, None,
                                    origin.unit))
        elif own != out.format:
            out.issues.append(Issue("E021", f"record is in format {own!r} but the file is {out.format!r}; "
                                            "keep one format per file", origin.path, origin.line, None, origin.unit))
        else:
            example, issues = convert(rec, out.format, origin, prompt_only=prompt_only)
            out.issues += issues
            if example is not None:
                out.examples.append(example)
    return out


def _preference_prompts(path: str | Path, fmt: str) -> Loaded:
    """The prompts of a preference file as data/preference.py reads it (every issue of the records included)."""
    from .preference import read_preference_file  # preference.py imports this module

    pref = read_preference_file(path, fmt)
    return Loaded(pref.path, [Example(item.prompt, None, item.origin) for item in pref.items], pref.format,
                  pref.issues)


def _table_issue(out: Loaded, message: str) -> Issue:
    csv_file = out.path.lower().endswith(".csv")
    return Issue("E018" if csv_file else "E019", message, out.path, 1 if csv_file else None)


def _stated_format(raw, out: Loaded, fmt: str) -> str | None:
    """A tabular file must have the stated format's columns (one issue, rather than one per row)."""
    missing = [c for c in required_fields(prompt_only=True)[fmt] if raw.columns is not None and c not in raw.columns]
    if missing:
        out.issues.append(_table_issue(out, f"columns {raw.columns} lack {missing}, needed by data.format: {fmt}"))
        return None
    return fmt


def _file_format(raw, out: Loaded, prompt_only: bool = False) -> str | None:
    """Detect from a tabular file's columns, else from the first record that matches a format."""
    expected = expected_fields(prompt_only)
    if raw.columns is not None:
        fmt = detect(raw.columns, prompt_only=prompt_only)
        if fmt is None:
            out.issues.append(_table_issue(out, f"columns {raw.columns} match no format; expected {expected}"))
        return fmt
    fmt = next((f for rec, _ in raw.records if isinstance(rec, dict) and (f := detect(rec, prompt_only=prompt_only))),
               None)
    if fmt is None:
        out.issues += [not_an_object(rec, origin) for rec, origin in raw.records if not isinstance(rec, dict)]
        if any(isinstance(rec, dict) for rec, _ in raw.records):
            out.issues.append(Issue("E005", f"cannot detect the format: no record has the fields of one; expected "
                                            f"{expected}", out.path))
    return fmt


def load_examples(path: str | Path, fmt: str = "auto", *, prompt_only: bool = False) -> list[Example]:
    """Read and validate one file; raises DataError listing every issue. ``prompt_only``: see read_examples."""
    loaded = read_examples(path, fmt, prompt_only=prompt_only)
    if loaded.issues:
        raise DataError(loaded.issues)
    return loaded.examples


def holdout_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split: round(n * fraction) examples (at least one) go to validation; both keep file order."""
    if fraction <= 0 or not examples:
        return list(examples), []
    n_valid = max(1, round(len(examples) * fraction))
    held = set(random.Random(seed).sample(range(len(examples)), n_valid))
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def collect_splits(cfg: DataConfig, seed: int) -> tuple[Splits | None, list[Issue]]:
    """Load train (+ valid, or the held-out part of train) without raising.

    Returns the splits built from the records that passed (None only when no training file is set)
    and every issue; callers that train must refuse to go on when there are issues.
    """
    if not cfg.train:
        return None, [Issue("E016", "no training file: set data.train (or pass --data FILE)")]
    train = read_examples(cfg.train, cfg.format)
    valid = read_examples(cfg.valid, cfg.format) if cfg.valid else None
    issues = train.issues + (valid.issues if valid else [])
    if valid is not None:
        splits = Splits(train.examples, valid.examples, train.format, valid.format)
    else:
        tr, va = holdout_split(train.examples, cfg.valid_fraction, seed)
        splits = Splits(tr, va, train.format)
    if not train.issues and len(splits.train) < cfg.min_examples:  # counts mean little while records fail
        held = f" after holding out {len(splits.valid)} for validation (data.valid_fraction)" if not cfg.valid else ""
        issues.append(Issue("E015", f"{len(splits.train)} training examples{held}; data.min_examples is "
                                    f"{cfg.min_examples}: add examples or lower data.min_examples", cfg.train))
    return splits, issues


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """The training and validation examples; raises DataError with every issue of every file."""
    splits, issues = collect_splits(cfg, seed)
    if issues:
        raise DataError(issues)
    return splits
