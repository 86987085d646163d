"""`tunesmith check` and the run's preflight.json for preference objectives: pairs (dpo, orpo, simpo) and labelled
answers (kto) read and rendered as training reads them, with the scored answers marked, bad pairs named by file,
line and code, and the data screen over what the model is trained toward."""

import json

import pytest
from rich.console import Console

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data import preference, preflight
from tunesmith.data.preflight_preference import pair_spans
from tunesmith.models import load_tokenizer
from tunesmith.testing import write_pair_jsonl
from tunesmith.train import train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_pair_jsonl(d / "train.jsonl", 8, seed=0), write_pair_jsonl(d / "valid.jsonl", 4, seed=1, fmt="trl")


def _check(model, train_f, *extra, valid=None):
    return (["check", "--model", str(model), "--data", str(train_f)] + (["--valid", str(valid)] if valid else [])
            + list(extra))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pair(user, chosen, rejected):
    return {"prompt": user, "chosen": chosen, "rejected": rejected}


def test_check_dpo_reports_pairs_with_the_scored_answers_marked(tiny_model_dir, pairs, capsys):
    train_f, valid_f = pairs
    assert main(_check(tiny_model_dir, train_f, "--set", "objective.name=dpo", "--json", valid=valid_f)) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["issues"] == [] and rep["settings"]["objective"] == "dpo"
    train, valid = rep["splits"]
    assert (train["examples"], train["format"], valid["examples"], valid["format"]) == (8, "preference", 4,
                                                                                        "chosen_rejected")
    # tokens count the prompt once and both answers; trained, the answers (every answer token is scored)
    assert 0 < train["trained"]["min"] < train["tokens"]["min"] and train["trained"]["max"] < train["tokens"]["max"]
    assert rep["safety"]["ok"] and len(rep["samples"]) == 2
    # the marked sample is show_pair's rendering of the first training pair
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", "objective.name=dpo"])
    tok = load_tokenizer(tiny_model_dir)
    first = preference.render_pairs(preference.read_preferences(train_f), tok, cfg.data).items[0]
    assert rep["samples"][0]["origin"].endswith("train.jsonl:1")
    assert rep["samples"][0]["marked"] == preference.show_pair(first, tok)
    marked = rep["samples"][0]["marked"]
    assert marked.startswith("prompt:\n") and "\nchosen: [[" in marked and "\nrejected: [[" in marked
    scored = [sp["text"] for sp in rep["samples"][0]["spans"] if sp["trained"]]
    assert scored == [tok.decode(first.chosen_ids), tok.decode(first.rejected_ids)]
    # the terminal rendering shows the same pair
    assert main(_check(tiny_model_dir, train_f, "--set", "objective.name=dpo", valid=valid_f)) == 0
    out = capsys.readouterr().out
    assert "data check: OK" in out and "objective=dpo" in out
    assert f"chosen: {tok.decode(first.chosen_ids)}" in out and f"rejected: {tok.decode(first.rejected_ids)}" in out


def test_plain_and_rich_renderings_of_a_truncated_pair(tiny_model_dir, pairs):
    train_f, _ = pairs
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", "data.valid_fraction=0",
                             "objective.name=simpo", "data.max_length=30", "data.overflow=truncate"])
    tok = load_tokenizer(tiny_model_dir)
    rep = preflight(cfg, tok)
    assert rep.ok and rep.splits[0].truncated == 8 and rep.splits[0].examples == 8
    (o, *_) = rep.splits[0].overflows
    assert o.action == "truncated" and o.length > 30 and o.trained_after == o.trained
    text = rep.format()
    assert "objective=simpo" in text and "-> truncated" in text and "prompt + answers" in text
    assert "prompt (cut from the left to data.max_length):" in rep.marked_samples()[0]
    items = preference.render_pairs(preference.read_preferences(train_f), tok, cfg.data).items
    assert rep.marked_samples() == [preference.show_pair(it, tok) for it in items[:2]]
    assert rep.samples[0][1] == pair_spans(items[0], tok)
    console = Console(record=True, width=200)
    rep.print(console)
    shown = console.export_text()
    assert "\nchosen: " in shown and "\nrejected: " in shown and "trained tokens in green" in shown


def test_a_test_file_is_read_as_the_run_compares_on_it(tiny_model_dir, pairs, tmp_path):
    train_f, valid_f = pairs
    bad = _write(tmp_path / "test.jsonl", [_pair("reverse a b", "b a", "a b"), _pair("reverse c d", "d c", "d c")])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                             f"data.test={bad}", "objective.name=orpo"])
    rep = preflight(cfg, load_tokenizer(tiny_model_dir))
    assert [(s.name, s.examples) for s in rep.splits] == [("train", 8), ("valid", 4), ("test", 1)]
    assert [(i.code, i.line) for i in rep.issues] == [("E030", 2)] and not rep.ok


