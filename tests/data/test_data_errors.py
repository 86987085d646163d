"""Every error code is triggered by a small bad file, and names the file, the line and the field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import chat

from tunesmith.config import DataConfig
from tunesmith.data import CODES, DataError, Issue, load_examples, load_splits, read_examples, render_examples


def issues_of(path, fmt="auto"):
    return read_examples(path, fmt).issues


def one(path, fmt="auto") -> Issue:
    issues = issues_of(path, fmt)
    assert len(issues) == 1, issues
    return issues[0]


def test_codes_table_is_documented():
    assert all(code.startswith("E") and len(code) == 4 and meaning for code, meaning in CODES.items())
    assert {f"E{n:03d}" for n in range(1, 26)} <= set(CODES)


def test_e001_empty_files(tmp_path):
    for name, content in [("a.jsonl", "\n\n  \n"), ("b.json", "[]"), ("c.csv", "prompt,completion\n"), ("d.json", "")]:
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        i = one(p)
        assert (i.code, i.path, i.line) == ("E001", str(p), None)


def test_e002_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps(chat()).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    i = one(p)
    assert (i.code, i.line) == ("E002", 2)
    c = tmp_path / "t.csv"
    c.write_bytes(b"prompt,completion\nq,a\nq,caf\xe9\n")
    assert (one(c).code, one(c).line) == ("E002", 3)


def test_e003_malformed_json(tmp_path, jsonl):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(chat()) + "\n" + json.dumps(chat()) + "\n" + '{"messages": [}\n', encoding="utf-8")
    i = one(p)
    assert (i.code, i.line) == ("E003", 3)
    j = tmp_path / "t.json"
    j.write_text(json.dumps(chat()) + "\n" + json.dumps(chat()) + "\n", encoding="utf-8")  # JSONL named .json
    i = one(j)
    assert (i.code, i.line) == ("E003", 2) and ".jsonl" in i.message


def test_e004_record_not_an_object(tmp_path, jsonl):
    i = one(jsonl([chat(), ["a", "list"]]))
    assert (i.code, i.line) == ("E004", 2)
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"rows": []}), encoding="utf-8")
    assert one(j).code == "E004"


def test_e005_unknown_format(jsonl, tmp_path):
    i = one(jsonl([chat(), {"question": "q", "answer": "a"}]))
    assert (i.code, i.line) == ("E005", 2) and "prompt + completion" in i.message
    i = one(jsonl([{"question": "q"}], name="x.jsonl"))
    assert (i.code, i.line) == ("E005", None)


def test_e006_missing_field(jsonl):
    i = one(jsonl([{"prompt": "p", "completion": "c"}, {"prompt": "p"}]), "prompt_completion")
    assert (i.code, i.line, i.field) == ("E006", 2, "completion")
    i = one(jsonl([{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}], name="m.jsonl"))
    assert (i.code, i.line, i.field) == ("E006", 1, "messages[0].content")


def test_e007_wrong_type(jsonl):
    i = one(jsonl([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}]))
    assert (i.code, i.field) == ("E007", "messages[0].content")
    i = one(jsonl([{"messages": "hello"}], name="b.jsonl"))
    assert (i.code, i.field) == ("E007", "messages")
    i = one(jsonl([{"prompt": "p", "completion": ["c"]}], name="c.jsonl"))
    assert (i.code, i.field) == ("E007", "completion")


def test_e008_unknown_role(jsonl):
    i = one(jsonl([chat(), {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}]))
    assert (i.code, i.line, i.field) == ("E008", 2, "messages[1].role") and "assistant" in i.message
    i = one(jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}], "s.jsonl"))
    assert (i.code, i.field) == ("E008", "conversations[1].from")


def test_e009_empty_content(jsonl):
    i = one(jsonl([chat(assistant="   ")]))
    assert (i.code, i.field) == ("E009", "messages[1].content")
    assert one(jsonl([{"text": ""}], name="t.jsonl")).code == "E009"
    assert one(jsonl([{"messages": []}], name="m.jsonl")).code == "E009"


def test_e010_no_assistant(jsonl):
    i = one(jsonl([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}]))
    assert (i.code, i.line, i.field) == ("E010", 1, "messages")


def test_e011_last_turn_not_assistant(jsonl):
    rec = chat()
    rec["messages"].append({"role": "user", "content": "and?"})
    i = one(jsonl([rec]))
    assert (i.code, i.field) == ("E011", "messages[2]")


def test_e012_bad_weight(jsonl):
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": w}]}
           for w in (2, 0.5, True, "1")]
    issues = issues_of(jsonl(bad))
    assert [(i.code, i.line, i.field) for i in issues] == [("E012", n, "messages[1].weight") for n in (1, 2, 3, 4)]
    i = one(jsonl([{"messages": [{"role": "user", "content": "q", "weight": 1},
                                 {"role": "assistant", "content": "a"}]}], name="u.jsonl"))
    assert (i.code, i.field) == ("E012", "messages[0].weight")


def test_e013_too_long_with_error_policy(tok, jsonl):
    exs = load_examples(jsonl([chat(), chat(user="the quick brown fox " * 20)]))
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(max_length=40))
    (i,) = e.value.issues
    assert (i.code, i.line) == ("E013", 2) and "data.max_length=40" in i.message


def test_e014_no_trained_tokens_after_truncation(tok, jsonl):
    exs = load_examples(jsonl([chat(user="the quick brown fox " * 20)]))
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(max_length=40, overflow="truncate"))
    assert [(i.code, i.line) for i in e.value.issues] == [("E014", 1)]


def test_e015_too_few_examples(jsonl):
    path = jsonl([chat(), chat()])
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(train=str(path), valid_fraction=0.0, min_examples=3), seed=0)
    assert e.value.codes() == {"E015"} and "data.min_examples" in str(e.value)
    with pytest.raises(DataError) as e:  # holding one out of one leaves none to train on
        load_splits(DataConfig(train=str(jsonl([chat()], name="one.jsonl")), valid_fraction=0.5), seed=0)
    assert e.value.codes() == {"E015"}


def test_e016_file_not_found(tmp_path):
    i = one(tmp_path / "nope.jsonl")
    assert (i.code, i.path) == ("E016", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(), seed=0)
    assert e.value.codes() == {"E016"} and "data.train" in str(e.value)


def test_e017_unsupported_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("hello", encoding="utf-8")
    assert one(p).code == "E017"


def test_e018_csv_missing_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,answer\nq,a\n", encoding="utf-8")
    i = one(p)
    assert (i.code, i.line) == ("E018", 1) and "question" in i.message
    i = one(p, "prompt_completion")  # a stated format: one issue for the file, not one per row
    assert (i.code, i.line) == ("E018", 1) and "'prompt', 'completion'" in i.message


def test_e019_parquet_schema_and_corrupt(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), p)
    assert one(p).code == "E019"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    i = one(bad)
    assert (i.code, i.path) == ("E019", str(bad))


def test_e020_every_weight_zero(jsonl):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    assert one(jsonl([rec])).code == "E020"


def test_e021_mixed_formats(jsonl):
    i = one(jsonl([chat(), {"prompt": "p", "completion": "c"}]))
    assert (i.code, i.line) == ("E021", 2)


def test_e022_template_breaking_prefix_property(tok, jsonl):
    # Like templates that strip earlier assistant turns: turn 1 renders differently once it is not last.
    tmpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    with pytest.raises(DataError) as e:
        render_examples(load_examples(jsonl([rec])), tok, DataConfig(), chat_template=tmpl)
    (i,) = e.value.issues
    assert (i.code, i.line) == ("E022", 1) and "model.chat_template" in i.message
    # Single-turn conversations are unaffected, and train_on: all needs no spans.
    render_examples(load_examples(jsonl([chat()], name="s.jsonl")), tok, DataConfig(), chat_template=tmpl)
    render_examples(load_examples(jsonl([rec], name="a.jsonl")), tok, DataConfig(train_on="all"), chat_template=tmpl)


def test_e023_template_problems(tok, jsonl, tmp_path):
    exs = load_examples(jsonl([chat()]))
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(), chat_template="vicuna")
    assert e.value.codes() == {"E023"} and "chatml" in str(e.value)
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(), chat_template=str(tmp_path / "missing.jinja"))
    assert e.value.codes() == {"E023"}
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(), chat_template="{{ raise_exception('roles must alternate') }}")
    assert e.value.codes() == {"E023"} and "roles must alternate" in str(e.value)
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>")
    bare.chat_template = None
    with pytest.raises(DataError) as e:
        render_examples(exs, bare, DataConfig())
    assert e.value.codes() == {"E023"}


def test_e024_csv_row_length(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("prompt,completion\nq,a\nq,a,extra\n", encoding="utf-8")
    i = one(p)
    assert (i.code, i.line) == ("E024", 3)


def test_e025_assistant_first(jsonl):
    rec = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    assert one(jsonl([rec])).code == "E025"


def test_all_issues_of_a_file_are_collected(jsonl):
    recs = [chat(), {"messages": [{"role": "bot", "content": "x"}]}, chat(assistant=""), [1], {"prompt": "p"},
            {"text": "t"}]
    issues = issues_of(jsonl(recs))
    assert [(i.code, i.line) for i in issues] == [("E008", 2), ("E009", 3), ("E004", 4), ("E005", 5), ("E021", 6)]


def test_issues_of_train_and_valid_are_reported_together(jsonl):
    cfg = DataConfig(train=str(jsonl([chat(assistant="")])), valid=str(jsonl([[1]], name="valid.jsonl")))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    assert [(i.code, i.path.rsplit("/", 1)[-1]) for i in e.value.issues] == [("E009", "train.jsonl"),
                                                                              ("E004", "valid.jsonl")]


def test_data_error_format_lists_20_then_counts(jsonl):
    issues = issues_of(jsonl([{"text": ""}] * 25 + [[1]] * 5))
    text = DataError(issues).format()
    lines = text.splitlines()
    assert lines[0] == "30 data issues found:"
    assert sum(1 for ln in lines if ": E00" in ln) == 20
    assert "... and 10 more" in text and "E009 x25" in text and "E004 x5" in text
    assert "train.jsonl:1: text: E009 empty content" in text
    assert str(DataError(issues)) == text
