"""Preference data: the three formats to Pair / Unpaired, every error code with its line, rendering that
scores exactly what SFT trains in a final assistant turn, the prompt cut from the left, and the check's views."""

import json

import pytest
from data_helpers import chat

from tunesmith.config import DataConfig
from tunesmith.data import (IGNORE, DataError, Example, Message, Origin, Pair, RenderedPair, Unpaired, detect,
                            load_examples, load_preference_splits, pair_stats, read_preference_file, read_preferences,
                            render_one, render_pairs, render_preferences_all, render_unpaired, show_pair)

SYS, USER = {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}


def asst(text):
    return {"role": "assistant", "content": text}


def openai(chosen="the quick fox", rejected="a dog", messages=(SYS, USER), **extra):
    return {"input": {"messages": list(messages)}, "preferred_output": [asst(chosen)],
            "non_preferred_output": [asst(rejected)], **extra}


def trl(prompt="hello world", chosen="the quick fox", rejected="a dog"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def kto(prompt="hello world", completion="the quick fox", label=True):
    return {"prompt": prompt, "completion": completion, "label": label}


def issues(path, fmt="auto"):
    return [(i.code, i.line, i.field) for i in read_preference_file(path, fmt).issues]


# ---------------------------------------------------------------- formats


def test_openai_preference_format(jsonl):
    loaded = read_preference_file(jsonl([openai(), openai("yes", "no", [USER])]))
    assert loaded.format == "preference" and not loaded.issues
    a, b = loaded.items
    assert a == Pair((Message("system", "be brief"), Message("user", "hello world")),
                     Message("assistant", "the quick fox"), Message("assistant", "a dog"), a.origin)
    assert (a.origin.line, b.origin.line) == (1, 2) and b.prompt == (Message("user", "hello world"),)


def test_chosen_rejected_explicit_prompt_strings_and_conversations(jsonl):
    conv = {"prompt": [SYS, USER], "chosen": [asst("yes")], "rejected": [asst("no")]}
    a, b = read_preferences(jsonl([trl(), conv]))
    assert a.prompt == (Message("user", "hello world"),) and a.chosen == Message("assistant", "the quick fox")
    assert b.prompt == (Message("system", "be brief"), Message("user", "hello world"))
    assert (b.chosen.content, b.rejected.content) == ("yes", "no")


def test_chosen_rejected_implicit_prompt_is_the_longest_common_prefix(jsonl):
    shared = [SYS, USER, asst("hi"), {"role": "user", "content": "and then?"}]
    (pair,) = read_preferences(jsonl([{"chosen": shared + [asst("yes")], "rejected": shared + [asst("no")]}]))
    assert [m.content for m in pair.prompt] == ["be brief", "hello world", "hi", "and then?"]
    assert (pair.chosen, pair.rejected) == (Message("assistant", "yes"), Message("assistant", "no"))


def test_unpaired_and_csv_cells(tmp_path, jsonl):
    a, b = read_preferences(jsonl([kto(), kto(completion="a dog", label=False)]))
    assert isinstance(a, Unpaired) and (a.desirable, b.desirable) == (True, False)
    assert a.completion == Message("assistant", "the quick fox")
    p = tmp_path / "kto.csv"
    p.write_text('prompt,completion,label\n"[{""role"": ""user"", ""content"": ""q""}]",[a] b,TRUE\n[x,y,false\n',
                 encoding="utf-8")
    c, d = read_preferences(p)
    assert (c.prompt, c.completion.content, c.desirable) == ((Message("user", "q"),), "[a] b", True)
    assert (d.prompt[0].content, d.origin.line) == ("[x", 3)  # not JSON: stays text


def test_detection_order_unpaired_before_prompt_completion():
    assert detect({"prompt", "completion", "label"}) == "unpaired"
    assert detect({"prompt", "completion"}) == "prompt_completion"
    assert detect({"prompt", "chosen", "rejected", "messages"}) == "chosen_rejected"
    assert detect({"input", "preferred_output", "non_preferred_output"}) == "preference"


def test_sft_file_read_as_preferences_says_so(jsonl):
    with pytest.raises(DataError) as e:
        read_preferences(jsonl([chat(), chat()]))
    (i,) = e.value.issues
    assert (i.code, i.line) == ("E026", 1) and "objective sft (format messages)" in i.message
    assert issues(jsonl([trl()]), "messages")[0][0] == "E026"  # an sft data.format stated


def test_preference_file_read_for_sft_says_so(jsonl):
    with pytest.raises(DataError) as e:
        load_examples(jsonl([trl(), trl()]))
    assert [(i.code, i.line) for i in e.value.issues] == [("E026", 1), ("E026", 2)]
    assert "this file holds preference pairs: set objective.name dpo (or orpo, simpo)" in str(e.value)
    with pytest.raises(DataError) as e:
        load_examples(jsonl([kto()]))
    assert "set objective.name kto" in e.value.issues[0].message
    with pytest.raises(DataError) as e:
        load_examples(jsonl([{**trl(), "messages": chat()["messages"]}]))
    assert "data.format: messages" in e.value.issues[0].message
    assert load_examples(jsonl([kto()]), "prompt_completion")[0].messages[1].content == "the quick fox"


# ---------------------------------------------------------------- error codes, each with its line and field


@pytest.mark.parametrize("bad, expected", [
    ({**openai(), "preferred_output": [asst("a"), asst("b")]}, [("E027", "preferred_output")]),
    ({**trl(), "chosen": [USER]}, [("E027", "chosen")]),
    ({**trl(), "prompt": [USER, asst("hi")]}, [("E028", "prompt[1]")]),
    ({**trl(), "prompt": [USER, SYS, USER]}, [("E028", "prompt")]),
    ({**trl(), "prompt": [asst("hi"), USER]}, [("E025", "prompt")]),
    ({"chosen": "yes", "rejected": "no"}, [("E029", "prompt")]),
    ({"chosen": [USER, asst("a"), asst("b")], "rejected": [USER, asst("c")]}, [("E029", "chosen")]),
    ({"chosen": [USER, asst("a")], "rejected": [SYS, USER, asst("b")]}, [("E029", "chosen"), ("E029", "rejected")]),
    (trl(rejected="the quick fox "), [("E030", "rejected")]),
    ({"chosen": [USER, asst("a")], "rejected": [USER, asst("a")]}, [("E030", "rejected")]),
    (openai("same", "same"), [("E030", "non_preferred_output")]),
    (kto(label="yes"), [("E033", "label")]),
    ({**kto(), "label": None}, [("E006", "label")]),
    (openai(input={"messages": [USER], "tools": [{"type": "function"}]}), [("E034", "input.tools")]),
    (trl(chosen="  "), [("E009", "chosen")]),
    (openai(rejected=""), [("E009", "non_preferred_output[0].content")]),
    ({**openai(), "input": "hello"}, [("E007", "input")]),
])
def test_record_errors_name_line_and_field(jsonl, bad, expected):
    got = issues(jsonl([openai() if "input" in bad else trl() if "chosen" in bad else kto(), bad]))
    assert got == [(code, 2, field) for code, field in expected]


def test_mixed_formats_and_unknown_records(jsonl):
    assert issues(jsonl([trl(), openai(), {"foo": 1}])) == [("E021", 2, None), ("E006", 3, "chosen"),
                                                            ("E006", 3, "rejected")]
    assert issues(jsonl([kto(), {"prompt": "q", "completion": "a"}])) == [("E006", 2, "label")]


# ---------------------------------------------------------------- rendering


def O(line=1):
    return Origin("mem.jsonl", line)


def pair(chosen="the quick fox", rejected="a dog", prompt=(Message("user", "hello world"),)):
    return Pair(tuple(prompt), Message("assistant", chosen), Message("assistant", rejected), O())


def sft_scored(tok, prompt, answer, chat_template=None):
    """SFT's render_one of prompt + answer, the final turn trained alone (weight 0 on earlier assistant turns),
    less the untrained tail after the end of turn (ChatML's "\\n")."""
    earlier = tuple(Message(m.role, m.content, 0 if m.role == "assistant" else None) for m in prompt)
    ids, labels = render_one(Example(earlier + (Message("assistant", answer),), None, O()), tok,
                             chat_template=chat_template)
    end = max(t for t, lab in enumerate(labels) if lab != IGNORE) + 1
    return ids[:end], labels[:end]


def test_chosen_and_rejected_equal_sft_render_of_the_final_turn(tok):
    prompt = (Message("system", "be brief"), Message("user", "q one"), Message("assistant", "a one"),
              Message("user", "q two"))
    (item,) = render_pairs([pair(prompt=prompt)], tok, DataConfig()).items
    for ex, answer in ((item.chosen, "the quick fox"), (item.rejected, "a dog")):
        assert (ex.input_ids, ex.labels) == sft_scored(tok, prompt, answer)
    assert tok.decode(item.chosen_ids) == "the quick fox<|im_end|>"
    assert tok.decode(item.prompt_ids).endswith("<|im_start|>user\nq two<|im_end|>\n<|im_start|>assistant\n")
    assert item.chosen.n_targets == len(item.chosen_ids) and not item.truncated


def test_unpaired_renders_like_a_pair(tok):
    u = Unpaired((Message("user", "hello world"),), Message("assistant", "a dog"), False, O())
    (item,) = render_unpaired([u], tok, DataConfig()).items
    assert (item.example.input_ids, item.example.labels) == sft_scored(tok, u.prompt, "a dog")
    assert item.desirable is False


def test_generation_prompt_merged_by_bpe_matches_sft(tok):
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>")
    tmpl = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
    (item,) = render_pairs([pair()], bare, DataConfig(), chat_template=tmpl).items
    assert (item.chosen.input_ids, item.chosen.labels) == sft_scored(bare, pair().prompt, "the quick fox", tmpl)
    assert (item.rejected.input_ids, item.rejected.labels) == sft_scored(bare, pair().prompt, "a dog", tmpl)


def test_template_that_rewrites_the_prompt_is_e031(tok):
    tmpl = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError) as e:
        render_pairs([pair()], tok, DataConfig(), chat_template=tmpl)
    assert [(i.code, i.path, i.line, i.field) for i in e.value.issues] == [("E031", "mem.jsonl", 1, "chosen")]


