"""Every input format converts to the canonical Example; auto-detection picks the right one."""

import json

import pytest
from data_helpers import chat

from tunesmith.data import Example, Message, load_examples, prompt_and_reference, read_examples


def test_messages_with_weight(jsonl):
    rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "b", "weight": 1}]}
    loaded = read_examples(jsonl([rec]))
    assert loaded.format == "messages" and not loaded.issues
    ex = loaded.examples[0]
    assert ex.messages == (Message("system", "be brief"), Message("user", "hi"), Message("assistant", "a", 0),
                           Message("user", "again"), Message("assistant", "b", 1))
    assert ex.text is None and ex.origin.line == 1 and ex.origin.path.endswith("train.jsonl")


def test_openai_content_parts_are_joined(jsonl):
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert load_examples(jsonl([rec]))[0].messages[0].content == "a b"


def test_prompt_completion(jsonl):
    ex = load_examples(jsonl([{"prompt": "2+2?", "completion": "4"}]))[0]
    assert ex.messages == (Message("user", "2+2?"), Message("assistant", "4"))


def test_text(jsonl):
    loaded = read_examples(jsonl([{"text": "the quick brown fox"}]))
    assert loaded.format == "text"
    assert loaded.examples[0].text == "the quick brown fox" and loaded.examples[0].messages is None


def test_alpaca_with_and_without_input(jsonl):
    exs = load_examples(jsonl([
        {"instruction": "Translate", "input": "hello", "output": "bonjour", "system": "You translate."},
        {"instruction": "Say hi", "input": "", "output": "hi"}]))
    assert exs[0].messages == (Message("system", "You translate."), Message("user", "Translate\n\nhello"),
                               Message("assistant", "bonjour"))
    assert exs[1].messages == (Message("user", "Say hi"), Message("assistant", "hi"))


def test_sharegpt(jsonl):
    rec = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "a1"}, {"from": "user", "value": "q2"},
                             {"from": "assistant", "value": "a2"}]}
    loaded = read_examples(jsonl([rec]))
    assert loaded.format == "sharegpt"
    assert [(m.role, m.content) for m in loaded.examples[0].messages] == [
        ("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


@pytest.mark.parametrize("rec,fmt", [
    (chat(), "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"text": "t"}, "text"),
    ({**chat(), "text": "ignored"}, "messages"),  # chat fields win over text
])
def test_auto_detection(jsonl, rec, fmt):
    assert read_examples(jsonl([rec])).format == fmt


def test_stated_format_is_used(jsonl):
    loaded = read_examples(jsonl([{"prompt": "p", "completion": "c", "text": "t"}]), "text")
    assert loaded.format == "text" and loaded.examples[0].text == "t"


def test_all_formats_are_one_type(jsonl, tmp_path):
    recs = [chat(), {"prompt": "p", "completion": "c"}, {"text": "t"}, {"instruction": "i", "output": "o"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    for i, r in enumerate(recs):
        ex = load_examples(jsonl([r], name=f"f{i}.jsonl"))[0]
        assert type(ex) is Example


def test_prompt_and_reference(jsonl):
    ex = load_examples(jsonl([{"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]))[0]
    prompt, ref = prompt_and_reference(ex)
    assert ref == "a2"
    assert prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    json.dumps(prompt)  # plain dicts, ready for apply_chat_template
    with pytest.raises(ValueError):
        prompt_and_reference(load_examples(jsonl([{"text": "t"}], name="t.jsonl"))[0])
