"""`tunesmith generate --data` and `tunesmith eval` on prompts without answers: the real commands, tiny models."""

import json

import pytest
from eval_helpers import lively_model

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.evaluate import generate_batch
from tunesmith.models import load_for_inference
from tunesmith.train import train

SYSTEM = {"role": "system", "content": "reverse"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def openai_pair(conv):
    return {"input": {"messages": conv}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, eval_tok):
    """A tiny model whose greedy answers are not empty, saved as a folder the commands load."""
    path = tmp_path_factory.mktemp("lively") / "model"
    lively_model(eval_tok).save_pretrained(path)
    eval_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lively(lively_dir):
    return load_for_inference(lively_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, lively_dir, tiny_data):
    train_f, valid_f = tiny_data
    cfg = load_config(None, [f"model.name={lively_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                             f"output_dir={tmp_path_factory.mktemp('prompt-only') / 'run'}", "data.max_length=64",
                             "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1",
                             "eval.every_steps=2", "eval.samples=0", "eval.metric_examples=0",
                             "eval.compare_base=false", "method.lora.r=4"])
    return train(cfg, quiet=True).output_dir


# What each file should give: the conversations the model answers, and the references (None: none).
PROMPTS = [[SYSTEM, user("apple river stone")], [user("cloud")], [SYSTEM, user("one two"), assistant("two one")]]
CASES = {
    "messages": ([{"messages": c} for c in PROMPTS],
                 [PROMPTS[0], PROMPTS[1], PROMPTS[2][:2]], [None, None, "two one"]),
    "prompt": ([{"prompt": "apple river stone"}, {"prompt": [SYSTEM, user("cloud")]}],
               [[user("apple river stone")], [SYSTEM, user("cloud")]], [None, None]),
    "openai_preference": ([openai_pair(PROMPTS[0]), openai_pair(PROMPTS[1])], PROMPTS[:2], [None, None]),
    "trl_chosen_rejected": ([{"prompt": "apple river stone", "chosen": "stone river apple", "rejected": "no"},
                             {"chosen": [*PROMPTS[1], assistant("duolc")],
                              "rejected": [*PROMPTS[1], assistant("cloud")]}],
                            [[user("apple river stone")], PROMPTS[1]], [None, None]),
    "kto_unpaired": ([{"prompt": "apple river stone", "completion": "a bad answer", "label": False}],
                     [[user("apple river stone")]], [None]),  # an undesirable completion is no reference
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_answers_prompt_only_files(case, lively, lively_dir, tmp_path, capsys):
    records, convs, refs = CASES[case]
    data, out = write(tmp_path / f"{case}.jsonl", records), tmp_path / "preds.jsonl"
    assert main(["generate", str(lively_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "3"]) == 0
    assert f"wrote {len(convs)} predictions" in capsys.readouterr().out
    rows = read_rows(out)
    assert [r["messages"] for r in rows] == convs
    assert [r.get("reference") for r in rows] == refs
    assert all(("reference" in r) == (ref is not None) for r, ref in zip(rows, refs))  # no null reference written
    model, tok = lively
    assert [r["output"] for r in rows] == generate_batch(model, tok, convs, max_new_tokens=3)
    assert all(r["output"] for r in rows)


def test_generate_refuses_bad_prompt_files_before_the_model_loads(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", [{"messages": [user("fine")]}, {"messages": [SYSTEM]},
                                         {"messages": [user("")]}, {"prompt": "a different format"}])
    out = tmp_path / "never.jsonl"
    assert main(["generate", "no-such-model", "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: messages: E010" in err and f"{bad}:3: messages[0].content: E009" in err
    assert f"{bad}:4: E021" in err
    text = write(tmp_path / "text.jsonl", [{"text": "just text"}])
    assert main(["generate", "no-such-model", "--data", str(text), "--out", str(out)]) == 2
    assert "plain-text records have no prompt to answer" in capsys.readouterr().err
    assert not out.exists()


def test_eval_on_prompts_answers_with_both_models_and_says_what_was_skipped(lora_run, tmp_path, capsys):
    records, convs, _ = CASES["messages"]
    data = write(tmp_path / "questions.jsonl", records[:2])
    out = tmp_path / "res"
    assert main(["eval", str(lora_run), "--data", str(data), "--max-new-tokens", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads((out / "eval.json").read_text())
    assert result["examples"] == 2 and "adapters disabled" in result["baseline_how"]
    assert result["skipped"]["metrics"] == ["exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu",
                                            "loss", "perplexity"]
    assert result["skipped"]["reason"].startswith(f"2 of 2 prompts have no reference answer (the first: {data}:1)")
    assert result["comparison"] is None and result["comparisons"] == {}
    assert result["tuned"]["loss"] is None and result["base"]["loss"] is None

    # Both sides answered, and the answers are the library's on the same weights.
    tuned, tok = load_for_inference(lora_run)
    assert result["tuned"]["predictions"] == generate_batch(tuned, tok, convs[:2], max_new_tokens=3)
    with tuned.disable_adapter():
        assert result["base"]["predictions"] == generate_batch(tuned, tok, convs[:2], max_new_tokens=3)
    assert all(result["tuned"]["predictions"]) and all(result["base"]["predictions"])
    for side in ("tuned", "base"):
        preds = result[side]["predictions"]
        assert result[side]["metrics"] == {"answer_words": pytest.approx(sum(len(p.split()) for p in preds) / 2),
                                           "empty_answers": sum(not p for p in preds) / 2}
    rows = read_rows(out / "predictions.jsonl")
    assert [r["reference"] for r in rows] == [None, None] and all("winner" not in r for r in rows)
    assert [r["baseline_output"] for r in rows] == result["base"]["predictions"]
    assert [s["tuned"] for s in result["samples"]] == result["tuned"]["predictions"]

    table = captured.out
    assert "| answer_words |" in table and "not scored: exact_match" in table and "why: 2 of 2 prompts" in table
    assert "not scored" in captured.err  # said before the models load, too


def test_eval_of_a_file_partly_without_references_scores_nothing(lively_dir, tmp_path, capsys):
    data = write(tmp_path / "mixed.jsonl", CASES["messages"][0])
    assert main(["eval", str(lively_dir), "--data", str(data), "--max-new-tokens", "2", "--out", str(tmp_path),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "base" not in printed and set(printed["tuned"]["metrics"]) == {"answer_words", "empty_answers"}
    assert printed["skipped"]["reason"].startswith(f"2 of 3 prompts have no reference answer (the first: {data}:1)")
    assert "| metric | model |" in (tmp_path / "eval.md").read_text()
    assert "not scored: exact_match" in (tmp_path / "eval.md").read_text()


def test_eval_refuses_a_bad_prompt_file_with_file_and_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", [{"messages": [user("fine")]}, {"messages": [user("q"), SYSTEM]}])
    assert main(["eval", "no-such-model", "--data", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert f"{bad}:2: messages[1]: E011" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_training_still_refuses_a_conversation_without_an_assistant_turn(tiny_model_dir, tmp_path, capsys):
    data = write(tmp_path / "train.jsonl", [{"messages": [user("q"), assistant("a")]},
                                            {"messages": [SYSTEM, user("no answer")]}])
    assert main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--quiet"]) == 2
    assert f"{data}:2: messages: E010 no assistant turn" in capsys.readouterr().err
