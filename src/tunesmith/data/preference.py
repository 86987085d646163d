"""Preference data: answer pairs (objectives dpo, orpo, simpo) and labelled single answers (kto).

| format          | fields                                                        | becomes  |
|-----------------|---------------------------------------------------------------|----------|
| preference      | input: {messages}, preferred_output, non_preferred_output     | Pair     |
|                 | (OpenAI DPO fine-tuning; each output a list of one assistant message) |  |
| chosen_rejected | prompt?, chosen, rejected (TRL): strings or lists of messages | Pair     |
| unpaired        | prompt, completion, label (TRL KTO; label true = desirable)   | Unpaired |

A prompt is the conversation the answers reply to: it ends with a user turn, and a system turn may
come first. A string prompt is one user turn, a string answer one assistant turn. Without a prompt
(TRL's "implicit prompt"), chosen and rejected are whole conversations: the prompt is their longest
common run of messages, and after it each holds exactly one assistant message.

Rendering, as ``render.py`` finds assistant spans: the prompt with the generation prompt (P) must be
a prefix of prompt + answer (F), up to a BPE merge at the boundary; an answer's ids are F after P,
cut after the last eos, which are exactly the tokens SFT trains on in a final assistant turn
(``RenderedPair.chosen`` equals ``render_one`` of prompt + chosen less its untrained tail). Every
answer token is scored; ``data.train_on`` does not apply (preference losses score answers only).

``data.overflow: truncate`` cuts the prompt from the left, keeping a leading BOS, and never an
answer: the first turns are the least needed to judge the answers, and a cut answer would score a
reply that was never written. A pair whose answers leave no room for a prompt token is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import DataConfig
from .errors import DataError, Issue
from .example import ROLES, Message, Origin
from .formats import FORMATS, PREFERENCE_REQUIRED, _Record, _turn, detect, not_an_object
from .loading import holdout_split
from .preflight import mark_plain
from .readers import read_file
from .render import IGNORE, Overflow, RenderedExample, _Encoder, _prefix_end, _RenderFailure, resolve_chat_template

PREFERENCE_FORMATS = tuple(PREFERENCE_REQUIRED)  # preference, chosen_rejected, unpaired
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")


@dataclass(frozen=True)
class Pair:
    """A prompt (ending in a user turn) and two assistant answers to it, the chosen one preferred."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    origin: Origin


@dataclass(frozen=True)
class Unpaired:
    """A prompt and one assistant answer, labelled desirable or not (KTO)."""

    prompt: tuple[Message, ...]
    completion: Message
    desirable: bool
    origin: Origin


Preference = Pair | Unpaired


def unpair(pairs: Sequence[Pair]) -> list[Unpaired]:
    """Each pair as a desirable and an undesirable answer (how TRL's KTO takes paired data)."""
    return [u for p in pairs for u in (Unpaired(p.prompt, p.chosen, True, p.origin),
                                       Unpaired(p.prompt, p.rejected, False, p.origin))]


# ---------------------------------------------------------------- records to Pair / Unpaired

_SAME_ROLES = {role: role for role in ROLES}
# A CSV cell is text; these columns may hold a JSON list of messages (or, for input, an object).
_JSON_CELLS = ("input", "preferred_output", "non_preferred_output", "prompt", "chosen", "rejected", "completion")
_LABELS = {"true": True, "false": False, "1": True, "0": False}


def convert_preference(rec: Any, fmt: str, origin: Origin) -> tuple[Preference | None, list[Issue]]:
    """Validate one record in preference format ``fmt``; (Pair or Unpaired, []) or (None, issues)."""
    if not isinstance(rec, dict):
        return None, [not_an_object(rec, origin)]
    r = _Record(rec, origin)
    item = {"preference": _openai, "chosen_rejected": _chosen_rejected, "unpaired": _unpaired}[fmt](r)
    return (None, r.issues) if r.issues else (item, [])


def _openai(r: _Record) -> Pair | None:
    inp = r.rec.get("input")
    if not isinstance(inp, dict):
        r.issue("E006" if inp is None else "E007", "missing field 'input'" if inp is None else
                f"expected an object with 'messages', got {type(inp).__name__}", "input")
    elif inp.get("tools"):
        # Refused rather than passed through: our messages carry no tool calls and the render passes no tools
        # to the template, so the model would learn answers to prompts that lack the tools they rely on.
        r.issue("E034", "tools are not supported in preference data yet: remove input.tools (and tool turns)",
                "input.tools")
    prompt = _prompt(r, inp.get("messages"), "input.messages") if isinstance(inp, dict) else None
    chosen = _answer(r, r.rec.get("preferred_output"), "preferred_output", strings=False)
    rejected = _answer(r, r.rec.get("non_preferred_output"), "non_preferred_output", strings=False)
    return _pair(r, prompt, chosen, rejected, "non_preferred_output")


