"""Preflight: counts, formats, length stats, overflow, issues and marked examples, without a model."""

import json

from data_helpers import chat
from rich.console import Console

from tunesmith.config import Config
from tunesmith.data import preflight


def config(jsonl, **data):
    train = jsonl([chat(user=f"question {i}", assistant=f"answer {i}") for i in range(9)]
                  + [chat(assistant="the quick brown fox " * 10)])
    return Config.model_validate({"data": {"train": str(train), "valid_fraction": 0.2, **data}})


def train_first_number(rep) -> int:
    line = int(rep.samples[0][0].rsplit(":", 1)[1])  # the sample's origin, path:line
    return line - 1


def test_report_on_good_data(tok, jsonl):
    rep = preflight(config(jsonl, max_length=40, overflow="truncate"), tok)
    assert rep.ok and not rep.issues
    train, valid = rep.splits
    assert (train.name, train.examples, train.format, valid.examples) == ("train", 8, "messages", 2)
    assert train.tokens.min <= train.tokens.p50 <= train.tokens.p95 <= train.tokens.max
    assert 0 < train.trained.min <= train.trained.max
    overflows = [o for s in rep.splits for o in s.overflows]
    assert len(overflows) == 1 and overflows[0].action == "truncated" and overflows[0].trained_after > 0
    assert sum(s.truncated for s in rep.splits) == 1
    assert len(rep.samples) == 2
    n = train_first_number(rep)
    assert rep.marked_samples()[0] == (f"<|im_start|>user\nquestion {n}<|im_end|>\n<|im_start|>assistant\n"
                                       f"[[answer {n}<|im_end|>]]\n")
    text = rep.format()
    assert "data check: OK" in text and f"[[answer {n}<|im_end|>]]" in text and "-> truncated" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] and d["splits"][0]["tokens"]["max"] == train.tokens.max
    (o,) = [o for sp in d["splits"] for o in sp["overflows"]]
    assert o["origin"].endswith("train.jsonl:10") and o["action"] == "truncated" and o["length"] > 40
    assert d["samples"][0]["spans"][-2] == {"text": f"answer {n}<|im_end|>", "trained": True}


def test_report_lists_issues_and_is_not_ok(tok, jsonl, tmp_path):
    cfg = config(jsonl, max_length=40)  # overflow: error
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps(chat(assistant="")) + "\n", encoding="utf-8")
    cfg.data.test = str(bad)
    rep = preflight(cfg, tok)
    assert not rep.ok
    assert sorted(i.code for i in rep.issues) == ["E009", "E013"]
    assert [s.name for s in rep.splits] == ["train", "valid", "test"]
    assert "E013" in rep.format() and rep.to_dict()["issue_counts"] == {"E009": 1, "E013": 1}


def test_report_without_a_training_file(tok):
    rep = preflight(Config(), tok)
    assert not rep.ok and [i.code for i in rep.issues] == ["E016"] and rep.splits == []


def test_rich_printing(tok, jsonl):
    console = Console(record=True, width=120)
    preflight(config(jsonl), tok).print(console)
    out = console.export_text()
    assert "data check: OK" in out and "<|im_end|>" in out and "messages" in out
