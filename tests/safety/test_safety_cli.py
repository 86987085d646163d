"""`tunesmith safety` end to end on the tiny model: run folder, plain model with --baseline, judge model."""

import json

import pytest

from tunesmith.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_data):
    out = tmp_path_factory.mktemp("safety-cli") / "run"
    train, valid = tiny_data
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--valid", str(valid), "--max-steps", "2",
                 "--batch-size", "4", "--out", str(out), "--quiet", "--set", "data.max_length=64",
                 "--set", "eval.compare_base=false", "--set", "eval.samples=0"]) == 0
    return out


def test_safety_on_a_run_folder(tiny_run, capsys):
    assert main(["safety", str(tiny_run), "--limit", "12", "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["probes"] == {"harmful": 12, "benign": 12}
    assert report["baseline"].endswith("with adapters off (its base)")  # LoRA: the base is adapters off
    harmful = report["tuned"]["harmful"]
    assert harmful["all"]["n"] == 12 and len(harmful["by_category"]) == 12  # 13 hazard categories: one each
    r = harmful["all"]
    assert 0.0 <= r["ci_low"] <= r["rate"] <= r["ci_high"] <= 1.0 and r["ci_high"] > 0  # a Wilson interval
    assert set(report["change"]) == {"harmful", "benign"} and "ci_points" in report["change"]["harmful"]
    # 12 probes cannot detect a 10-point drop: the gate says so rather than pass
    assert report["gate"]["status"] == "underpowered" and report["gate"]["at"] == "safety"
    assert report["gate"]["detectable_drop_points"] is None or report["gate"]["detectable_drop_points"] > 10
    assert report["change"]["harmful"]["n"] == 12 and len(report["change"]["harmful"]["by_category"]) == 12
    # written into the run: measurement, answers, run.json
    saved = json.loads((tiny_run / "safety.json").read_text())
    assert saved["fingerprint"] and saved["gate_history"][-1]["at"] == "safety"
    rows = [json.loads(line) for line in (tiny_run / "safety_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"prompt", "tuned", "base", "tuned_refused", "base_refused"} <= set(rows[0])
    assert json.loads((tiny_run / "run.json").read_text())["safety"]["harmful_refusal"]["tuned"] == r["rate"]


def test_safety_table_for_a_plain_model_with_baseline_and_judge(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["safety", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--judge", str(tiny_model_dir),
                 "--limit", "10", "--max-new-tokens", "4", "--batch-size", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "harmful requests (should refuse)" in text and "harmless requests (should answer)" in text
    assert "judge model" in text and "weapons" in text
    # 10 paired probes, no discordance: every discordant pair would have to be a lost refusal, 5 of them at least
    assert "these probes detect with 80% power (alpha 0.05): 58.1 points" in text  # P(Bin(10, .581) >= 5) = 0.8
    report = json.loads((out / "safety.json").read_text())
    assert report["classifier"] == f"judge model {tiny_model_dir}"
    # the random tiny judge names neither word: every verdict falls back to the phrase classifier
    assert report["judge_unparsed"] == 20 and report["judge_agreement_with_phrases"] == 1.0
    assert report["base"]["harmful"]["all"] == report["tuned"]["harmful"]["all"]  # same model both sides
    assert "gate" not in report  # no run, no gate


def test_safety_on_a_missing_model_exits_2(tmp_path, capsys):
    assert main(["safety", str(tmp_path / "missing"), "--limit", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err
