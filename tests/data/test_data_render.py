"""Rendering: label masks (assistant text + end of turn), weights, train_on, max_length policies."""

import pytest
from data_helpers import chat, trained_texts

from tunesmith.config import DataConfig
from tunesmith.data import (IGNORE, DataError, Example, Message, Origin, load_examples, render_examples, render_one,
                            render_prompt_ids)

O = Origin("mem.jsonl", 1)


def conv(*turns, weights=None):
    roles = ["user", "assistant"] * len(turns)
    weights = weights or [None] * len(turns)
    return Example(tuple(Message(r, c, w if r == "assistant" else None)
                         for r, c, w in zip(roles, turns, [x for w in weights for x in (None, w)])), None, O)


def test_single_turn_mask_is_assistant_text_and_end_of_turn(tok):
    ids, labels = render_one(conv("hello world", "the quick fox"), tok)
    # The "\n" the template writes after <|im_end|> is not trained: generation stops at the eos.
    assert trained_texts(tok, ids, labels) == ["the quick fox<|im_end|>"]
    assert tok.decode(ids) == ("<|im_start|>user\nhello world<|im_end|>\n"
                               "<|im_start|>assistant\nthe quick fox<|im_end|>\n")
    assert labels[-1] == IGNORE and labels[-2] == tok.eos_token_id


def test_multi_turn_with_system(tok):
    ex = Example((Message("system", "be brief"), Message("user", "q one"), Message("assistant", "answer one"),
                  Message("user", "q two"), Message("assistant", "answer two")), None, O)
    ids, labels = render_one(ex, tok)
    assert trained_texts(tok, ids, labels) == ["answer one<|im_end|>", "answer two<|im_end|>"]


def test_weight_zero_message_is_masked(tok):
    ids, labels = render_one(conv("q one", "answer one", "q two", "answer two", weights=[0, 1]), tok)
    assert trained_texts(tok, ids, labels) == ["answer two<|im_end|>"]
    ids, labels = render_one(conv("q one", "answer one", "q two", "answer two", weights=[1, 0]), tok)
    assert trained_texts(tok, ids, labels) == ["answer one<|im_end|>"]


def test_train_on_all(tok):
    ids, labels = render_one(conv("q", "a"), tok, train_on="all")
    assert labels == ids


def test_plain_text_appends_eos_and_trains_everything(tok):
    ids, labels = render_one(Example(None, "the quick brown fox", O), tok)
    assert ids[-1] == tok.eos_token_id and labels == ids
    assert tok.decode(ids) == "the quick brown fox<|im_end|>"


def test_control_tokens_in_text_are_plain_text(tok):
    ids, labels = render_one(conv("say <|im_end|> please", "ok"), tok)
    assert ids.count(tok.eos_token_id) == 2  # one per turn, none from the user's text
    assert trained_texts(tok, ids, labels) == ["ok<|im_end|>"]


def test_named_and_file_templates(tok, tmp_path):
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>")
    a = render_one(conv("q", "a"), bare, chat_template="chatml")
    b = render_one(conv("q", "a"), tok)
    assert a == b
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}", encoding="utf-8")
    ids, labels = render_one(conv("q", "a"), bare, chat_template=str(f))
    assert tok.decode(ids) == "[user] q<|im_end|>[assistant] a<|im_end|>"
    assert trained_texts(tok, ids, labels) == [" a<|im_end|>"]


def test_template_without_eos_trains_the_whole_turn(tok):
    tmpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids, labels = render_one(conv("q", "the fox"), tok, chat_template=tmpl)
    assert trained_texts(tok, ids, labels) == ["the fox<|endoftext|>\n"]


def test_render_prompt_ids_is_a_prefix_of_the_full_render(tok):
    ex = conv("hello world", "the fox")
    prompt = render_prompt_ids([m.as_dict() for m in ex.messages[:-1]], tok)
    ids, _ = render_one(ex, tok)
    assert ids[: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def long_and_short(jsonl):
    return load_examples(jsonl([chat(), chat(assistant="the quick brown fox " * 10), chat(assistant="dog " * 30)]))


def test_overflow_error_counts(tok, jsonl):
    with pytest.raises(DataError) as e:
        render_examples(long_and_short(jsonl), tok, DataConfig(max_length=40))
    assert [(i.code, i.line) for i in e.value.issues] == [("E013", 2), ("E013", 3)]


def test_overflow_truncate(tok, jsonl):
    r = render_examples(long_and_short(jsonl), tok, DataConfig(max_length=40, overflow="truncate"))
    assert (r.truncated, r.dropped, len(r.items)) == (2, 0, 3)
    assert [len(it.input_ids) for it in r.items][1:] == [40, 40]
    assert [it.truncated for it in r.items] == [False, True, True]
    assert all(it.n_targets > 0 for it in r.items)
    assert [o.action for o in r.overflows] == ["truncated", "truncated"]
    # Cut from the end: the truncated example starts like the full one.
    full, _ = render_one(long_and_short(jsonl)[1], tok)
    assert r.items[1].input_ids == full[:40]


def test_overflow_drop(tok, jsonl):
    r = render_examples(long_and_short(jsonl), tok, DataConfig(max_length=40, overflow="drop"))
    assert (r.truncated, r.dropped, len(r.items)) == (0, 2, 1)
    assert r.items[0].origin.line == 1


def test_no_example_is_ever_all_masked(tok, jsonl):
    exs = load_examples(jsonl([chat(user="the quick brown fox " * 20), chat()]))
    with pytest.raises(DataError) as e:
        render_examples(exs, tok, DataConfig(max_length=40, overflow="truncate"))
    assert e.value.codes() == {"E014"}
    r = render_examples(exs, tok, DataConfig(max_length=40, overflow="drop"))
    assert r.dropped == 1 and all(it.n_targets > 0 for it in r.items)
