"""OpenAI's grader templates: ``{{ namespace.path }}`` replaced by a value of the sample or the data row.

Namespaces (OpenAI's guide, "Templating"): ``item``, the data row (any field, nested), and ``sample``, the
model's output: ``output_text``, ``output_json`` (the output parsed as JSON, None when it is not JSON),
``output_tools``, ``choices`` and ``output_audio`` (present when the caller's sample carries them).
Nested values are reached with a JSON-path-like syntax: ``item.ground_truth.date``, ``item.answers[0]``,
``item.answers.0``, ``item["odd key"]``. Strings are inserted as they are; other values as JSON.

Checked when the grader compiles: the namespace, the sample field, the path syntax. Checked per sample: that
the path exists in the row or the output; a missing one fails that sample with a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .core import GraderError

SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices", "output_audio")
_TAG = re.compile(r"\{\{(.*?)\}\}", re.S)
# one step of a path: .key, [3], ["key"] or ['key']
_STEP = re.compile(r"""\.([^.\[\]\s]+)|\[(\d+)\]|\[\s*"([^"]*)"\s*\]|\[\s*'([^']*)'\s*\]""")


class TemplateError(Exception):
    """A template path missing in this sample or row: that sample's grade fails with this message."""


@dataclass(frozen=True)
class Variable:
    text: str  # as written, for messages
    namespace: str
    path: tuple[str | int, ...]

    def lookup(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
        value: Any = sample if self.namespace == "sample" else item
        for depth, step in enumerate(self.path):
            value = _step(value, step, self, depth)
        if value is None and self.namespace == "sample" and self.path[:1] == ("output_json",):
            raise TemplateError(f"{{{{{self.text}}}}}: the output is not valid JSON, so sample.output_json is null")
        return value


@dataclass(frozen=True)
class Template:
    """A string with {{ }} variables, compiled once, rendered per (sample, item)."""

    parts: tuple[str | Variable, ...]

    @property
    def variables(self) -> list[Variable]:
        return [p for p in self.parts if isinstance(p, Variable)]

    def render(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
        """The text with every variable replaced; TemplateError names the first one that is missing."""
        return "".join(p if isinstance(p, str) else _as_text(p.lookup(sample, item)) for p in self.parts)


def compile_template(text: str, where: str) -> Template:
    parts: list[str | Variable] = []
    pos = 0
    for m in _TAG.finditer(text):
        parts.append(text[pos:m.start()])
        parts.append(parse_variable(m.group(1).strip(), where))
        pos = m.end()
    parts.append(text[pos:])
    return Template(tuple(p for p in parts if p != ""))


def parse_variable(text: str, where: str) -> Variable:
    namespace = re.split(r"[.\[]", text, maxsplit=1)[0]
    if namespace not in ("item", "sample"):
        raise GraderError(f"{where}: template {{{{{text}}}}}: unknown namespace {namespace!r}; OpenAI's templates "
                          "use {{item.FIELD}} (the data row) or {{sample.FIELD}} (the model's output)")
    rest, path = text[len(namespace):], []
    while rest:
        m = _STEP.match(rest)
        if not m:
            raise GraderError(f"{where}: template {{{{{text}}}}}: cannot read the path at {rest!r}; write "
                              "item.a.b, item.list[0] or item[\"odd key\"]")
        key, index, dq, sq = m.groups()
        path.append(int(index) if index is not None else next(k for k in (key, dq, sq) if k is not None))
        rest = rest[m.end():]
    if not path:
        raise GraderError(f"{where}: template {{{{{text}}}}} names a whole namespace; name a field, e.g. "
                          f"{{{{{namespace}.{'output_text' if namespace == 'sample' else 'answer'}}}}}")
    if namespace == "sample" and path[0] not in SAMPLE_FIELDS:
        raise GraderError(f"{where}: template {{{{{text}}}}}: a sample has no field {path[0]!r}; it has "
                          f"{', '.join(SAMPLE_FIELDS)}")
    return Variable(text, namespace, tuple(path))


def _step(value: Any, step: str | int, var: Variable, depth: int) -> Any:
    here = ".".join([var.namespace, *map(str, var.path[:depth])])
    if isinstance(value, Mapping):
        if str(step) in value:
            return value[str(step)]
        fields = ", ".join(map(str, list(value)[:12])) or "none"
        what = "the data row" if depth == 0 and var.namespace == "item" else here
        raise TemplateError(f"{{{{{var.text}}}}}: {what} has no field {str(step)!r} (its fields: {fields})")
    if isinstance(value, list) and (isinstance(step, int) or str(step).isdigit()):
        if int(step) < len(value):
            return value[int(step)]
        raise TemplateError(f"{{{{{var.text}}}}}: {here} has {len(value)} elements, no index {step}")
    if value is None and here == "sample.output_json":
        raise TemplateError(f"{{{{{var.text}}}}}: the output is not valid JSON, so sample.output_json is null")
    raise TemplateError(f"{{{{{var.text}}}}}: {here} is {json.dumps(value)[:40]}, which has no field {step!r}")


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
