"""`tunesmith grade` end to end: the real command on small files; bad graders and files exit 2 with a
message naming the file, the line and the field."""

import json
import subprocess
import sys

import pytest

from tunesmith.cli import main

MULTI = {"type": "multi", "name": "city", "graders": {
    "exact": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
              "operation": "eq"},
    "close": {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
              "evaluation_metric": "fuzzy_match"},
    "short": {"type": "python", "source": "def grade(sample, item):\n    return 1.0 / len(sample['output_text'])\n"}},
    "calculate_output": "0.5 * exact + 0.5 * close + 0 * short"}


def _files(tmp_path, grader=MULTI, replies=('"Paris"', '{"output_text": "Rom"}', '{"output": "Berlin"}')):
    (tmp_path / "grader.json").write_text(json.dumps(grader) if isinstance(grader, dict) else grader)
    (tmp_path / "rows.jsonl").write_text('{"answer": "Paris"}\n{"answer": "Rome"}\n\n{"answer": "Berlin"}\n')
    (tmp_path / "replies.jsonl").write_text("\n".join(replies) + "\n")
    return ["--grader", str(tmp_path / "grader.json"), "--data", str(tmp_path / "rows.jsonl"),
            "--outputs", str(tmp_path / "replies.jsonl")]


def _grade(*args):
    return subprocess.run([sys.executable, "-m", "tunesmith", "grade", *args], capture_output=True, text=True,
                          timeout=60)


def test_grade_prints_rows_means_per_grader_and_exits_0(tmp_path):
    done = _grade(*_files(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["row", "score", "exact", "close", "short", "reason"]
    # Rom against Rome: fuzzy 2 * 3 / 7; the multi's score is half of it
    assert lines[2].split() == ["2", "0.4286", "0.0000", "0.8571", "0.3333"]
    assert lines[-1].startswith("mean   0.8095       0.6667       0.9524")
    data = json.loads(_grade(*_files(tmp_path), "--json").stdout)
    assert data["mean"] == pytest.approx((1 + 3 / 7 + 1) / 3)
    assert data["sub_means"]["exact"] == pytest.approx(2 / 3)
    assert data["rows"][1] == {"row": 2, "score": pytest.approx(3 / 7),
                               "sub_scores": {"exact": 0.0, "close": pytest.approx(6 / 7), "short": pytest.approx(1 / 3)}}


@pytest.mark.parametrize("grader, replies, message", [
    ({"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "is"},
     None, "error: grader.operation: 'is' is not one of: eq, ne, like, ilike"),
    ('{"type": "string_check",\n "input": }', None, "grader.json:2:11: not valid JSON (Expecting value)"),
    (MULTI, ['"Paris"', '"Rome"'], "rows.jsonl:4: row 3 has no reply: "),
    (MULTI, ['"Paris"', '"Rome"', '"Berlin"', '"Oslo"'], "replies.jsonl:4: reply 4, but "),
    (MULTI, ['"Paris"', '{"text": "Rome"}', '"Berlin"'], "replies.jsonl:2: a reply line is a JSON string or an object"),
    ({"type": "score_model", "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}]}, None,
     "the grader has a score_model, which needs a judge: give --judge MODEL"),
])
def test_bad_graders_and_files_exit_2_with_the_place(tmp_path, grader, replies, message):
    done = _grade(*_files(tmp_path, grader, replies or ('"Paris"', '"Rome"', '"Berlin"')))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_grade_with_a_judge_model(tmp_path, tiny_model_dir, capsys):
    """--judge loads the model (here the tiny random one) and asks it; its babble has no score: reasons."""
    grader = {"type": "score_model", "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}],
              "sampling_params": {"max_completions_tokens": 4}}
    assert main(["grade", *_files(tmp_path, grader), "--judge", str(tiny_model_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 3
    assert all(r["score"] == 0.0 and r["reason"].startswith("no score in the judge's reply") for r in rows
               if "reason" in r)