def _chosen_rejected(r: _Record) -> Pair | None:
    if r.rec.get("prompt") is None:
        return _implicit(r)
    prompt = _prompt(r, r.rec["prompt"], "prompt")
    chosen, rejected = _answer(r, r.rec.get("chosen"), "chosen"), _answer(r, r.rec.get("rejected"), "rejected")
    return _pair(r, prompt, chosen, rejected, "rejected")


def _implicit(r: _Record) -> Pair | None:
    """TRL's implicit prompt: chosen and rejected are whole conversations; the prompt is what they share."""
    c, j = r.rec.get("chosen"), r.rec.get("rejected")
    if isinstance(c, str) or isinstance(j, str):
        r.issue("E029", "chosen and rejected are text and there is no prompt: add a prompt field, or give both "
                        "as conversations (lists of messages) that begin with the same prompt", "prompt")
        return None
    cm, jm = _messages(r, c, "chosen"), _messages(r, j, "rejected")
    if cm is None or jm is None:
        return None
    if cm == jm:
        r.issue("E030", "chosen and rejected are the same conversation: the pair teaches nothing", "rejected")
        return None
    n = 0
    while n < min(len(cm), len(jm)) and cm[n] == jm[n]:
        n += 1
    for key, msgs in (("chosen", cm), ("rejected", jm)):
        if len(msgs) - n != 1 or msgs[-1].role != "assistant":
            r.issue("E029", f"after the {n} message(s) chosen and rejected share (the implicit prompt), {key} has "
                            f"{len(msgs) - n} ({', '.join(m.role for m in msgs[n:]) or 'none'}); it must end in "
                            "exactly one assistant message", key)
    if r.issues:
        return None
    prompt = tuple(cm[:n]) if _prompt_ok(r, cm[:n], "chosen") else None
    return _pair(r, prompt, cm[-1], jm[-1], "rejected")


def _unpaired(r: _Record) -> Unpaired | None:
    prompt = _prompt(r, r.rec.get("prompt"), "prompt")
    completion = _answer(r, r.rec.get("completion"), "completion")
    label = r.rec.get("label")
    if label is None:
        r.issue("E006", "missing field 'label'", "label")
    elif not isinstance(label, bool):
        r.issue("E033", f"label must be true (a desirable completion) or false, got {label!r}", "label")
    if r.issues:
        return None
    return Unpaired(prompt, completion, label, r.origin)


def _pair(r: _Record, prompt, chosen: Message | None, rejected: Message | None, rejected_field: str) -> Pair | None:
    if r.issues or prompt is None or chosen is None or rejected is None:
        return None
    if chosen.content.strip() == rejected.content.strip():
        r.issue("E030", "the rejected answer is the same as the chosen one: the pair teaches nothing", rejected_field)
        return None
    return Pair(prompt, chosen, rejected, r.origin)


def _messages(r: _Record, value: Any, key: str) -> list[Message] | None:
    if value is None:
        r.issue("E006", f"missing field {key!r}", key)
        return None
    if not isinstance(value, list):
        r.issue("E007", f"expected a list of messages, got {type(value).__name__}", key)
        return None
    if not value:
        r.issue("E009", "the list of messages is empty", key)
        return None
    out = [_turn(r, t, f"{key}[{i}]", "role", "content", _SAME_ROLES) for i, t in enumerate(value)]
    # Weights say which SFT turns train; here the answers are always scored and the prompt never.
    return None if any(m is None for m in out) else [Message(m.role, m.content) for m in out]


def _prompt(r: _Record, value: Any, key: str) -> tuple[Message, ...] | None:
    if isinstance(value, str) or value is None:
        text = r.string(key, value=value, field=key)
        return None if text is None else (Message("user", text),)
    msgs = _messages(r, value, key)
    return tuple(msgs) if msgs is not None and _prompt_ok(r, msgs, key) else None