def test_two_bos_tokens_is_e032(tok):
    bos = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                        pad_token="<|pad|>")
    tmpl = "{{ bos_token }}{{ bos_token }}" + tok.chat_template
    with pytest.raises(DataError) as e:
        render_pairs([pair()], bos, DataConfig(), chat_template=tmpl)
    assert e.value.codes() == {"E032"} and e.value.issues[0].line == 1
    assert render_pairs([pair()], bos, DataConfig(), chat_template="{{ bos_token }}" + tok.chat_template).items


def test_answers_with_the_same_tokens_are_e030(tok):
    with pytest.raises(DataError) as e:
        render_pairs([pair("same", "same")], tok, DataConfig())
    assert e.value.codes() == {"E030"}


LONG = (Message("system", "be brief"), Message("user", "the quick brown fox " * 8))


def test_truncate_cuts_the_prompt_from_the_left_and_never_an_answer(tok):
    full = render_pairs([pair(prompt=LONG)], tok, DataConfig()).items[0]
    limit = len(full.prompt_ids) + len(full.chosen_ids) - 10
    r = render_pairs([pair(prompt=LONG)], tok, DataConfig(max_length=limit, overflow="truncate"))
    (item,) = r.items
    assert item.truncated and r.truncated == 1 and r.overflows[0].action == "truncated"
    assert (item.chosen_ids, item.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    assert item.prompt_ids == full.prompt_ids[10:] and len(item.chosen.input_ids) == limit


def test_truncate_keeps_a_leading_bos(tok):
    bos = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                        pad_token="<|pad|>")
    tmpl = "{{ bos_token }}" + tok.chat_template
    full = render_pairs([pair(prompt=LONG)], bos, DataConfig(), tmpl).items[0]
    limit = len(full.chosen.input_ids) - 5
    (item,) = render_pairs([pair(prompt=LONG)], bos, DataConfig(max_length=limit, overflow="truncate"), tmpl).items
    assert item.prompt_ids == [bos.bos_token_id] + full.prompt_ids[6:] and len(item.chosen.input_ids) == limit