def test_bad_pairs_exit_2_naming_file_line_and_code(tiny_model_dir, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [_pair("reverse fox dog", "dog fox", "fox dog"),
                                          _pair("reverse cat owl", "owl cat", " owl cat "),  # the same answer twice
                                          _pair("reverse sun sea", "", "sun sea")])  # an empty chosen answer
    assert main(_check(tiny_model_dir, bad, "--set", "objective.name=dpo", "--set", "data.valid_fraction=0")) == 2
    out = capsys.readouterr().out
    assert "data check: 2 issue(s)" in out and "Traceback" not in out
    assert "bad.jsonl:2" in out and "E030" in out and "bad.jsonl:3" in out and "E009" in out
    assert main(_check(tiny_model_dir, bad, "--set", "objective.name=dpo", "--json")) == 2
    issues = json.loads(capsys.readouterr().out)["issues"]
    assert sorted((i["line"], i["code"]) for i in issues) == [(2, "E030"), (3, "E009")]


def test_sft_data_under_a_preference_objective_is_refused(tiny_model_dir, tiny_data, capsys):
    assert main(_check(tiny_model_dir, tiny_data[0], "--set", "objective.name=orpo", "--json")) == 2
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and rep["issue_counts"] == {"E026": 1}


def test_kto_on_unpaired_answers_and_on_pairs(tiny_model_dir, pairs, tmp_path, capsys):
    rows = [{"prompt": f"reverse fox dog {i}", "completion": f"{i} dog fox" if i % 2 else f"fox dog {i}",
             "label": bool(i % 2)} for i in range(6)]
    unpaired = _write(tmp_path / "kto.jsonl", rows)
    assert main(_check(tiny_model_dir, unpaired, "--set", "objective.name=kto", "--set", "data.valid_fraction=0",
                       "--json")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["settings"]["objective"] == "kto"
    assert [(s["name"], s["examples"], s["format"]) for s in rep["splits"]] == [("train", 6, "unpaired"),
                                                                               ("valid", 0, "unpaired")]
    assert rep["splits"][0]["trained"]["min"] > 0
    labels = [s["marked"].split("\n")[-1].split(":")[0] for s in rep["samples"]]
    assert labels == ["undesirable", "desirable"] and "\nundesirable: [[fox dog 0" in rep["samples"][0]["marked"]
    # pairs under kto: each pair is a desirable and an undesirable answer; dpo refuses unpaired answers
    train_f, valid_f = pairs
    assert main(_check(tiny_model_dir, train_f, "--set", "objective.name=kto", "--json", valid=valid_f)) == 0
    assert [s["examples"] for s in json.loads(capsys.readouterr().out)["splits"]] == [16, 8]
    assert main(_check(tiny_model_dir, unpaired, "--set", "objective.name=dpo", "--json")) == 2
    assert json.loads(capsys.readouterr().out)["issue_counts"] == {"E026": 1}


def test_the_screen_covers_prompts_and_the_answers_trained_toward(tiny_model_dir, tmp_path, capsys):
    rows = [_pair(f"reverse fox dog {i}", f"dog fox {i}", f"fox dog {i}") for i in range(6)]
    rows[1] = _pair("reverse the mail", "I will not share it", "mail ann@example.org")  # PII in the rejected answer
    args = _check(tiny_model_dir, _write(tmp_path / "p.jsonl", rows), "--set", "objective.name=dpo",
                  "--set", "data.valid_fraction=0", "--set", "safety.pii_policy=refuse", "--json")
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["safety"]["pii"]["counts"] == {}
    rows[1] = _pair("reverse the mail", "mail ann@example.org", "I will not share it")  # in the chosen one
    _write(tmp_path / "p.jsonl", rows)
    assert main(args) == 2
    safety = json.loads(capsys.readouterr().out)["safety"]
    assert not safety["ok"] and safety["pii"]["counts"] == {"email": 1}
    # kto: an undesirable answer is trained away from, so only its prompt is screened
    rows = [{"prompt": f"reverse fox dog {i}", "completion": f"{i} dog fox", "label": True} for i in range(4)]
    rows += [{"prompt": "mail it", "completion": "to ann@example.org", "label": False},
             {"prompt": "call 415-555-2671", "completion": "no", "label": False}]
    kto = _check(tiny_model_dir, _write(tmp_path / "u.jsonl", rows), "--set", "objective.name=kto",
                 "--set", "data.valid_fraction=0", "--json")
    assert main(kto) == 0
    safety = json.loads(capsys.readouterr().out)["safety"]
    assert safety["pii"]["counts"] == {"phone": 1} and safety["examples"] == 6


def test_a_dpo_run_keeps_its_preflight_and_reports_the_pairs(tmp_path, tiny_model_dir, pairs):
    train_f, valid_f = pairs
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
        f"output_dir={tmp_path / 'run'}", "objective.name=dpo", "data.max_length=64", "train.batch_size=4",
        "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=2", "eval.samples=1",
        "eval.max_new_tokens=4", "eval.compare_examples=2", "eval.metric_examples=0", "method.lora.r=4",
        "method.lora.dropout=0.0"])
    res = train(cfg, quiet=True)
    pf = json.loads((res.output_dir / "preflight.json").read_text())
    assert pf["ok"] and pf["settings"]["objective"] == "dpo" and pf["issue_counts"] == {}
    assert [(s["name"], s["examples"]) for s in pf["splits"]] == [("train", 8), ("valid", 4)]
    assert "\nchosen: " in pf["samples"][0]["marked"]
    html = (res.output_dir / "report.html").read_text()
    assert "<th>pairs</th>" in html and "A rendered training pair" in html and "prompt + answers" in html
    assert html.count("<mark>") >= 2  # the chosen and the rejected answer of the sample