def _prompt_ok(r: _Record, msgs: list[Message], key: str) -> bool:
    if not msgs:
        r.issue("E029", "chosen and rejected share no first message, so there is no prompt: begin both with it",
                key)
    elif msgs[0].role == "assistant":
        r.issue("E025", "the prompt starts with an assistant turn; put a user (or system) turn first", key)
    elif any(m.role == "system" for m in msgs[1:]):
        r.issue("E028", "a system turn may only come first in the prompt", key)
    elif msgs[-1].role != "user":
        r.issue("E028", f"the prompt ends with a {msgs[-1].role!r} turn; it must end with the user turn that the "
                        "answers reply to", f"{key}[{len(msgs) - 1}]")
    else:
        return True
    return False


def _answer(r: _Record, value: Any, key: str, strings: bool = True) -> Message | None:
    """A string (``strings``) or a list of exactly one assistant message."""
    if strings and (isinstance(value, str) or value is None):
        text = r.string(key, value=value, field=key)
        return None if text is None else Message("assistant", text)
    msgs = _messages(r, value, key)
    if msgs is None:
        return None
    if len(msgs) != 1 or msgs[0].role != "assistant":
        got = ", ".join(m.role for m in msgs)
        r.issue("E027", f"expected exactly one assistant message, got {len(msgs)} ({got})"
                        + ("; conversations that repeat the prompt go without a prompt field" if len(msgs) > 1
                           and key in ("chosen", "rejected") else ""), key)
        return None
    return msgs[0]


