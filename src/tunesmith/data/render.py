"""Rendering: canonical Examples to token ids and labels, through a chat template.

How the assistant spans are found (no template strings are hard-coded): for each assistant turn i,
render the conversation up to turn i with the generation prompt (P) and up to and including turn i
(F). If the template has the *prefix property* (P and F are prefixes of the whole conversation's
ids, up to a BPE merge at the very boundary), the tokens between them are the assistant's reply
plus the template's end of turn. We train
on them up to and including the last eos token in that span; what the template writes after the
eos (ChatML's "\\n" before the next "<|im_start|>") is not trained, because generation stops at the
eos and never produces it. A template without an eos in the span (e.g. Llama 3, whose turns end in
<|eot_id|>) has its whole span trained, end-of-turn token included.

Control tokens that appear inside message text are encoded as plain text
(``sanitize_control_tokens``), so a literal "<|im_end|>" in a user's data cannot end a turn.
Plain-text examples are tokenized as they are (the tokenizer's own BOS, if any), eos appended,
and every token is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..config import DataConfig
from .errors import DataError, Issue
from .example import Example, Message, Origin

IGNORE = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)
BUILTIN_TEMPLATES = ("chatml",)


@dataclass(frozen=True)
class RenderedExample:
    """``labels[t]`` is ``input_ids[t]`` where token t is trained, IGNORE elsewhere (not shifted)."""

    input_ids: list[int]
    labels: list[int]
    origin: Origin
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss after the causal shift (labels[1:] that are not IGNORE)."""
        return count_targets(self.labels)


@dataclass(frozen=True)
class Overflow:
    """What max_length did to one example: action is truncated, dropped or error."""

    origin: Origin
    length: int
    trained: int
    action: str
    trained_after: int | None = None  # targets left after truncation


@dataclass
class RenderResult:
    items: list[RenderedExample]
    truncated: int = 0
    dropped: int = 0
    overflows: list[Overflow] = field(default_factory=list)
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (tokens, targets) per example, before max_length


def count_targets(labels: Sequence[int]) -> int:
    return sum(1 for t in labels[1:] if t != IGNORE)


# ---------------------------------------------------------------- templates


def resolve_chat_template(chat_template: str | None) -> str | None:
    """``None`` (the tokenizer's own), a built-in name (chatml), a path to a .jinja file, or Jinja text."""
    if chat_template is None:
        return None
    if chat_template in BUILTIN_TEMPLATES:
        return resources.files(__package__).joinpath(f"templates/{chat_template}.jinja").read_text("utf-8")
    p = Path(chat_template)
    if p.suffix == ".jinja" or p.is_file():
        if not p.is_file():
            raise DataError([Issue("E023", "chat template file not found (model.chat_template)", str(p))])
        return p.read_text(encoding="utf-8")
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise DataError([Issue("E023", f"unknown chat template {chat_template!r} (model.chat_template): use a built-in "
                                   f"name ({', '.join(BUILTIN_TEMPLATES)}) or a path to a .jinja file")])


class _RenderFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Encoder:
    """Chat-template encoding of message prefixes, with template failures turned into issue codes."""

    def __init__(self, tokenizer, template: str | None):
        self.tok, self.template = tokenizer, template
        self.sanitize = True

    def chat(self, messages: Sequence[Message | dict], generation_prompt: bool) -> list[int]:
        conv = [m.as_dict() if isinstance(m, Message) else m for m in messages]
        try:
            try:
                return self._apply(conv, generation_prompt)
            except NotImplementedError:  # a tokenizer whose post-processor adds tokens cannot sanitize
                self.sanitize = False
                return self._apply(conv, generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() in templates, "no chat template" ValueError
            raise _RenderFailure("E023", f"the chat template failed: {e} (set model.chat_template, e.g. chatml)")

    def _apply(self, conv: list[dict], generation_prompt: bool) -> list[int]:
        return list(self.tok.apply_chat_template(
            conv, chat_template=self.template, add_generation_prompt=generation_prompt, tokenize=True,
            return_dict=False, sanitize_control_tokens=self.sanitize))


def render_prompt_ids(messages: Sequence[Message | dict], tokenizer, chat_template: str | None = None) -> list[int]:
    """Token ids of a prompt ending in the assistant header (``add_generation_prompt=True``), for generation."""
    try:
        return _Encoder(tokenizer, resolve_chat_template(chat_template)).chat(messages, True)
    except _RenderFailure as e:
        raise DataError([Issue(e.code, str(e))]) from None


# ---------------------------------------------------------------- ids and labels


def _chat_ids_labels(messages: tuple[Message, ...], enc: _Encoder, train_on: str) -> tuple[list[int], list[int]]:
    ids = enc.chat(messages, False)
    if train_on == "all":
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    eos = enc.tok.eos_token_id
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        begin = _prefix_end(ids, enc.chat(messages[:i], True), i)
        upto = len(ids) if i == len(messages) - 1 else _prefix_end(ids, enc.chat(messages[: i + 1], False), i)
        span = ids[begin:upto]
        if not span:
            raise _RenderFailure("E022", f"the chat template renders assistant turn {i} as no tokens")
        end = begin + (len(span) - span[::-1].index(eos) if eos is not None and eos in span else len(span))
        if m.weight != 0:
            labels[begin:end] = ids[begin:end]
    return ids, labels


def _prefix_end(ids: list[int], prefix: list[int], turn: int) -> int:
    """Where ``prefix`` ends inside ``ids``; raises E022 when the template breaks the prefix property.

    The last token may differ: BPE can merge a prefix's final characters with the next ones (a
    generation prompt ending in a space, then " answer"); the span then starts at that merged token.
    """
    n = 0
    while n < min(len(ids), len(prefix)) and ids[n] == prefix[n]:
        n += 1
    if n < len(prefix) - 1:
        raise _RenderFailure("E022", (
            f"rendering the conversation up to turn {turn} is not a prefix of the whole conversation: the chat "
            "template rewrites earlier turns (e.g. strips reasoning or adds per-position text), so assistant "
            "tokens cannot be located; set model.chat_template (e.g. chatml) or data.train_on: all"))
    return n


def _text_ids_labels(text: str, tok) -> tuple[list[int], list[int]]:
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)  # so the model learns where a document ends
    return ids, list(ids)


