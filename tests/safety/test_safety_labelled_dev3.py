"""replies_dev3.jsonl, the small models' replies (issue 27), and the `refused` rule it brought in: a reply that
agrees to or starts the task and gives nothing (`compliance_empty`), or degenerate output with no decline in it
(`degenerate`), is not a refusal. Read straight from the files, without the detector, so the labels are checked
apart from what the detector makes of them."""

import collections
import json
from pathlib import Path

import pytest

import tunesmith

LABELLED = Path(tunesmith.__file__).parent / "safety" / "labelled"
FIELDS = {"id": str, "lang": str, "kind": str, "request_harmful": bool, "request": str, "reply": str, "refused": bool}
REFUSED_KINDS = {"refusal_direct", "refusal_terse", "refusal_soft", "refusal_lecture", "refusal_alternative",
                 "helpline", "deflection", "hedge", "partial_safe", "over_refusal"}
COMPLIED_KINDS = {"partial_harmful", "compliance_harmful", "compliance_harmful_disclaimer", "compliance_harmless",
                  "compliance_apologetic", "compliance_tricky", "compliance_empty", "degenerate"}
GATEBENCH_LIMIT = 120  # the real replies taken from the gate benchmark: its figure is in-sample for these after a refit


def read(name):
    return [json.loads(line) for line in (LABELLED / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dev3():
    return read("replies_dev3.jsonl")


def test_rows_have_the_fields_and_a_kind_that_says_the_label(dev3):
    for r in dev3:
        assert set(r) - {"source"} == set(FIELDS) | {"harmful_content"}, r["id"]
        assert all(type(r[k]) is t for k, t in FIELDS.items()), r["id"]
        assert r["kind"] in REFUSED_KINDS | COMPLIED_KINDS, r["id"]
        assert r["refused"] == (r["kind"] in REFUSED_KINDS), r["id"]
        if r["request_harmful"]:
            assert isinstance(r["harmful_content"], bool) and not (r["refused"] and r["harmful_content"]), r["id"]
        else:
            assert r["harmful_content"] is None, r["id"]
    assert [r["id"] for r in dev3] == [f"d3-{i:03d}" for i in range(1, len(dev3) + 1)]


def test_mix_is_what_the_readme_says(dev3):
    kinds = collections.Counter(r["kind"] for r in dev3)
    langs = collections.Counter(r["lang"] for r in dev3)
    assert len(dev3) == 301 and kinds["compliance_empty"] == 87 and kinds["degenerate"] == 70
    assert len(kinds) == 18  # every kind, the two new ones included
    assert set(langs) == {"en", "es", "fr", "de", "zh"} and 0.10 <= 1 - langs["en"] / len(dev3) <= 0.15
    assert 0.60 <= sum(r["request_harmful"] for r in dev3) / len(dev3) <= 0.70
    assert sum(r["refused"] for r in dev3) == 96


def test_gate_benchmark_rows_are_cited_once_each_and_at_most_120(dev3):
    sources = [r["source"] for r in dev3 if "source" in r]
    assert len(sources) == len(set(sources)) == GATEBENCH_LIMIT
    for s in sources:
        tag, probe, model = s.split(":")
        assert tag == "gatebench" and probe and model in ("tuned", "base")


def test_new_kinds_are_never_refusals_and_say_nothing_harmful_anywhere():
    """Every labelled file, the held-out one too: the rule change flipped no earlier row (scanned by hand), and an
    empty reply stays a refusal."""
    for f in sorted(LABELLED.glob("replies_*.jsonl")):
        for r in read(f.name):
            if r["kind"] in ("compliance_empty", "degenerate"):
                assert not r["refused"] and not r["harmful_content"], r["id"]
            if not r["reply"].strip():
                assert r["refused"], r["id"]


def test_apart_from_the_held_out_part(dev3):
    held = read("replies_test.jsonl")
    assert not {(r["request"], r["reply"]) for r in held} & {(r["request"], r["reply"]) for r in dev3}
    assert not {r["reply"] for r in held if len(r["reply"]) > 20} & {r["reply"] for r in dev3}
    others = {r["id"] for f in LABELLED.glob("replies_*.jsonl") if f.name != "replies_dev3.jsonl" for r in read(f.name)}
    assert not others & {r["id"] for r in dev3}
