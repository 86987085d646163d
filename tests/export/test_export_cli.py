"""`tunesmith export` end to end: train a tiny run, export it three ways, generate from every export."""

import json

import pytest

from tunesmith.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_data):
    out = tmp_path_factory.mktemp("trained") / "run"
    train_f, valid_f = tiny_data
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train_f), "--valid", str(valid_f),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "5e-2", "--out", str(out), "--quiet",
                 "--set", "data.max_length=64", "--set", "eval.max_new_tokens=4",
                 "--set", "eval.compare_examples=4"]) == 0
    return out


def _generate(model, capsys):
    assert main(["generate", str(model), "--prompt", "fox dog paris", "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out


def test_export_every_format_and_generate_from_each(trained_run, tmp_path, capsys):
    capsys.readouterr()
    expected = _generate(trained_run, capsys)
    assert len(expected.strip()) > 3  # a real answer to compare, not an empty one
    hf, gguf_file, adapter = tmp_path / "hf", tmp_path / "run.gguf", tmp_path / "adapter"
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(hf)]) == 0
    out = capsys.readouterr().out
    assert "ok   reloaded folder vs the source" in out and "FAIL" not in out and f"wrote {hf}" in out
    assert main(["export", str(trained_run), "--format", "gguf", "--dtype", "f32", "--out", str(gguf_file)]) == 0
    assert "ok   GGUF read back vs the source" in capsys.readouterr().out
    assert main(["export", str(trained_run), "--format", "adapter", "--out", str(adapter)]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    # generate accepts the exported folder, the GGUF file and the adapter: same greedy answer as the run
    assert _generate(hf, capsys) == expected
    assert _generate(gguf_file, capsys) == expected
    assert _generate(adapter, capsys) == expected
    assert json.loads((hf / "tunesmith.json").read_text())["exported_from"] == str(trained_run)


def test_q8_0_export_reports_its_cost(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok   GGUF read back vs the source with weights rounded to q8_0 as stored" in out
    assert "info q8_0 weights vs the f32 source" in out
    assert (tmp_path / "run-q8_0.gguf").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--format", "hf", "--dtype", "q8_0"], "q8_0 is a GGUF type"),
    (["--format", "gguf", "--out-file", "x"], None),
    (["--format", "adapter", "--dtype", "f16"], "--dtype does not apply"),
])
def test_bad_arguments_exit_2_before_loading(trained_run, tmp_path, capsys, argv, message):
    if message is None:  # argparse's own error
        with pytest.raises(SystemExit) as e:
            main(["export", str(trained_run), *argv])
        assert e.value.code == 2
        return
    assert main(["export", str(trained_run), *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "x").exists()