def test_answers_longer_than_max_length_are_dropped_error_or_drop(tok):
    pairs = [pair(), pair(chosen="dog " * 30)]
    r = render_preferences_all(pairs, tok, DataConfig(max_length=30, overflow="truncate"))
    assert (len(r.items), r.dropped, r.truncated, r.issues) == (1, 1, 0, [])
    r = render_preferences_all(pairs, tok, DataConfig(max_length=30, overflow="drop"))
    assert (len(r.items), r.dropped) == (1, 1)
    with pytest.raises(DataError) as e:
        render_pairs([pair(), Pair(LONG, Message("assistant", "a"), Message("assistant", "b"), O(7))], tok,
                     DataConfig(max_length=30))
    assert [(i.code, i.line) for i in e.value.issues] == [("E013", 7)]
    with pytest.raises(DataError) as e:
        render_pairs(pairs[1:], tok, DataConfig(max_length=30, overflow="drop"))
    assert e.value.codes() == {"E015"}


# ---------------------------------------------------------------- splits and the check's views


def test_splits_holdout_and_objective_checks(jsonl):
    path = jsonl([trl(prompt=f"question {i}") for i in range(10)])
    s = load_preference_splits(DataConfig(train=str(path), valid_fraction=0.2), seed=0, objective="dpo")
    assert (len(s.train), len(s.valid), s.format) == (8, 2, "chosen_rejected")
    k = load_preference_splits(DataConfig(train=str(path), valid_fraction=0.2), seed=0, objective="kto")
    assert (len(k.train), len(k.valid)) == (16, 4) and [u.desirable for u in k.train[:2]] == [True, False]
    assert {u.origin.line for u in k.valid} == {p.origin.line for p in s.valid}  # a pair's halves stay together
    with pytest.raises(DataError) as e:
        load_preference_splits(DataConfig(train=str(jsonl([kto()], "kto.jsonl"))), seed=0, objective="dpo")
    assert e.value.codes() == {"E026"} and "objective.name kto" in str(e.value)


def test_show_pair_and_pair_stats(tok):
    items = render_pairs([pair(), pair(chosen="yes")], tok, DataConfig()).items
    assert show_pair(items[0], tok) == ("prompt:\n<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n\n"
                                        "chosen: [[the quick fox<|im_end|>]]\nrejected: [[a dog<|im_end|>]]")
    stats = pair_stats(items)
    n = len(items[0].prompt_ids)
    assert stats["count"] == 2 and stats["prompt"] == {"min": n, "median": n, "max": n}
    assert stats["chosen"]["min"] == len(items[1].chosen_ids) and stats["chosen"]["max"] == len(items[0].chosen_ids)
    assert isinstance(items[0], RenderedPair) and json.dumps(stats)
