"""Every malformed input of tests/corpus/bad_inputs/ through the CLI: `tunesmith check` and `tunesmith train`
reject it before any model loads, exit 2 without a traceback, and name the file, the line (or record),
the field and the error code (expected.yaml says which); the few odd-but-valid inputs are accepted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "expected.yaml").read_text())["cases"]


def test_the_corpus_is_complete():
    files = {p.name for p in CORPUS.iterdir() if p.name not in ("expected.yaml", "make_corpus.py")}
    assert files == set(CASES), files ^ set(CASES)
    assert sum(1 for c in CASES.values() if not c.get("accept")) >= 40


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load model weights fails the test (the tokenizer may load: data is checked with it)."""
    import transformers

    from tunesmith import models
    from tunesmith.models import loading

    def refuse(*a, **kw):
        pytest.fail("a model was loaded although the input is bad")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setenv("COLUMNS", "1000")  # the check report is not wrapped, so each issue stays on one line


def _argv(verb: str, name: str, case: dict, tiny_model_dir, out: Path) -> list[str]:
    path = str(CORPUS / name)
    argv = [verb] + ([path] if name.startswith("cfg_") else ["--data", path])
    if not case.get("own_model"):
        argv += ["--model", str(tiny_model_dir)]
    for item in case.get("set", []):
        argv += ["--set", item]
    if verb == "train":
        argv += ["--out", str(out), "--quiet"]
    return argv


def _location(name: str, case: dict) -> str:
    where = case.get("path", name)
    if case.get("line") is not None:
        return f"{where}:{case['line']}"
    if case.get("record") is not None:
        return f"{where}[{case['record']}]"
    return where


def assert_names_everything(text: str, name: str, case: dict) -> None:
    assert "Traceback" not in text, text
    loc, field, code = _location(name, case), case.get("field"), case["code"]
    assert loc in text, f"location {loc!r} missing:\n{text}"
    if code.startswith("E"):  # data issues read FILE:LINE: FIELD: CODE message
        assert f"{loc}: {field + ': ' if field else ''}{code}" in text, text
    else:  # config errors read FILE:LINE: FIELD: message [CODE]
        assert f"[{code}]" in text and (field is None or f"{loc}: {field}" in text), text
    assert case["says"] in text, text


REJECTED = sorted(n for n, c in CASES.items() if not c.get("accept"))


@pytest.mark.parametrize("verb", ["check", "train"])
@pytest.mark.parametrize("name", REJECTED)
def test_bad_input_is_rejected_before_the_model_loads(name, verb, tiny_model_dir, tmp_path, capsys, no_model_loads):
    case = CASES[name]
    assert main(_argv(verb, name, case, tiny_model_dir, tmp_path / "run")) == 2
    captured = capsys.readouterr()
    assert_names_everything(captured.out + captured.err, name, case)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.get("accept")))
def test_odd_but_valid_input_is_accepted(name, tiny_model_dir, tmp_path, capsys, no_model_loads):
    assert main(_argv("check", name, CASES[name], tiny_model_dir, tmp_path)) == 0, capsys.readouterr()
    assert "data check: OK" in capsys.readouterr().out


def test_the_installed_command_rejects_bad_input_too(tiny_model_dir, tmp_path):
    """A few cases through the real `tunesmith` executable (fresh processes, started together)."""
    exe = str(Path(sys.executable).parent / "tunesmith")
    picks = [("train", "broken_json.jsonl"), ("train", "cfg_unknown_key.yaml"), ("check", "parquet_wrong_schema.parquet")]
    procs = [(name, subprocess.Popen([exe] + _argv(verb, name, CASES[name], tiny_model_dir, tmp_path / name),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=os.environ | {"COLUMNS": "1000"}))
             for verb, name in picks]
    for name, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert_names_everything(out + err, name, CASES[name])
