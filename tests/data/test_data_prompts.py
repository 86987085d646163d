"""Prompt-only records: read for generation and eval (prompt_only=True), still refused for training."""

import pytest
from data_helpers import chat

from tunesmith.config import DataConfig
from tunesmith.data import DataError, Origin, convert, load_splits, read_examples
from tunesmith.data.example import prompt_and_optional_reference, prompt_and_reference


def turn(role, content):
    return {"role": role, "content": content}


def user(text, system=None):
    return {"messages": ([turn("system", system)] if system else []) + [turn("user", text)]}


def prompts(path, fmt="auto"):
    loaded = read_examples(path, fmt, prompt_only=True)
    assert not loaded.issues, [i.format() for i in loaded.issues]
    return loaded.format, [prompt_and_optional_reference(e) for e in loaded.examples]


def test_a_conversation_ending_with_the_user_turn_is_a_prompt_without_reference(jsonl):
    path = jsonl([user("what day is it?", system="be brief"), chat(user="q", assistant="a")])
    fmt, pairs = prompts(path)
    assert fmt == "messages"
    assert pairs == [([turn("system", "be brief"), turn("user", "what day is it?")], None), ([turn("user", "q")], "a")]


def test_training_still_refuses_a_conversation_without_an_assistant_turn(jsonl):
    follow_up = {"messages": [turn("user", "q"), turn("assistant", "a"), turn("user", "and then?")]}
    path = jsonl([chat(), user("no answer here"), chat(), follow_up])
    for issues in (read_examples(path).issues, read_examples(path, "messages").issues):
        assert [(i.code, i.line, i.field) for i in issues] == [("E010", 2, "messages"), ("E011", 4, "messages[2]")]
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train=str(path), valid_fraction=0.0), seed=0)
    assert err.value.codes() == {"E010", "E011"} and f"{path}:2: messages: E010" in str(err.value)
    as_prompts = read_examples(path, prompt_only=True)
    assert not as_prompts.issues  # generation answers the last user turn, after the earlier exchange
    assert prompt_and_optional_reference(as_prompts.examples[3]) == (follow_up["messages"], None)
    with pytest.raises(ValueError, match="no assistant turn"):
        prompt_and_reference(as_prompts.examples[1])


def test_prompt_records_string_and_messages(jsonl):
    path = jsonl([{"prompt": "2 + 2?"}, {"prompt": [turn("system", "s"), turn("user", "hi")]}])
    assert prompts(path) == ("prompt", [([turn("user", "2 + 2?")], None),
                                        ([turn("system", "s"), turn("user", "hi")], None)])
    assert [i.code for i in read_examples(path).issues] == ["E005"]  # not a training format
    with pytest.raises(ValueError, match="prompt_only"):
        convert({"prompt": "x"}, "prompt", Origin("f.jsonl", 1))


def test_preference_records_give_their_prompt_only(jsonl):
    """Read by data/preference.py: the prompt of each pair (or KTO answer); the answers are never references."""
    conv = [turn("system", "s"), turn("user", "pick one")]
    openai = {"input": {"messages": conv}, "preferred_output": [turn("assistant", "good")],
              "non_preferred_output": [turn("assistant", "bad")]}
    assert prompts(jsonl([openai]), "preference") == ("preference", [(conv, None)])
    assert prompts(jsonl([openai]))[0] == "preference"
    trl = [{"prompt": "pick one", "chosen": "good", "rejected": "bad"},
           {"prompt": conv, "chosen": [turn("assistant", "good")], "rejected": [turn("assistant", "bad")]},
           # TRL's implicit prompt: what chosen and rejected share
           {"chosen": [*conv, turn("assistant", "good")], "rejected": [*conv, turn("assistant", "bad")]}]
    assert prompts(jsonl(trl)) == ("chosen_rejected", [([turn("user", "pick one")], None), (conv, None), (conv, None)])
    kto = [{"prompt": "pick one", "completion": "a bad answer", "label": False}]
    assert prompts(jsonl(kto)) == ("unpaired", [([turn("user", "pick one")], None)])
    for records in ([openai], trl, kto):  # read for an sft run, they are still refused
        assert {i.code for i in read_examples(jsonl(records)).issues} == {"E026"}


def test_bad_prompt_records_give_file_line_and_field(jsonl):
    path = jsonl([
        user("fine"),
        {"messages": [turn("system", "only a system turn")]},
        {"messages": [turn("user", "   ")]},
        {"messages": [turn("user", "q"), turn("system", "late")]},
        {"messages": [turn("assistant", "first"), turn("user", "q")]},
        {"messages": [turn("robot", "q")]},
        {"foo": 1},
        {"prompt": "a prompt in a messages file"},
    ])
    issues = read_examples(path, prompt_only=True).issues
    assert [(i.where(), i.field, i.code) for i in issues] == [
        (f"{path}:2", "messages", "E010"), (f"{path}:3", "messages[0].content", "E009"),
        (f"{path}:4", "messages[1]", "E011"), (f"{path}:5", "messages", "E025"),
        (f"{path}:6", "messages[0].role", "E008"), (f"{path}:7", None, "E005"), (f"{path}:8", None, "E021")]
    pair = {"preferred_output": [turn("assistant", "a")], "non_preferred_output": [turn("assistant", "b")]}
    pref = jsonl([{"input": "not an object", **pair}, {"input": {"messages": [turn("user", "")]}, **pair},
                  {"input": {"messages": [turn("user", "q"), turn("assistant", "a")]}, **pair}], name="pref.jsonl")
    assert [(i.line, i.field, i.code) for i in read_examples(pref, prompt_only=True).issues] == [
        (1, "input", "E007"), (2, "input.messages[0].content", "E009"), (3, "input.messages[1]", "E028")]
    trl = jsonl([{"chosen": "good", "rejected": "bad"}, {"prompt": 7, "chosen": "a", "rejected": "b"}],
                name="trl.jsonl")
    assert [(i.line, i.field, i.code) for i in read_examples(trl, prompt_only=True).issues] == [
        (1, "prompt", "E029"), (2, "prompt", "E007")]


def test_every_valid_training_file_reads_the_same_as_prompts(jsonl):
    path = jsonl([chat(system="s"), {"messages": [turn("system", "s"), turn("assistant", "a")]}])
    train, gen = read_examples(path), read_examples(path, prompt_only=True)
    assert not train.issues and not gen.issues and train.examples == gen.examples
