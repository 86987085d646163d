"""`tunesmith grade`: run a grader on given replies, print each row's score and the mean.

Model-free unless the grader has a score_model and --judge names a model, which then loads on the first
judge call, after the grader and both files were checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import GraderError, compile_grader, load_grader_spec, make_sample, needs_judge
from .score_model import LazyModelJudge
from .core import Grade, parse_json_output

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def run(args) -> int:
    try:
        spec = _spec(args.grader)
        if isinstance(spec, dict) and needs_judge(spec) and not args.judge:
            raise GraderError(f"{args.grader}: the grader has a score_model, which needs a judge: give --judge "
                              "MODEL (a run folder, saved model, alias or HF folder)")
        rows = read_rows(args.data)
        samples = read_replies(args.outputs, rows, args.data)
        judge = LazyModelJudge(args.judge) if args.judge and isinstance(spec, dict) and needs_judge(spec) else None
        if args.judge and judge is None:
            print("note: --judge is not used: the grader has no score_model", file=sys.stderr)
        grader = compile_grader(spec, judge=judge)
    except GraderError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    grades = grader.grade_batch(samples, [row for _, row in rows])
    print(json.dumps(summary(grades), indent=2) if args.json else format_grades(grades))
    return EXIT_OK


def _spec(ref: str) -> Any:
    """A grader JSON file, or "module:function" when no such file exists."""
    if Path(ref).exists() or ":" not in ref:
        return load_grader_spec(ref)
    return ref


def read_rows(path: str) -> list[tuple[int, dict]]:
    """The data rows with their line numbers (records of a .jsonl, .json, .csv or .parquet file, read as training
    data is: data.readers.read_file, its issues with file, line and code)."""
    from ..data.readers import read_file

    raw = read_file(path)
    if raw.issues:
        raise GraderError("\n".join(i.format() for i in raw.issues))
    for rec, origin in raw.records:
        if not isinstance(rec, dict):
            raise GraderError(f"{origin}: a data row is a JSON object, got {json.dumps(rec)[:60]}")
    return [(origin.line, rec) for rec, origin in raw.records]


def read_replies(path: str, rows: list[tuple[int, dict]], data_path: str) -> list[dict]:
    """One reply per data row, in order: a JSON string, or an object with output_text (or `output`, as
    `tunesmith generate` writes); the object's other sample fields (output_tools, choices) are kept."""
    samples: list[dict] = []
    for line_no, text in _lines(path):
        if len(samples) == len(rows):
            raise GraderError(f"{path}:{line_no}: reply {len(samples) + 1}, but {data_path} has only {len(rows)} "
                              "rows; give one reply line per data row, in the same order")
        samples.append(_reply(text, f"{path}:{line_no}"))
    if len(samples) < len(rows):
        raise GraderError(f"{data_path}:{rows[len(samples)][0]}: row {len(samples) + 1} has no reply: {path} has "
                          f"{len(samples)}; give one reply line per data row, in the same order")
    return samples


def _reply(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise GraderError(f"{where}: not valid JSON ({e.msg}); a reply line is a JSON string, e.g. \"Paris\", "
                          "or {\"output_text\": \"Paris\"}") from None
    if isinstance(value, str):
        return make_sample(value)
    if isinstance(value, dict):
        key = "output_text" if "output_text" in value else "output"
        if isinstance(value.get(key), str):
            extra = {k: v for k, v in value.items() if k in ("output_tools", "choices", "output_audio")}
            json_part = {"output_json": value["output_json"]} if "output_json" in value else \
                {"output_json": parse_json_output(value[key])}
            return {"output_text": value[key], **json_part, **extra}
    raise GraderError(f"{where}: a reply line is a JSON string or an object with an \"output_text\" string, "
                      f"got {text[:60]}")


def _lines(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, text in enumerate(f, 1):
                if text.strip():
                    yield line_no, text
    except (OSError, UnicodeDecodeError) as e:
        raise GraderError(f"{path}: cannot read it ({e})") from None


def summary(grades: list[Grade]) -> dict:
    """Per-row grades, the mean, per sub-grader means (multi), and the pass rate where a threshold is set."""
    out: dict[str, Any] = {"rows": [{"row": k + 1, "score": g.score} | ({"reason": g.reason} if g.reason else {})
                                    | ({"sub_scores": g.sub_scores} if g.sub_scores else {})
                                    | ({"passed": g.passed} if g.passed is not None else {})
                                    for k, g in enumerate(grades)],
                           "mean": sum(g.score for g in grades) / len(grades),
                           "with_reason": sum(1 for g in grades if g.reason)}
    if grades[0].sub_scores:
        out["sub_means"] = {n: sum(g.sub_scores[n] for g in grades) / len(grades) for n in grades[0].sub_scores}
    if grades[0].passed is not None:
        out["pass_rate"] = sum(1 for g in grades if g.passed) / len(grades)
    return out


def format_grades(grades: list[Grade]) -> str:
    s = summary(grades)
    names = list(s.get("sub_means", {}))
    lines = ["row     score" + "".join(f" {n[:12]:>12s}" for n in names) + "  reason"]
    for r in s["rows"]:
        subs = "".join(f" {r['sub_scores'][n]:12.4f}" for n in names)
        lines.append(f"{r['row']:<5d} {r['score']:7.4f}{subs}  {r.get('reason') or ''}".rstrip())
    lines.append(f"mean  {s['mean']:7.4f}" + "".join(f" {s['sub_means'][n]:12.4f}" for n in names)
                 + f"  ({len(grades)} rows; {s['with_reason']} with a failure reason)")
    if "pass_rate" in s:
        lines.append(f"passed: {s['pass_rate']:.1%}")
    return "\n".join(lines)

