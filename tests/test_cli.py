"""One smoke test per CLI verb: the real command on a tiny model, checking the files and figures it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.cli import main


def _train_args(tmp_path, tiny_model_dir, tiny_data, *extra):
    train_f, valid_f = tiny_data
    return ["train", "--model", str(tiny_model_dir), "--data", str(train_f), "--valid", str(valid_f),
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--out", str(tmp_path / "run"), "--quiet",
            "--set", "data.max_length=64", "--set", "eval.max_new_tokens=4", "--set", "eval.compare_examples=4",
            *extra]


def test_train_generate_and_resume(tmp_path, tiny_model_dir, tiny_data, capsys):
    assert main(_train_args(tmp_path, tiny_model_dir, tiny_data)) == 0
    run = tmp_path / "run"
    assert (run / "best" / "adapter_model.safetensors").exists()
    assert "held-out exact match" in capsys.readouterr().out
    # the same folder again is refused, with the way out named
    assert main(_train_args(tmp_path, tiny_model_dir, tiny_data)) == 2
    assert "--resume" in capsys.readouterr().err
    # generate from the run folder, one prompt and a data file
    assert main(["generate", str(run), "--prompt", "fox dog paris", "--max-new-tokens", "4"]) == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["generate", str(run), "--data", str(tiny_data[1]), "--out", str(preds), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 8 and all("output" in r for r in rows)


def test_train_full_and_freeze_methods(tmp_path, tiny_model_dir, tiny_data):
    assert main(_train_args(tmp_path / "f", tiny_model_dir, tiny_data, "--method", "full")) == 0
    assert (tmp_path / "f" / "run" / "best" / "config.json").exists()
    assert main(_train_args(tmp_path / "z", tiny_model_dir, tiny_data, "--method", "freeze",
                            "--set", "method.freeze.train_last_layers=1")) == 0


def test_check_reports_and_fails_on_bad_data(tmp_path, tiny_model_dir, tiny_data, capsys):
    assert main(["check", "--model", str(tiny_model_dir), "--data", str(tiny_data[0]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert main(["check", "--model", str(tiny_model_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "bad.jsonl" in text and "Traceback" not in text


def test_bad_config_key_exits_2_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "train.learning_rate: unknown key" in capsys.readouterr().err


def test_models_lists_the_builtin_alias(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["alias"] == "smollm2-135m-instruct" for r in rows)


def test_console_script_help_for_every_verb():
    exe = Path(sys.executable).parent / "tunesmith"
    for verb in ("train", "check", "generate", "models"):
        r = subprocess.run([str(exe), verb, "--help"], capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0 and "usage: tunesmith" in r.stdout, verb


@pytest.mark.parametrize("finished", [True, False])
def test_a_launched_process_waits_for_every_collective_before_it_exits(monkeypatch, finished):
    """A finished run waits in a barrier (gloo's completes after every earlier collective, so its worker threads
    free them while the interpreter is alive), then destroys the group; after an error, where the ranks may be
    at different collectives, it only destroys it."""
    import torch.distributed as tdist

    from tunesmith import cli

    calls = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: calls.append("destroy"))
    cli._end_process_group(finished)
    assert calls == (["barrier", "destroy"] if finished else ["destroy"])