def _from_csv(rec: dict) -> dict:
    """CSV cells are text: parse JSON message lists (and the input object) and true/false labels."""
    out = dict(rec)
    for key in _JSON_CELLS:
        text = out.get(key)
        if isinstance(text, str) and text.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue  # a prompt may begin with a bracket; it stays text
            if (isinstance(value, dict) and key == "input") or (
                    isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
                out[key] = value
    if isinstance(out.get("label"), str) and out["label"].strip().lower() in _LABELS:
        out["label"] = _LABELS[out["label"].strip().lower()]
    return out


# ---------------------------------------------------------------- files and splits


@dataclass
class PreferenceLoaded:
    """One file, read and converted: items (Pair or Unpaired), the format used, and every issue found."""

    path: str
    items: list[Preference] = field(default_factory=list)
    format: str | None = None
    issues: list[Issue] = field(default_factory=list)


def _expected() -> str:
    return "; ".join(f"{f}: {' + '.join(k)}" for f, k in PREFERENCE_REQUIRED.items())


def read_preference_file(path: str | Path, fmt: str = "auto") -> PreferenceLoaded:
    """Read and validate one file without raising; ``fmt`` is ``auto`` or one of PREFERENCE_FORMATS."""
    out = PreferenceLoaded(str(path))
    if fmt in FORMATS:
        out.issues.append(Issue("E026", f"data.format is {fmt!r}, a format for objective sft; preference objectives "
                                        f"read {', '.join(PREFERENCE_FORMATS)} (or auto)", out.path))
        return out
    if fmt != "auto" and fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use auto or one of {', '.join(PREFERENCE_FORMATS)}")
    raw = read_file(path)
    out.issues += raw.issues
    csv_file = raw.columns is not None and out.path.lower().endswith(".csv")
    records = [(_from_csv(rec) if csv_file else rec, origin) for rec, origin in raw.records]
    if not records:
        return out
    out.format = fmt if fmt != "auto" else _file_format(raw.columns, records, out)
    if out.format is None:
        return out
    if raw.columns is not None and not set(PREFERENCE_REQUIRED[out.format]) <= set(raw.columns):
        out.issues.append(Issue("E018" if csv_file else "E019", f"columns {raw.columns} lack "
                                f"{sorted(set(PREFERENCE_REQUIRED[out.format]) - set(raw.columns))}, needed by "
                                f"data.format: {out.format}", out.path, 1 if csv_file else None))
        return out
    for rec, origin in records:
        own = detect(rec) if fmt == "auto" and isinstance(rec, dict) else out.format
        # Only another preference format is E021: a KTO record without its label, say, gets "missing field 'label'".
        if own in PREFERENCE_FORMATS and own != out.format:
            out.issues.append(Issue("E021", f"record is in format {own!r} but the file is {out.format!r}; keep one "
                                            "format per file", origin.path, origin.line, None, origin.unit))
        else:
            item, issues = convert_preference(rec, out.format, origin)
            out.issues += issues
            if item is not None:
                out.items.append(item)
    return out


def _file_format(columns, records, out: PreferenceLoaded) -> str | None:
    """From a table's columns, else the first record with a format's fields; SFT records are refused (E026)."""
    if columns is not None:
        fmt, line = detect(columns), None
    else:
        fmt, line = next(((f, o) for rec, o in records if isinstance(rec, dict) and (f := detect(rec))), (None, None))
    if fmt in PREFERENCE_FORMATS:
        return fmt
    where = (out.path, line.line, None, line.unit) if line else (out.path,)
    if fmt is not None:
        out.issues.append(Issue("E026", f"this file holds records for objective sft (format {fmt}), not preference "
                                        f"data: set objective.name sft, or give {_expected()}", *where))
    else:
        out.issues += [not_an_object(rec, o) for rec, o in records if not isinstance(rec, dict)]
        out.issues.append(Issue("E005", f"cannot detect the format: no record has the fields of one; expected "
                                        f"{_expected()}", out.path))
    return None


def read_preferences(path: str | Path, fmt: str = "auto") -> list[Preference]:
    """Read and validate one file of pairs or unpaired answers; raises DataError listing every issue."""
    loaded = read_preference_file(path, fmt)
    if loaded.issues:
        raise DataError(loaded.issues)
    return loaded.items


@dataclass
class PreferenceSplits:
    train: list[Preference]
    valid: list[Preference]
    format: str | None  # of the training file
    valid_format: str | None = None  # of the validation file; None when held out from train


def collect_preference_splits(cfg: DataConfig, seed: int,
                              objective: str | None = None) -> tuple[PreferenceSplits | None, list[Issue]]:
    """Train (+ valid, or the held-out part of train) without raising, as ``loading.collect_splits``.

    ``objective`` (dpo, orpo, simpo, kto), when given, checks that the files hold what it needs:
    pairs for dpo/orpo/simpo; kto takes unpaired answers, or pairs split into a desirable and an
    undesirable answer (after the holdout, so both halves of a pair stay in one split).
    """
    if not cfg.train:
        return None, [Issue("E016", "no training file: set data.train (or pass --data FILE)")]
    files = [read_preference_file(cfg.train, cfg.format)] + ([read_preference_file(cfg.valid, cfg.format)]
                                                             if cfg.valid else [])
    issues = [i for f in files for i in f.issues] + [i for f in files for i in _kind_issues(f, objective)]
    if cfg.valid:
        splits = PreferenceSplits(files[0].items, files[1].items, files[0].format, files[1].format)
    else:
        tr, va = holdout_split(files[0].items, cfg.valid_fraction, seed)
        splits = PreferenceSplits(tr, va, files[0].format)
    if objective == "kto":
        splits.train, splits.valid = (_as_unpaired(splits.train), _as_unpaired(splits.valid))
    if not issues and len(splits.train) < cfg.min_examples:
        held = f" after holding out {len(splits.valid)} for validation (data.valid_fraction)" if not cfg.valid else ""
        issues.append(Issue("E015", f"{len(splits.train)} training examples{held}; data.min_examples is "
                                    f"{cfg.min_examples}: add examples or lower data.min_examples", cfg.train))
    return splits, issues


def _as_unpaired(items: list[Preference]) -> list[Preference]:
    return [u for it in items for u in (unpair([it]) if isinstance(it, Pair) else [it])]


def _kind_issues(loaded: PreferenceLoaded, objective: str | None) -> list[Issue]:
    if objective in PAIR_OBJECTIVES and loaded.format == "unpaired":
        return [Issue("E026", f"this file holds unpaired answers labelled good or bad, and objective {objective} "
                              "needs pairs: set objective.name kto, or give chosen and rejected answers",
                      loaded.path)]
    return []


def load_preference_splits(cfg: DataConfig, seed: int, objective: str | None = None) -> PreferenceSplits:
    """The training and validation pairs (or unpaired answers); raises DataError with every issue."""
    splits, issues = collect_preference_splits(cfg, seed, objective)
    if issues:
        raise DataError(issues)
    return splits


# ---------------------------------------------------------------- rendering


def _scored_example(prompt_ids: list[int], answer_ids: list[int], origin: Origin, truncated: bool) -> RenderedExample:
    return RenderedExample(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, origin, truncated)


@dataclass(frozen=True)
class RenderedPair:
    """Token ids of the shared prompt and of each answer (every answer token is scored)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: Origin
    truncated: bool = False  # the prompt was cut from the left to data.max_length

    @property
    def chosen(self) -> RenderedExample:
        return _scored_example(self.prompt_ids, self.chosen_ids, self.origin, self.truncated)

    @property
    def rejected(self) -> RenderedExample:
        return _scored_example(self.prompt_ids, self.rejected_ids, self.origin, self.truncated)


@dataclass(frozen=True)
class RenderedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    origin: Origin
    truncated: bool = False

    @property
    def example(self) -> RenderedExample:
        return _scored_example(self.prompt_ids, self.completion_ids, self.origin, self.truncated)


@dataclass
class PairRenderResult:
    """Rendered pairs or unpaired answers; ``issues`` is filled by ``render_preferences_all`` only."""

    items: list[RenderedPair | RenderedUnpaired]
    truncated: int = 0
    dropped: int = 0
    overflows: list[Overflow] = field(default_factory=list)
    lengths: list[tuple[int, ...]] = field(default_factory=list)  # (prompt, answer...) tokens, before max_length
    issues: list[Issue] = field(default_factory=list)


class _Bad(Exception):
    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


def _render(prompt: tuple[Message, ...], answers: list[tuple[str, Message]], enc: _Encoder):
    """(prompt ids, [answer ids]) shared by every answer, or _Bad; see the module docstring."""
    try:
        p = enc.chat(prompt, True)
        fulls = [enc.chat(prompt + (a,), False) for _, a in answers]
    except _RenderFailure as e:
        raise _Bad(e.code, str(e))
    bos, eos = enc.tok.bos_token_id, enc.tok.eos_token_id
    if bos is not None and p[:2] == [bos, bos]:
        raise _Bad("E032", "the prompt starts with two BOS tokens: the chat template writes bos_token and so does "
                           "something else (the template twice, or the data); fix model.chat_template")
    n = len(p)
    for (key, _), full in zip(answers, fulls):
        try:
            n = min(n, _prefix_end(full, p, len(prompt)))
        except _RenderFailure:
            raise _Bad("E031", "the chat template renders the prompt differently when this answer follows it, so "
                               "the answers do not share the prompt's tokens; set model.chat_template (e.g. chatml)",
                       key) from None
    out = []
    for (key, _), full in zip(answers, fulls):
        span = full[n:]
        if eos is not None and eos in span:  # SFT's rule: what the template writes after the eos is not trained
            span = span[: len(span) - span[::-1].index(eos)]
        if not span:
            raise _Bad("E009", "the answer renders as no tokens", key)
        out.append(span)
    return p[:n], out


def _fit(prompt_ids: list[int], answers: list[list[int]], item: Preference, cfg: DataConfig, bos: int | None,
         result: PairRenderResult) -> list[int] | None:
    """The prompt, cut from the left to fit data.max_length, or None (dropped, or an issue recorded)."""
    longest, scored = max(map(len, answers)), sum(map(len, answers))
    n, limit = len(prompt_ids) + longest, cfg.max_length
    if n <= limit:
        return prompt_ids
    keep_bos = int(bos is not None and prompt_ids[:1] == [bos])
    room = limit - longest - keep_bos  # prompt tokens left after the BOS; one at least, to predict the answer from
    if cfg.overflow == "error":
        result.overflows.append(Overflow(item.origin, n, scored, "error"))
        result.issues.append(_issue("E013", f"prompt + longest answer is {n} tokens > data.max_length={limit}: raise "
                                            "data.max_length, shorten it, or set data.overflow to truncate (cuts the "
                                            "prompt from the left) or drop", item.origin))
    elif cfg.overflow == "drop" or room < 1:
        result.dropped += 1
        result.overflows.append(Overflow(item.origin, n, scored, "dropped"))
    else:
        result.truncated += 1
        result.overflows.append(Overflow(item.origin, n, scored, "truncated", scored))
        return prompt_ids[:keep_bos] + prompt_ids[len(prompt_ids) - room:]
    return None


def _issue(code: str, message: str, origin: Origin, key: str | None = None) -> Issue:
    return Issue(code, message, origin.path, origin.line, key, origin.unit)


def render_preferences_all(items: Sequence[Preference], tokenizer, cfg: DataConfig,
                           chat_template: str | None = None) -> PairRenderResult:
    """Render pairs and unpaired answers and apply ``cfg.overflow`` without raising; issues in the result."""
    enc = _Encoder(tokenizer, resolve_chat_template(chat_template))
    result = PairRenderResult([])
    for it in items:
        answers = ([("chosen", it.chosen), ("rejected", it.rejected)] if isinstance(it, Pair)
                   else [("completion", it.completion)])
        try:
            prompt_ids, ids = _render(it.prompt, answers, enc)
            if len(ids) == 2 and ids[0] == ids[1]:
                raise _Bad("E030", "chosen and rejected render to the same tokens: the pair teaches nothing",
                           "rejected")
        except _Bad as e:
            result.issues.append(_issue(e.code, str(e), it.origin, e.field))
            continue
        result.lengths.append((len(prompt_ids), *map(len, ids)))
        fitted = _fit(prompt_ids, ids, it, cfg, tokenizer.bos_token_id, result)
        if fitted is None:
            continue
        cut = len(fitted) < len(prompt_ids)
        result.items.append(RenderedPair(fitted, ids[0], ids[1], it.origin, cut) if isinstance(it, Pair)
                            else RenderedUnpaired(fitted, ids[0], it.desirable, it.origin, cut))
    if result.dropped and not result.items and not result.issues:
        result.issues.append(Issue("E015", f"all {result.dropped} examples are longer than data.max_length="
                                           f"{cfg.max_length} and were dropped, so none is left: raise "
                                           "data.max_length or set data.overflow: truncate", items[0].origin.path))
    return result


def _raising(items, tokenizer, cfg, chat_template) -> PairRenderResult:
    result = render_preferences_all(items, tokenizer, cfg, chat_template)
    if result.issues:
        raise DataError(result.issues)
    return result


def render_pairs(pairs: Sequence[Pair], tokenizer, data_cfg: DataConfig,
                 chat_template: str | None = None) -> PairRenderResult:
    """Token ids of each pair for training; raises DataError listing every pair that cannot be used."""
    return _raising(pairs, tokenizer, data_cfg, chat_template)


def render_unpaired(items: Sequence[Unpaired], tokenizer, data_cfg: DataConfig,
                    chat_template: str | None = None) -> PairRenderResult:
    """Token ids of each labelled answer for training (KTO); raises DataError as render_pairs."""
    return _raising(items, tokenizer, data_cfg, chat_template)


# ---------------------------------------------------------------- for `tunesmith check`


def pair_spans(item: RenderedPair | RenderedUnpaired, tokenizer) -> list[tuple[str, bool]]:
    """[(text, scored)]: the prompt once, then each answer under its name (``tunesmith check`` colours the scored)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    cut = " (cut from the left to data.max_length)" if item.truncated else ""
    if isinstance(item, RenderedPair):
        answers = [("chosen", item.chosen_ids), ("rejected", item.rejected_ids)]
    else:
        answers = [("desirable" if item.desirable else "undesirable", item.completion_ids)]
    spans = [(f"prompt{cut}:\n", False), (decode(item.prompt_ids), False)]
    for label, ids in answers:
        spans += [(f"\n{label}: ", False), (decode(ids), True)]
    return spans


def show_pair(item: RenderedPair | RenderedUnpaired, tokenizer) -> str:
    """The prompt as text, then each answer with its scored tokens in [[...]] (as SFT's trained spans)."""
    return mark_plain(pair_spans(item, tokenizer))


def pair_stats(items: Sequence[RenderedPair | RenderedUnpaired]) -> dict:
    """Count and token lengths (min, median, max) of prompts and answers, as rendered (after max_length)."""
    def spread(values: list[int]) -> dict | None:
        v = sorted(values)
        return {"min": v[0], "median": v[(len(v) - 1) // 2], "max": v[-1]} if v else None

    pairs = [i for i in items if isinstance(i, RenderedPair)]
    single = [i for i in items if isinstance(i, RenderedUnpaired)]
    out = {"count": len(items), "prompt": spread([len(i.prompt_ids) for i in items])}
    if pairs or not single:
        out |= {"chosen": spread([len(i.chosen_ids) for i in pairs]),
                "rejected": spread([len(i.rejected_ids) for i in pairs])}
    if single:
        out |= {"completion": spread([len(i.completion_ids) for i in single]),
                "desirable": sum(i.desirable for i in single)}
    return out
