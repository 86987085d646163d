"""The one canonical in-memory example: every input format converts to it, and only it is rendered."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Origin:
    """Where an example came from: 1-based ``line`` (JSONL/CSV) or 0-based record index (JSON/Parquet)."""

    path: str
    line: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}[{self.line}]"


@dataclass(frozen=True)
class Message:
    """A chat turn. ``weight`` (assistant only): 0 = no loss on this message, 1 or None = trained."""

    role: str
    content: str
    weight: int | None = None

    def as_dict(self) -> dict[str, str]:
        """The form chat templates take (weight is ours, not the template's)."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Example:
    """Exactly one of ``messages`` (a chat) or ``text`` (plain text, every token trained) is set."""

    messages: tuple[Message, ...] | None
    text: str | None
    origin: Origin

    def __post_init__(self):
        if (self.messages is None) == (self.text is None):
            raise ValueError("Example needs exactly one of messages or text")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def prompt_and_reference(example: Example) -> tuple[list[dict[str, str]], str]:
    """(conversation up to the last assistant turn, that turn's text): what generation/eval needs.

    The conversation is a list of ``{"role", "content"}`` dicts ready for ``apply_chat_template``
    with ``add_generation_prompt=True``.
    """
    if example.messages is None:
        raise ValueError(f"{example.origin}: a plain-text example has no prompt/reference pair")
    last = len(example.messages) - 1
    while last >= 0 and example.messages[last].role != "assistant":
        last -= 1
    if last < 0:
        raise ValueError(f"{example.origin}: the conversation has no assistant turn")
    return [m.as_dict() for m in example.messages[:last]], example.messages[last].content


def prompt_and_optional_reference(example: Example) -> tuple[list[dict[str, str]], str | None]:
    """Generation's view: a conversation that ends with a user turn is all prompt, with no reference.

    Any other chat is :func:`prompt_and_reference`. Only files read with ``prompt_only=True`` hold
    such conversations: training data must end with the assistant's reply (E010/E011).
    """
    if example.messages is not None and example.messages[-1].role == "user":
        return [m.as_dict() for m in example.messages], None
    return prompt_and_reference(example)
