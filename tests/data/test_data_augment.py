"""Augmentation: seeded by (seed, epoch), never touches assistant text, cached paraphrases."""

import pytest
from data_helpers import chat

from tunesmith.config import AugmentConfig
from tunesmith.data import (Augmenter, CachedParaphraser, Example, Message, ModelParaphraser, Origin, load_examples,
                            noise)


def examples(jsonl):
    return load_examples(jsonl([chat(user=f"Convert the date {i} March to ISO format", assistant=f"2024-03-{i:02d}",
                                     system="You convert dates." if i % 2 else None) for i in range(1, 13)]))


def assistants(exs):
    return [[m.content for m in e.messages if m.role == "assistant"] for e in exs]


def test_same_seed_and_epoch_give_the_same_data(jsonl):
    exs = examples(jsonl)
    cfg = AugmentConfig(system_prompts=["Be exact.", "Answer in ISO 8601."], prompt_noise=0.1)
    a = Augmenter(cfg, seed=3)
    assert a.apply(exs, 0) == Augmenter(cfg, seed=3).apply(exs, 0)
    assert a.apply(exs, 0) != a.apply(exs, 1)
    assert a.apply(exs, 0) != Augmenter(cfg, seed=4).apply(exs, 0)


def test_assistant_text_is_never_changed_and_inputs_not_mutated(jsonl):
    exs = examples(jsonl)
    before = list(exs)
    cfg = AugmentConfig(system_prompts=["Be exact."], system_prompt_prob=1.0, prompt_noise=0.5)
    for epoch in range(3):
        out = Augmenter(cfg, seed=0).apply(exs, epoch)
        assert assistants(out) == assistants(exs)
        assert [e.origin for e in out] == [e.origin for e in exs]
    assert exs == before


def test_system_prompt_replaced_or_inserted(jsonl):
    exs = examples(jsonl)
    out = Augmenter(AugmentConfig(system_prompts=["Be exact."], system_prompt_prob=1.0), seed=0).apply(exs, 0)
    for old, new in zip(exs, out):
        assert new.messages[0] == Message("system", "Be exact.")
        assert new.messages[1:] == (old.messages[1:] if old.messages[0].role == "system" else old.messages)
    none = Augmenter(AugmentConfig(system_prompts=["Be exact."], system_prompt_prob=0.0), seed=0).apply(exs, 0)
    assert none == exs


def test_prompt_noise_touches_only_user_text():
    import random

    text = "Convert the date to ISO format please"
    noisy = noise(text, 0.3, random.Random(0))
    assert noisy != text and noisy.strip()
    assert noise(text, 0.0, random.Random(0)) == text
    ex = Example((Message("system", "Sys tem"), Message("user", text), Message("assistant", "Ans wer")), None,
                 Origin("m", 1))
    (out,) = Augmenter(AugmentConfig(prompt_noise=0.5), seed=1).apply([ex], 0)
    assert out.messages[0] == ex.messages[0] and out.messages[2] == ex.messages[2]
    assert out.messages[1].content != text


def test_text_examples_pass_through():
    ex = Example(None, "plain", Origin("m", 1))
    assert Augmenter(AugmentConfig(prompt_noise=0.5), seed=0).apply([ex], 0) == [ex]


def fake_generate(calls):
    def generate_fn(convs):
        calls.append(len(convs))
        return [f"Rewritten #{i}: " + c[-1]["content"].split("\n\n", 1)[1] for i, c in enumerate(convs)]
    return generate_fn


def test_paraphrases_are_cached_and_computed_once(jsonl, tmp_path):
    exs = examples(jsonl)
    calls = []
    cache = tmp_path / "paraphrases.json"
    para = CachedParaphraser(ModelParaphraser(fake_generate(calls), count=2), cache)
    aug = Augmenter(AugmentConfig(paraphrase=True, paraphrase_count=2), seed=0, paraphraser=para)
    epochs = [aug.apply(exs, e) for e in range(4)]
    assert calls == [24]  # 12 distinct prompts x 2 paraphrases, in one batch, once
    users = {m.content for ep in epochs for e in ep for m in e.messages if m.role == "user"}
    assert any(u.startswith("Rewritten") for u in users) and any(not u.startswith("Rewritten") for u in users)
    assert all(assistants(ep) == assistants(exs) for ep in epochs)
    # A new process reading the same cache file calls the model no more.
    again = CachedParaphraser(ModelParaphraser(fake_generate(calls), count=2), cache)
    Augmenter(AugmentConfig(paraphrase=True), seed=0, paraphraser=again).apply(exs, 5)
    assert calls == [24]
    assert again(["never seen"]) and calls == [24, 2]


def test_model_paraphraser_cleans_replies():
    replies = iter(['"Same thing"', "", "hello", "Other words", "other words"])
    para = ModelParaphraser(lambda convs: [next(replies) for _ in convs], count=5)
    assert para(["Hello"]) == [["Same thing", "Other words"]]  # quotes, empty, the original, duplicates go


def test_paraphrase_without_paraphraser_is_an_error():
    with pytest.raises(ValueError, match="paraphraser"):
        Augmenter(AugmentConfig(paraphrase=True), seed=0)
