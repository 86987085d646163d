"""`tunesmith eval`: the real command on tiny runs, checked against the evaluation library called directly."""

import json
import sys

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data import load_examples, prompt_and_reference
from tunesmith.evaluate import generate_batch, reference_loss
from tunesmith.models import load_for_inference, load_model
from tunesmith.train import train

METRICS = ["exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu"]


def _run(path, tiny_model_dir, tiny_data, *overrides):
    train_f, valid_f = tiny_data
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                             f"output_dir={path}", "data.max_length=64", "train.batch_size=4", "train.max_steps=4",
                             "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=4", "eval.samples=0",
                             "eval.metric_examples=0", "eval.compare_base=false", "method.lora.r=4", *overrides])
    return train(cfg, quiet=True).output_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_data):
    return _run(tmp_path_factory.mktemp("eval-lora") / "run", tiny_model_dir, tiny_data)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, tiny_data):
    return _run(tmp_path_factory.mktemp("eval-full") / "run", tiny_model_dir, tiny_data, "method.name=full",
                "train.max_steps=6")


@pytest.fixture(scope="module")
def test_set(tiny_data):
    pairs = [prompt_and_reference(e) for e in load_examples(tiny_data[1])]
    return [p for p, _ in pairs], [r for _, r in pairs]


def test_lora_run_against_its_base_by_default(lora_run, tiny_data, tiny_model_dir, test_set, capsys):
    assert main(["eval", str(lora_run), "--data", str(tiny_data[1]), "--max-new-tokens", "4", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    out = lora_run / "eval" / "valid"  # the default for a run folder
    result = json.loads((out / "eval.json").read_text())
    convs, refs = test_set
    assert result["examples"] == len(refs) == 8
    assert result["baseline"] == str(tiny_model_dir) and "adapters disabled" in result["baseline_how"]

    # The figures are the library's, on the same models: tuned = the run's adapter, base = the untouched model.
    tuned, tok = load_for_inference(lora_run)
    assert result["tuned"]["predictions"] == generate_batch(tuned, tok, convs, max_new_tokens=4)
    assert result["tuned"]["loss"]["loss"] == pytest.approx(reference_loss(tuned, tok, convs, refs)["loss"], rel=1e-5)
    base = load_model(tiny_model_dir, dtype=tuned.dtype, tokenizer=tok).eval()
    assert result["base"]["loss"]["loss"] == pytest.approx(reference_loss(base, tok, convs, refs)["loss"], rel=1e-5)
    assert result["base"]["predictions"] == generate_batch(base, tok, convs, max_new_tokens=4)
    assert result["tuned"]["loss"]["loss"] < result["base"]["loss"]["loss"]  # four steps of training did something

    # One comparison per metric: every example is a win, a loss or a tie; the interval brackets the mean.
    assert list(result["comparisons"]) == METRICS and result["comparison"] == result["comparisons"]["exact_match"]
    for c in result["comparisons"].values():
        assert c["wins"] + c["losses"] + c["ties"] == c["n"] == 8
        assert c["ci_low"] - 1e-12 <= c["diff"] <= c["ci_high"] + 1e-12

    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["reference"] for r in rows] == refs
    assert [r["output"] for r in rows] == result["tuned"]["predictions"]
    assert [r["baseline_output"] for r in rows] == result["base"]["predictions"]
    em = result["comparisons"]["exact_match"]
    assert sum(r["winner"] == "model" for r in rows) == em["wins"] and sum(r["winner"] == "tie" for r in rows) == em["ties"]
    assert "| exact_match |" in table and "| loss |" in table and "wins/losses/ties" in table
    assert (out / "eval.md").read_text().strip() == table.split("\n\nwrote ")[0].strip()


def test_full_run_loads_its_base_with_the_run_tokenizer(full_run, tiny_data, tiny_model_dir, test_set, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["eval", str(full_run), "--data", str(tiny_data[1]), "--max-new-tokens", "4", "--out", str(out),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())
    assert printed["baseline_how"] == "the base model, with the run's tokenizer"
    assert "predictions" not in printed["tuned"] and len(saved["tuned"]["predictions"]) == 8
    assert printed["comparisons"] == saved["comparisons"]
    convs, refs = test_set
    base, tok = load_for_inference(tiny_model_dir)
    assert saved["base"]["loss"]["loss"] == pytest.approx(reference_loss(base, tok, convs, refs)["loss"], rel=1e-5)
    assert saved["tuned"]["loss"]["loss"] < saved["base"]["loss"]["loss"]  # the tuned weights, not the base's


def test_no_baseline_and_an_explicit_baseline(lora_run, tiny_data, tiny_model_dir, tmp_path, capsys):
    assert main(["eval", str(lora_run), "--data", str(tiny_data[1]), "--max-new-tokens", "2", "--no-baseline",
                 "--out", str(tmp_path / "alone"), "--limit", "3"]) == 0
    alone = json.loads((tmp_path / "alone" / "eval.json").read_text())
    assert "base" not in alone and "comparison" not in alone and alone["examples"] == 3
    assert "| metric | model |" in capsys.readouterr().out
    # naming the run's own base explicitly still reuses the adapter model
    assert main(["eval", str(lora_run), "--data", str(tiny_data[1]), "--max-new-tokens", "2", "--baseline",
                 str(tiny_model_dir), "--out", str(tmp_path / "named"), "--limit", "3", "--bootstrap", "50"]) == 0
    named = json.loads((tmp_path / "named" / "eval.json").read_text())
    assert "adapters disabled" in named["baseline_how"] and named["comparison"]["n_boot"] == 50


def test_a_plain_model_has_no_default_baseline(tiny_model_dir, tiny_data, tmp_path):
    assert main(["eval", str(tiny_model_dir), "--data", str(tiny_data[1]), "--max-new-tokens", "2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["baseline"] is None and "base" not in result and set(result["tuned"]["metrics"]) == set(METRICS)


def test_custom_metric_from_the_working_directory(lora_run, tiny_data, tmp_path, monkeypatch):
    (tmp_path / "cli_metric_mod.py").write_text("def words(prediction, reference):\n"
                                                "    return float(len(prediction.split()))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["eval", str(lora_run), "--data", str(tiny_data[1]), "--max-new-tokens", "3", "--limit", "4",
                 "--metric", "cli_metric_mod:words", "--out", "res"]) == 0
    result = json.loads((tmp_path / "res" / "eval.json").read_text())
    name = "cli_metric_mod:words"
    preds = result["tuned"]["predictions"]
    assert result["tuned"]["metrics"][name] == pytest.approx(sum(len(p.split()) for p in preds) / len(preds))
    assert name in result["comparisons"]


def test_bad_input_exits_2_before_any_model_loads(lora_run, tiny_data, tmp_path, capsys):
    args = ["eval", str(lora_run), "--out", str(tmp_path / "never")]
    assert main(args + ["--data", str(tiny_data[1]), "--metric", "no_such_metric"]) == 2
    assert "unknown metric 'no_such_metric'" in capsys.readouterr().err
    assert main(args + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    text_only = tmp_path / "text.jsonl"
    text_only.write_text('{"text": "just text"}\n')
    assert main(args + ["--data", str(text_only)]) == 2
    assert "no conversation with an assistant answer" in capsys.readouterr().err
    assert main(args + ["--data", str(tiny_data[1]), "--batch-size", "0"]) == 2
    assert not (tmp_path / "never").exists()