def render_one(example: Example, tokenizer, train_on: str = "assistant", chat_template: str | None = None,
               *, _enc: _Encoder | None = None) -> tuple[list[int], list[int]]:
    """Full-length (ids, labels) of one example; raises DataError on a template failure."""
    enc = _enc or _Encoder(tokenizer, resolve_chat_template(chat_template))
    try:
        if example.messages is None:
            return _text_ids_labels(example.text, tokenizer)
        return _chat_ids_labels(example.messages, enc, train_on)
    except _RenderFailure as e:
        if _enc is not None:
            raise
        raise DataError([_issue(e.code, str(e), example.origin)]) from None


def _issue(code: str, message: str, origin: Origin, field: str | None = None) -> Issue:
    return Issue(code, message, origin.path, origin.line, field, origin.unit)


# ---------------------------------------------------------------- max_length policy


def render_all(examples: Sequence[Example], tokenizer, cfg: DataConfig,
               chat_template: str | None = None) -> tuple[RenderResult, list[Issue]]:
    """Render and apply ``cfg.overflow`` without raising: (result, issues). Preflight shows both."""
    enc = _Encoder(tokenizer, resolve_chat_template(chat_template))
    result, issues = RenderResult([]), []
    for ex in examples:
        try:
            ids, labels = render_one(ex, tokenizer, cfg.train_on, _enc=enc)
        except _RenderFailure as e:
            issues.append(_issue(e.code, str(e), ex.origin))
            continue
        trained = count_targets(labels)
        result.lengths.append((len(ids), trained))
        if trained == 0:  # validation rejects this earlier; a template can still hide every target
            issues.append(_issue("E020", "no token of this example would be trained", ex.origin))
        elif len(ids) <= cfg.max_length:
            result.items.append(RenderedExample(ids, labels, ex.origin))
        else:
            _overflow(ex, ids, labels, trained, cfg, result, issues)
    if result.dropped and not result.items and not issues:  # data.overflow: drop took every example
        issues.append(Issue("E015", f"all {result.dropped} examples are longer than data.max_length={cfg.max_length} "
                                    "and data.overflow is drop, so none is left: raise data.max_length or set "
                                    "data.overflow: truncate", examples[0].origin.path))
    return result, issues


def _overflow(ex: Example, ids: list[int], labels: list[int], trained: int, cfg: DataConfig,
              result: RenderResult, issues: list[Issue]) -> None:
    n, limit = len(ids), cfg.max_length
    if cfg.overflow == "drop":
        result.dropped += 1
        result.overflows.append(Overflow(ex.origin, n, trained, "dropped"))
    elif cfg.overflow == "error":
        result.overflows.append(Overflow(ex.origin, n, trained, "error"))
        issues.append(_issue("E013", f"{n} tokens > data.max_length={limit}: raise data.max_length, shorten the "
                                     "example, or set data.overflow to truncate or drop", ex.origin))
    else:
        after = count_targets(labels[:limit])  # cut from the end: the prompt is kept, the reply is cut
        result.overflows.append(Overflow(ex.origin, n, trained, "truncated", after))
        if after == 0:
            issues.append(_issue("E014", f"{n} tokens cut to data.max_length={limit} leaves no trained token "
                                         "(the prompt alone is too long): raise data.max_length or set data.overflow: "
                                         "drop", ex.origin))
        else:
            result.truncated += 1
            result.items.append(RenderedExample(ids[:limit], labels[:limit], ex.origin, truncated=True))


def render_examples(examples: Sequence[Example], tokenizer, cfg: DataConfig,
                    chat_template: str | None = None) -> RenderResult:
    """Token ids and labels for training; raises DataError listing every example that cannot be used."""
    result, issues = render_all(examples, tokenizer, cfg, chat_template)
    if issues:
        raise DataError(issues)
    return result
