"""Writes the malformed inputs of this folder (run it from anywhere: `python make_corpus.py`).

The files are committed; this script documents exactly which bytes each holds (BOMs, CRLF, Latin-1,
UTF-16, a truncated Parquet file) and rebuilds them. expected.yaml says what tunesmith must answer to each.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def chat(user="fox dog paris", answer="paris dog fox", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def turns(*pairs):
    return {"messages": [dict(zip(("role", "content"), p)) if isinstance(p, tuple) else p for p in pairs]}


def jl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


V = chat()
LONG = " ".join(["quick brown fox jumps over the lazy dog"] * 12)

TEXT_FILES: dict[str, str | bytes] = {
    # broken JSON
    "broken_json.jsonl": jl(V, V, '{"messages": [{"role": "user", "content": "hi"}', V),
    "trailing_comma.jsonl": jl(V, json.dumps(V)[:-1] + ",}"),
    "single_quotes.jsonl": jl(str(V), V),
    "bare_text_line.jsonl": jl(V, "fox dog paris -> paris dog fox"),
    "json_broken.json": "[\n" + json.dumps(V) + ",\n" + json.dumps(V) + "\n",
    "json_lines_in_json.json": jl(V, V),
    # byte-level: BOM and CRLF are accepted; other encodings are not
    "bom.jsonl": b"\xef\xbb\xbf" + jl(V, V, V).encode(),
    "crlf.jsonl": jl(V, V, V).replace("\n", "\r\n").encode(),
    "csv_bom_crlf.csv": b"\xef\xbb\xbf" + b"prompt,completion\r\nfox dog,dog fox\r\nparis,france\r\n",
    "latin1.jsonl": jl(V, V).encode() + json.dumps(chat("caf\u00e9 au lait"), ensure_ascii=False).encode("latin-1") + b"\n",
    "utf16.jsonl": jl(V, V).encode("utf-16"),
    "binary_garbage.jsonl": bytes(range(256)) * 4,
    "csv_latin1.csv": "prompt,completion\ncaf\u00e9,coffee\n".encode("latin-1"),
    "cfg_latin1.yaml": "train:\n  lr: 0.001 # caf\u00e9\n".encode("latin-1"),
    # empty
    "empty.jsonl": b"",
    "blank_lines.jsonl": "\n\n   \n\t\n",
    "csv_header_only.csv": "prompt,completion\n",
    # records of the wrong shape or type
    "array_record.jsonl": jl(V, [1, 2, 3]),
    "messages_not_list.jsonl": jl(V, {"messages": "fox dog paris"}),
    "turn_not_object.jsonl": jl({"messages": ["fox dog paris", "paris dog fox"]}),
    "content_number.jsonl": jl(turns(("user", 42), ("assistant", "42"))),
    "role_number.jsonl": jl(turns((1, "fox dog"), ("assistant", "dog fox"))),
    "text_not_string.jsonl": jl({"text": ["fox", "dog"]}),
    "alpaca_output_number.jsonl": jl({"instruction": "add 2 and 3", "output": 5}),
    "completion_null.jsonl": jl({"prompt": "fox dog", "completion": None}),
    "json_top_level_object.json": json.dumps({"records": [V, V]}),
    # roles and turns
    "unknown_role.jsonl": jl(V, turns(("user", "fox dog"), ("bot", "dog fox"))),
    "sharegpt_bad_from.jsonl": jl({"conversations": [{"from": "human", "value": "fox"}, {"from": "robot", "value": "x"}]}),
    "json_record_bad_role.json": json.dumps([V, turns(("user", "fox dog"), ("bot", "dog fox"))], indent=1),
    "missing_content.jsonl": jl(turns(("user", "fox dog"), {"role": "assistant"})),
    "empty_content.jsonl": jl(V, V, turns(("user", "fox dog"), ("assistant", "   "))),
    "empty_conversation.jsonl": jl({"messages": []}),
    "no_assistant.jsonl": jl(V, turns(("system", "reverse"), ("user", "fox dog"))),
    "last_not_assistant.jsonl": jl(turns(("user", "fox"), ("assistant", "fox"), ("user", "and dog?"))),
    "starts_with_assistant.jsonl": jl(turns(("assistant", "hello"), ("user", "fox"), ("assistant", "fox"))),
    "bad_weight.jsonl": jl(turns(("user", "fox"), {"role": "assistant", "content": "fox", "weight": 2})),
    "weight_on_user.jsonl": jl(turns({"role": "user", "content": "fox", "weight": 1}, ("assistant", "fox"))),
    "all_weights_zero.jsonl": jl(V, turns(("user", "fox"), {"role": "assistant", "content": "fox", "weight": 0})),
    # formats
    "unknown_fields.jsonl": jl(V, {"question": "fox dog?", "answer": "dog fox"}),
    "mixed_formats.jsonl": jl(V, {"prompt": "fox dog", "completion": "dog fox"}),
    "wrong_extension.txt": jl(V, V),
    # counts and lengths
    "too_few.jsonl": jl(V, V, V),
    "overlong_error.jsonl": jl(V, chat("fox dog", LONG), V),
    "overlong_truncate.jsonl": jl(V, chat(LONG, "fox"), V),
    "overlong_drop.jsonl": jl(chat("fox", LONG), chat("dog", LONG), chat("paris", LONG)),
    # CSV
    "csv_missing_columns.csv": "question,answer\nfox dog?,dog fox\n",
    "csv_stated_format_missing_column.csv": "prompt\nfox dog\n",
    "csv_ragged_row.csv": "prompt,completion\nfox,dog\nparis,france,europe\n",
    "csv_bad_messages_cell.csv": 'messages\n"' + json.dumps(V["messages"]).replace('"', '""') + '"\n"[not json"\n',
    # configs
    "cfg_unknown_key.yaml": "train:\n  epochs: 1\n  learning_rate: 0.001\n",
    "cfg_unknown_section.yaml": "train:\n  epochs: 1\noptimizer:\n  name: adamw\n",
    "cfg_mistyped_lr.yaml": "method:\n  name: lora\ntrain:\n  lr: fast\n",
    "cfg_bad_choice.yaml": "method:\n  name: qlora\n",
    "cfg_out_of_range.yaml": "train:\n  epochs: 1\n  batch_size: 0\n",
    "cfg_section_scalar.yaml": "model:\n  dtype: auto\ntrain: 5\n",
    "cfg_list_for_int.yaml": "data:\n  max_length: [512, 1024]\n",
    "cfg_bool_for_list.yaml": "method:\n  name: lora\n  lora:\n    r: 8\n    target_modules: yes\n",
    "cfg_not_mapping.yaml": "- train\n- eval\n",
    "cfg_broken_yaml.yaml": "train:\n  lr: 0.001\n  betas: [0.9, 0.99\neval:\n  samples: 2\n",
    "cfg_tabs.yaml": "train:\n\tlr: 0.001\n",
    "cfg_freeze_nothing.yaml": "train:\n  epochs: 1\nmethod:\n  name: freeze\n",
    "cfg_missing_model.yaml": "data:\n  train: too_few.jsonl\nmodel:\n  name: ./no_such_model_folder\n",
    "cfg_missing_gguf.yaml": "data:\n  train: too_few.jsonl\nmodel:\n  name: /nonexistent/tunesmith/model.Q4_0.gguf\n",
    "cfg_no_data.yaml": "train:\n  epochs: 1\n",
    "cfg_missing_data.yaml": "data:\n  train: no_such_train_file.jsonl\n",
    "cfg_overlong_drop.yaml": "data:\n  train: overlong_drop.jsonl\n  max_length: 48\n  overflow: drop\n",
}


def write_parquet() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["fox dog?"], "answer": ["dog fox"]}), HERE / "parquet_wrong_schema.parquet")
    pq.write_table(pa.table({"prompt": [1, 2], "completion": ["one", "two"]}), HERE / "parquet_wrong_types.parquet")
    pq.write_table(pa.table({"prompt": ["fox"], "completion": ["dog"]}), HERE / "parquet_stated_format.parquet")
    good = HERE / "parquet_truncated.parquet"
    pq.write_table(pa.table({"prompt": ["fox dog"] * 50, "completion": ["dog fox"] * 50}), good)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (HERE / "parquet_not_parquet.parquet").write_text(jl(V, V))


def main() -> None:
    for name, content in TEXT_FILES.items():
        path = HERE / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
    write_parquet()


if __name__ == "__main__":
    main()
