"""Train/validation splits and batching."""

import torch
from data_helpers import chat

from tunesmith.config import DataConfig
from tunesmith.data import (IGNORE, RenderedExample, collate, count_target_tokens, holdout_split, load_examples,
                            load_splits, render_examples)


def many(jsonl, n=20, name="train.jsonl"):
    return jsonl([chat(user=f"question {i}", assistant=f"answer {i}") for i in range(n)], name=name)


def test_valid_fraction_split_is_seeded_deterministic_and_disjoint(jsonl):
    cfg = DataConfig(train=str(many(jsonl)), valid_fraction=0.25)
    a, b, c = load_splits(cfg, seed=1), load_splits(cfg, seed=1), load_splits(cfg, seed=2)
    assert (len(a.train), len(a.valid)) == (15, 5) and a.format == "messages"
    assert a.train == b.train and a.valid == b.valid
    assert a.valid != c.valid
    train_lines = {e.origin.line for e in a.train}
    valid_lines = {e.origin.line for e in a.valid}
    assert not train_lines & valid_lines and train_lines | valid_lines == set(range(1, 21))
    assert [e.origin.line for e in a.train] == sorted(train_lines)  # file order kept (the loop shuffles)


def test_small_fraction_still_holds_one_out_and_zero_holds_none(jsonl):
    exs = load_examples(many(jsonl, 5))
    assert [len(x) for x in holdout_split(exs, 0.05, 0)] == [4, 1]
    assert [len(x) for x in holdout_split(exs, 0.0, 0)] == [5, 0]


def test_valid_file_is_used_as_is(jsonl):
    cfg = DataConfig(train=str(many(jsonl, 6)), valid=str(many(jsonl, 3, "valid.jsonl")), valid_fraction=0.5)
    s = load_splits(cfg, seed=0)
    assert (len(s.train), len(s.valid), s.valid_format) == (6, 3, "messages")


def items(tok, jsonl):
    return render_examples(load_examples(jsonl([chat(), chat(assistant="the quick brown fox jumps")])), tok,
                           DataConfig()).items


def test_collate_pads_right_and_masks_padding(tok, jsonl):
    its = items(tok, jsonl)
    b = collate(its, tok.pad_token_id)
    n0, n1 = len(its[0].input_ids), len(its[1].input_ids)
    assert n0 < n1 and b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, n1)
    assert b["input_ids"].dtype == torch.long
    assert b["input_ids"][0, :n0].tolist() == its[0].input_ids
    assert (b["input_ids"][0, n0:] == tok.pad_token_id).all()
    assert (b["labels"][0, n0:] == IGNORE).all() and b["labels"][0, :n0].tolist() == its[0].labels
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert b["attention_mask"][1].all()


def test_target_count_is_after_the_causal_shift(tok, jsonl):
    its = items(tok, jsonl)
    b = collate(its, tok.pad_token_id)
    assert count_target_tokens(b["labels"]) == sum(it.n_targets for it in its)
    first_trained = RenderedExample([5, 6, 7], [5, 6, IGNORE], its[0].origin)
    assert first_trained.n_targets == 1  # the first token is never predicted
    assert count_target_tokens(collate([first_trained], 0)["labels"]) == 1


def test_pad_equal_to_eos_keeps_the_eos_label(tok, jsonl):
    its = items(tok, jsonl)
    b = collate(its, tok.eos_token_id)  # SmolLM2's GGUF tokenizer pads with <|im_end|>
    n0 = len(its[0].input_ids)
    assert b["labels"][0, n0 - 2].item() == tok.eos_token_id  # "...<|im_end|>" "\n"
    assert (b["labels"][0, n0:] == IGNORE).all()
