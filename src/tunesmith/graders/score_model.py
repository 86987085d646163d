"""score_model: a chat model as the judge, asked with templated messages, its reply read as a number.

The grader never loads a model: the caller passes ``judge``, a callable taking a list of conversations
(OpenAI-style message lists) and returning one reply per conversation; the spec's ``sampling_params`` are
passed to it as keyword arguments (none given: ``judge(conversations)``). ``make_model_judge`` builds one
from a local model with tunesmith's batched generation.

As OpenAI documents it: ``range`` defaults to [0, 1]; a score outside it is truncated to it; a reply with no
number scores 0. OpenAI's judge answers in a JSON schema; a local judge writes free text, so the score is
read from it robustly (``parse_score``): a JSON object's result/score field, else "Score: 7", "rating: 4/5",
a reply that is only a number, or the only number in the reply. A fraction a/b is read on the grader's
range: as is when b is the range's top ("4/5" on [1, 5] is 4), otherwise as a share of the range ("7/10" on
[0, 1] is 0.7). Write the prompt so the judge ends with "Score: N".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .core import Grade, GraderError, check_batch, check_keys, failed, field, grader_name, pass_threshold, with_pass
from .template import Template, TemplateError, compile_template

Judge = Callable[..., Sequence[str]]
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # local templates
SAMPLING_PARAMS = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")  # OpenAI's

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_FRACTION = rf"{_NUMBER}(?:\s*(?:/|out of)\s*{_NUMBER})?"
_KEYWORD = re.compile(rf"(?:score|rating|grade|result)\**\s*(?:is|of|=|:)?\s*[:=]?\s*\**\s*{_FRACTION}", re.I)
_ONLY = re.compile(rf"^\W*{_FRACTION}\W*$")
_ANY = re.compile(_FRACTION)
_JSON = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class ScoreModelGrader:
    name: str
    messages: tuple[tuple[str, Template], ...]  # (role, content)
    judge: Judge
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: Mapping[str, Any] | None = None
    model: str | None = None  # the spec's model name, for the record; the judge is what answers
    pass_threshold: float | None = None
    type: str = "score_model"

    def grade_batch(self, samples, items) -> list[Grade]:
        samples, items = check_batch(samples, items)
        prompts: list[list[dict] | Grade] = [self._conversation(s, i) for s, i in zip(samples, items)]
        conversations = [p for p in prompts if not isinstance(p, Grade)]
        replies = list(self.judge(conversations, **(self.sampling_params or {}))) if conversations else []
        if len(replies) != len(conversations):
            raise ValueError(f"the judge returned {len(replies)} replies for {len(conversations)} conversations")
        answers = iter(replies)
        return [with_pass(p if isinstance(p, Grade) else self._score(next(answers)), self.pass_threshold)
                for p in prompts]

    def _conversation(self, sample: Mapping, item: Mapping) -> list[dict] | Grade:
        try:
            return [{"role": role, "content": content.render(sample, item)} for role, content in self.messages]
        except TemplateError as e:
            return failed(str(e))

    def _score(self, reply: str) -> Grade:
        value = parse_score(reply, *self.range)
        if isinstance(value, str):
            return failed(value)
        lo, hi = self.range
        return Grade(min(max(value, lo), hi))  # OpenAI: "truncated to the given range"


def parse_score(reply: str, lo: float = 0.0, hi: float = 1.0) -> float | str:
    """The judge's score, or the reason none could be read (a str)."""
    if not isinstance(reply, str):
        return f"the judge's reply is a {type(reply).__name__}, not text"
    for candidate in [reply.strip(), *_JSON.findall(reply)]:
        value = _json_score(candidate)
        if value is not None:
            return value
    found = _KEYWORD.findall(reply) or _ONLY.findall(reply)
    if not found:
        numbers = _ANY.findall(reply)
        found = numbers if len(numbers) == 1 else []
    if not found:
        shown = reply.strip().replace("\n", " ")
        return f"no score in the judge's reply ({shown[:120]!r}); ask it to end with 'Score: N'"
    number, denominator = found[-1]  # the last verdict, after any reasoning
    return _on_range(float(number), float(denominator) if denominator else None, lo, hi)


def _json_score(text: str) -> float | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    for key in ("result", "score", "rating", "grade"):
        value = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _on_range(number: float, denominator: float | None, lo: float, hi: float) -> float | str:
    if denominator is None or denominator == hi:
        return number
    if denominator <= 0:
        return f"the judge's score {number:g}/{denominator:g} has no meaning"
    return lo + number / denominator * (hi - lo)


