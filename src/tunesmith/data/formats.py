"""Record formats and their conversion to the canonical :class:`Example`, with validation.

| format            | fields                                              | becomes                          |
|-------------------|-----------------------------------------------------|----------------------------------|
| messages          | messages: [{role, content, weight?}]                | the messages (OpenAI fine-tuning)|
| sharegpt          | conversations: [{from, value}], system?             | from human/user, gpt/assistant, system |
| alpaca            | instruction, input?, output, system?                | [system], user, assistant        |
| prompt_completion | prompt, completion                                  | user, assistant                  |
| text              | text                                                | plain text, every token trained  |

``auto`` detection looks at the keys, in the order of this table (a record with both ``messages``
and ``text`` is a chat).

Generation and eval (``prompt_only=True``) also take records without an answer: a conversation that
ends with a user turn, ``prompt`` records (PROMPT_FORMATS: a string, or a list of messages), and the
preference formats, of which loading.py keeps only the prompts that data/preference.py reads.
"""

from __future__ import annotations

from typing import Any

from .errors import Issue
from .example import ROLES, Example, Message, Origin

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# A prompt alone: detected after FORMATS, and read for generation and eval only (prompt_only=True).
PROMPT_FORMATS: dict[str, tuple[str, ...]] = {"prompt": ("prompt",)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Records of the preference objectives, read by data/preference.py. Training detects them before FORMATS, so
# an sft run given such a file is told to set the objective (E026) instead of training on part of each record:
# KTO's fields include prompt_completion's, and its undesirable completions must never be learned as answers.
PREFERENCE_REQUIRED: dict[str, tuple[str, ...]] = {
    "preference": ("input", "preferred_output", "non_preferred_output"),
    "chosen_rejected": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}


def detect(keys, *, prompt_only: bool = False) -> str | None:
    """The first format whose required fields are all present, or None; PROMPT_FORMATS too when prompt_only."""
    keys = set(keys)
    if pref := next((f for f, req in PREFERENCE_REQUIRED.items() if set(req) <= keys), None):
        return pref
    required = required_fields(prompt_only)
    return next((f for f in required if set(required[f]) <= keys), None)


def required_fields(prompt_only: bool = False) -> dict[str, tuple[str, ...]]:
    """Format -> the fields that identify it, in detection order (after the preference formats)."""
    return REQUIRED | PROMPT_FORMATS if prompt_only else REQUIRED


def expected_fields(prompt_only: bool = False) -> str:
    fields = required_fields(prompt_only) | (PREFERENCE_REQUIRED if prompt_only else {})
    return "; ".join(f"{f}: {' + '.join(keys)}" for f, keys in fields.items())


class _Record:
    """Collects the issues of one record so converters read as straight-line checks."""

    def __init__(self, rec: dict, origin: Origin):
        self.rec, self.origin, self.issues = rec, origin, []

    def issue(self, code: str, message: str, field: str | None) -> None:
        self.issues.append(Issue(code, message, self.origin.path, self.origin.line, field, self.origin.unit))

    def string(self, key: str, *, required: bool = True, value: Any = None, field: str | None = None) -> str | None:
        """A non-empty string field; None (with an issue when required) otherwise."""
        value = self.rec.get(key) if field is None else value
        field = field or key
        if value is None:
            if required:
                self.issue("E006", f"missing field {key!r}", field)
            return None
        if not isinstance(value, str):
            self.issue("E007", f"expected a string, got {type(value).__name__}", field)
            return None
        if not value.strip():
            if required:
                self.issue("E009", "empty content", field)
            return None
        return value


def not_an_object(rec: Any, origin: Origin) -> Issue:
    return Issue("E004", f"record is a {type(rec).__name__}, not an object", origin.path, origin.line, None,
                 origin.unit)


def _other_objective(rec: dict, fmt: str, origin: Origin) -> Issue:
    """E026: a record for a preference objective, read for objective sft."""
    if fmt == "unpaired":
        message = ("this file holds KTO examples (prompt, completion, label): set objective.name kto, or "
                   "data.format: prompt_completion to train with sft on every completion, the labels ignored")
    else:
        sft = next((f for f in FORMATS if set(REQUIRED[f]) <= set(rec)), None)
        message = "this file holds preference pairs: set objective.name dpo (or orpo, simpo)" + (
            f", or data.format: {sft} to train with sft on its {' and '.join(REQUIRED[sft])}" if sft else "")
    return Issue("E026", message, origin.path, origin.line, None, origin.unit)


def convert(rec: Any, fmt: str, origin: Origin, *, prompt_only: bool = False) -> tuple[Example | None, list[Issue]]:
    """Validate one record in format ``fmt`` and build its Example (None when it has issues).

    ``prompt_only`` (generation and eval, never training): the conversation may end with the user
    turn to answer, and ``fmt`` may be one of PROMPT_FORMATS. (Preference formats: loading.py.)
    """
    if fmt in PREFERENCE_REQUIRED:
        return None, [_other_objective(rec, fmt, origin) if isinstance(rec, dict) else not_an_object(rec, origin)]
    if fmt in PROMPT_FORMATS and not prompt_only:
        raise ValueError(f"format {fmt!r} holds prompts only; it is read with prompt_only=True")
    if not isinstance(rec, dict):
        return None, [not_an_object(rec, origin)]
    r = _Record(rec, origin)
    if fmt == "text":
        text = r.string("text")
        return (Example(None, text, origin) if text is not None and not r.issues else None), r.issues
    messages = {"messages": _messages_fmt, "sharegpt": _sharegpt_fmt, "alpaca": _alpaca_fmt,
                "prompt_completion": _prompt_completion_fmt, "prompt": _prompt_fmt}[fmt](r)
    if messages is not None and not r.issues:
        key = _CONVERSATION_FIELD.get(fmt, "conversations")
        (_check_prompt if prompt_only else _check_conversation)(r, messages, key)
    if messages is None or r.issues:
        return None, r.issues
    return Example(tuple(messages), None, origin), []


def _prompt_completion_fmt(r: _Record) -> list[Message] | None:
    prompt, completion = r.string("prompt"), r.string("completion")
    if prompt is None or completion is None:
        return None
    return [Message("user", prompt), Message("assistant", completion)]


def _alpaca_fmt(r: _Record) -> list[Message] | None:
    instruction, output = r.string("instruction"), r.string("output")
    extra = r.string("input", required=False)
    system = r.string("system", required=False)
    if instruction is None or output is None:
        return None
    user = instruction if extra is None else f"{instruction}\n\n{extra}"
    return ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", output)]


def _messages_fmt(r: _Record) -> list[Message] | None:
    return _turns(r, "messages", "role", "content", {role: role for role in ROLES})


# Where a format's conversation is, for the issues about the conversation as a whole.
_CONVERSATION_FIELD = {"messages": "messages", "prompt": "prompt"}


def _prompt_fmt(r: _Record) -> list[Message] | None:
    """A prompt alone (TRL's prompt-only form): a string, one user turn, or a list of messages."""
    if isinstance(r.rec.get("prompt"), list):
        return _turns(r, "prompt", "role", "content", {role: role for role in ROLES})
    prompt = r.string("prompt")
    return None if prompt is None else [Message("user", prompt)]


def _sharegpt_fmt(r: _Record) -> list[Message] | None:
    turns = _turns(r, "conversations", "from", "value", SHAREGPT_ROLES)
    system = r.string("system", required=False)
    if turns is not None and system and not any(m.role == "system" for m in turns):
        turns.insert(0, Message("system", system))
    return turns


def _turns(r: _Record, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message] | None:
    value = r.rec.get(key)
    if value is None:
        r.issue("E006", f"missing field {key!r}", key)
        return None
    if not isinstance(value, list):
        r.issue("E007", f"expected a list of turns, got {type(value).__name__}", key)
        return None
    if not value:
        r.issue("E009", "the conversation is empty", key)
        return None
    out = [_turn(r, t, f"{key}[{i}]", role_key, content_key, roles) for i, t in enumerate(value)]
    return None if any(m is None for m in out) else out


def _turn(r: _Record, turn: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message | None:
    if not isinstance(turn, dict):
        r.issue("E007", f"expected an object with {role_key!r} and {content_key!r}, got {type(turn).__name__}", field)
        return None
    role = r.string(role_key, value=turn.get(role_key), field=f"{field}.{role_key}")
    if role is not None and role not in roles:
        r.issue("E008", f"unknown role {role!r}; allowed: {', '.join(roles)}", f"{field}.{role_key}")
        role = None
    content = r.string(content_key, value=_text_parts(turn.get(content_key)), field=f"{field}.{content_key}")
    weight = _weight(r, turn.get("weight"), roles.get(role or ""), f"{field}.weight")
    if role is None or content is None or weight is False:
        return None
    return Message(roles[role], content, weight)


def _text_parts(content: Any) -> Any:
    """OpenAI also allows content as a list of {"type": "text", "text": ...} parts; join those."""
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content


def _weight(r: _Record, weight: Any, role: str | None, field: str) -> int | None | bool:
    """The weight (None when absent), or False after reporting a bad one."""
    if weight is None:
        return None
    if isinstance(weight, bool) or weight not in (0, 1) or not isinstance(weight, int):
        r.issue("E012", f"weight must be 0 or 1, got {weight!r}", field)
        return False
    if role is not None and role != "assistant":
        r.issue("E012", f"weight is only allowed on assistant messages (this one is {role})", field)
        return False
    return weight


def _check_conversation(r: _Record, messages: list[Message], key: str) -> None:
    assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not assistants:
        r.issue("E010", "no assistant turn: there is nothing to train on", key)
    elif assistants[0] == 0:
        r.issue("E025", "the conversation starts with an assistant turn; put a user (or system) turn first", key)
    elif messages[-1].role != "assistant":
        r.issue("E011", f"the last turn is {messages[-1].role!r}; a training conversation ends with the "
                        "assistant's reply (drop the trailing turns)", f"{key}[{len(messages) - 1}]")
    elif all(messages[i].weight == 0 for i in assistants):
        r.issue("E020", "every assistant message has weight 0: no token would be trained", key)


def _check_prompt(r: _Record, messages: list[Message], key: str) -> None:
    """Generation's checks, which every valid training conversation passes: the conversation ends with
    the user turn to answer, or with an assistant turn (the reference answer)."""
    if messages[0].role == "assistant":
        r.issue("E025", "the conversation starts with an assistant turn; put a user (or system) turn first", key)
    elif all(m.role == "system" for m in messages):
        r.issue("E010", "only system turns: no user turn to answer", key)
    elif messages[-1].role == "system":
        r.issue("E011", "the last turn is 'system'; a prompt ends with the user turn to answer (or with an "
                        "assistant turn, the reference answer)", f"{key}[{len(messages) - 1}]")
