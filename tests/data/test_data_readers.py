"""JSONL, JSON, CSV and Parquet readers; BOM and CRLF are accepted."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from data_helpers import chat

from tunesmith.data import Message, load_examples, read_examples


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    body = "\r\n".join([json.dumps(chat(user="a")), "", json.dumps(chat(user="b"))]) + "\r\n"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    loaded = read_examples(p)
    assert not loaded.issues
    assert [(e.messages[0].content, e.origin.line) for e in loaded.examples] == [("a", 1), ("b", 3)]


def test_json_list_and_data_key(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(b"\xef\xbb\xbf" + json.dumps([chat(), chat()], indent=2).replace("\n", "\r\n").encode())
    b.write_text(json.dumps({"data": [{"text": "x"}, {"text": "y"}]}), encoding="utf-8")
    assert len(load_examples(a)) == 2
    exs = load_examples(b)
    assert [e.text for e in exs] == ["x", "y"]
    assert [(e.origin.line, e.origin.unit, str(e.origin)) for e in exs] == [
        (0, "record", f"{b}[0]"), (1, "record", f"{b}[1]")]


def test_json_issue_uses_record_index(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([chat(), chat(assistant="")]), encoding="utf-8")
    (i,) = read_examples(p).issues
    assert (i.code, i.line, i.unit, i.field) == ("E009", 1, "record", "messages[1].content")
    assert i.format().startswith(f"{p}[1]: messages[1].content: E009")


def test_csv_prompt_completion_with_quoted_multiline_cell(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(b'\xef\xbb\xbfprompt,completion\r\n"multi\r\nline",a\r\nq2,"b, with comma"\r\nq3,\r\n')
    loaded = read_examples(p)
    assert [e.messages for e in loaded.examples] == [
        (Message("user", "multi\r\nline"), Message("assistant", "a")),
        (Message("user", "q2"), Message("assistant", "b, with comma"))]
    assert [e.origin.line for e in loaded.examples] == [2, 4]  # the record's first line; header is line 1
    (i,) = loaded.issues
    assert (i.code, i.line, i.field) == ("E009", 5, "completion")


def test_csv_alpaca_and_text_and_json_messages_column(tmp_path):
    a = tmp_path / "a.csv"
    pd.DataFrame({"instruction": ["i"], "input": [""], "output": ["o"]}).to_csv(a, index=False)
    assert load_examples(a)[0].messages == (Message("user", "i"), Message("assistant", "o"))
    t = tmp_path / "t.csv"
    pd.DataFrame({"text": ["hello world"]}).to_csv(t, index=False)
    assert load_examples(t)[0].text == "hello world"
    m = tmp_path / "m.csv"
    pd.DataFrame({"messages": [json.dumps(chat()["messages"])]}).to_csv(m, index=False)
    assert load_examples(m)[0].messages[1].content == "the quick fox"
    bad = tmp_path / "bad.csv"
    bad.write_text('messages\n"[{not json"\n', encoding="utf-8")
    (i,) = read_examples(bad).issues
    assert (i.code, i.line, i.field) == ("E003", 2, "messages")


def test_parquet_flat_and_nested(tmp_path):
    flat = tmp_path / "flat.parquet"
    pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}).to_parquet(flat)
    exs = load_examples(flat)
    assert [e.messages[1].content for e in exs] == ["c1", "c2"]
    assert [str(e.origin) for e in exs] == [f"{flat}[0]", f"{flat}[1]"]
    nested = tmp_path / "nested.parquet"
    rows = [chat()["messages"], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]]
    pq.write_table(pa.table({"messages": rows}), nested)  # struct gains weight: null where absent
    exs = load_examples(nested)
    assert exs[0].messages[1] == Message("assistant", "the quick fox", None)
    assert exs[1].messages[1] == Message("assistant", "a", 1)


def test_parquet_null_is_reported(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p", None], "completion": ["c", "c"]}), p)
    (i,) = read_examples(p).issues
    assert (i.code, i.line, i.unit, i.field) == ("E006", 1, "record", "prompt")