def compile_score_model(spec: Mapping[str, Any], where: str, judge: Judge | None) -> ScoreModelGrader:
    check_keys(spec, where, ["input"], ["model", "range", "sampling_params", "pass_threshold"])
    messages = _messages(spec, where)
    lo, hi = _range(spec, where)
    params = field(spec, "sampling_params", where, dict) or {}
    unknown = [k for k in params if k not in SAMPLING_PARAMS]
    if unknown:
        raise GraderError(f"{where}.sampling_params: unknown parameter {unknown[0]!r}; OpenAI's are: "
                          f"{', '.join(SAMPLING_PARAMS)}")
    if judge is None:
        raise GraderError(f"{where}: a score_model grader needs a judge model: pass judge=... to compile_grader "
                          "(a callable: conversations -> replies), or --judge MODEL to `tunesmith grade`")
    return ScoreModelGrader(grader_name(spec, where), messages, judge, (lo, hi), params or None,
                            field(spec, "model", where, str), pass_threshold(spec, where))


def _messages(spec: Mapping, where: str) -> tuple[tuple[str, Template], ...]:
    messages = field(spec, "input", where, list)
    if not messages:
        raise GraderError(f"{where}.input: a list of messages, e.g. [{{\"role\": \"user\", \"content\": "
                          "\"Rate this answer from 0 to 1: {{sample.output_text}}\"}]")
    out = []
    for k, message in enumerate(messages):
        here = f"{where}.input[{k}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise GraderError(f"{here}: a message is {{\"role\": one of {', '.join(ROLES)}, \"content\": ...}}, "
                              f"got {json.dumps(message)[:80]}")
        extra = [key for key in message if key not in ("role", "content", "type")]
        if extra:
            raise GraderError(f"{here}: unknown field {extra[0]!r} (a message has role, content and type)")
        out.append((ROLES[message["role"]], compile_template(_content_text(message["content"], here), here)))
    return tuple(out)


def _content_text(content: Any, where: str) -> str:
    """A string, or OpenAI's content parts: text parts joined; images and audio refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    texts = []
    for part in content if isinstance(content, list) else [None]:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") or \
                not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise GraderError(f"{where}.content: a {kind!r} part is not supported; a local judge reads text "
                              "(a string, or parts {\"type\": \"input_text\", \"text\": ...})")
        texts.append(part["text"])
    return "\n".join(texts)


def _range(spec: Mapping, where: str) -> tuple[float, float]:
    value = spec.get("range", [0, 1])
    if not (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1]):
        raise GraderError(f"{where}.range: [min, max] with min < max, e.g. [0, 1] (the default) or [1, 10]; "
                          f"got {json.dumps(value)[:60]}")
    return float(value[0]), float(value[1])


def make_model_judge(model, tokenizer, *, batch_size: int = 8, max_new_tokens: int = 256) -> Judge:
    """A judge from a loaded chat model: greedy unless the grader's sampling_params set a temperature > 0.

    max_completions_tokens overrides max_new_tokens; reasoning_effort has no meaning for a local model and
    is ignored (it is accepted because OpenAI's graders may carry it)."""
    from ..evaluate.generate import generate_batch

    def judge(conversations, *, temperature: float | None = None, top_p: float | None = None,
              seed: int | None = None, max_completions_tokens: int | None = None,
              reasoning_effort: str | None = None) -> list[str]:
        sample = bool(temperature)
        return generate_batch(model, tokenizer, conversations, batch_size=batch_size,
                              max_new_tokens=max_completions_tokens or max_new_tokens, do_sample=sample,
                              temperature=temperature if sample else 1.0, top_p=top_p or 1.0, seed=seed)

    return judge


class LazyModelJudge:
    """A judge (``make_model_judge``) whose model, a tunesmith model reference, loads on the first call: every input
    error is reported before it loads, and a run whose grader never reaches a score_model never loads it."""

    def __init__(self, ref: str):
        self.ref, self.judge = ref, None

    def __call__(self, conversations, **sampling_params):
        if self.judge is None:
            from ..models import load_for_inference

            self.judge = make_model_judge(*load_for_inference(self.ref))
        return self.judge(conversations, **sampling_params)
