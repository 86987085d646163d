"""Invariants of the step helpers: data order, micro-batch split, token-normalised accumulation."""

import torch
from accelerate import Accelerator

from tunesmith.testing import assert_close_scaled, tiny_model
from tunesmith.train.steps import (IGNORE, backward_step, balanced, count_targets, epoch_order, eval_loss,
                                   global_target_tokens, step_micro_batches, token_loss)


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, seed=1, epoch=0, shuffle=True), epoch_order(50, seed=1, epoch=0, shuffle=True)
    assert a == b and sorted(a) == list(range(50))
    assert epoch_order(50, 1, 1, True) != a  # a new order each epoch
    assert epoch_order(5, 1, 0, False) == [0, 1, 2, 3, 4]


def test_micro_batches_cover_each_example_once_across_ranks():
    order = list(range(23))
    per_rank = [step_micro_batches(order, micro=2, accum=3, processes=2, rank=r) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # ceil(23 / 12) steps
    seen = sorted(i for r in per_rank for step in r for mb in step for i in mb)
    assert seen == order


def test_with_lengths_the_ranks_get_a_step_s_examples_with_balanced_tokens():
    lengths = [500, 400, 300, 200, 50, 40, 30, 20]  # by position: rank 0 would get 1400 tokens, rank 1 140
    order = list(range(8))
    per_rank = [step_micro_batches(order, micro=4, accum=1, processes=2, rank=r, lengths=lengths) for r in (0, 1)]
    tokens = [sum(lengths[i] for mb in r[0] for i in mb) for r in per_rank]
    assert tokens == [770, 770]
    assert sorted(i for r in per_rank for mb in r[0] for i in mb) == order  # the same step, dealt differently
    assert [len(mb) for r in per_rank for mb in r[0]] == [4, 4]  # as many examples as without lengths
    assert per_rank[0] == step_micro_batches(order, 4, 1, 2, 0, lengths)  # depends only on the arguments


def test_balanced_micro_batches_keep_the_step_structure():
    """Every rank makes the same number of passes, a micro-batch holds at most ``micro`` examples (its first
    micro-batches exactly ``micro``: the loop re-cuts a rank's examples in runs of ``micro``), and each example is
    in one micro-batch of its own step, for full steps, a short last step and accumulation."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 600) for _ in range(23)]
    order = epoch_order(23, seed=3, epoch=0, shuffle=True)
    for micro, accum, processes in [(2, 3, 2), (4, 1, 2), (3, 2, 3), (1, 1, 4), (5, 1, 2)]:
        per_step = micro * accum * processes
        plain = step_micro_batches(order, micro, accum, processes, 0)
        per_rank = [step_micro_batches(order, micro, accum, processes, r, lengths) for r in range(processes)]
        for k in range(len(plain)):
            assert {len(r[k]) for r in per_rank} == {len(plain[k])}
            for r in per_rank:
                sizes = [len(mb) for mb in r[k] if mb]
                assert all(n == micro for n in sizes[:-1]) and all(0 < n <= micro for n in sizes)
            got = sorted(i for r in per_rank for mb in r[k] for i in mb)
            assert got == sorted(order[k * per_step:(k + 1) * per_step])


def test_a_short_last_step_gives_every_rank_data_when_there_is_enough():
    lengths = [100] * 12
    per_rank = [step_micro_batches(list(range(12)), micro=4, accum=1, processes=2, rank=r, lengths=lengths)
                for r in (0, 1)]
    assert [len(mb) for r in per_rank for mb in r[1]] == [2, 2]  # not 4 and a pass with no loss


def test_balanced_is_longest_first_to_the_lightest_bin_with_room():
    assert balanced([0, 1, 2, 3], [5, 9, 1, 7], [2, 2]) == [[1, 2], [3, 0]]
    assert balanced([0, 1, 2], [5, 9, 1], [1, 2]) == [[1], [0, 2]]  # a full bin takes no more
    assert balanced([0, 1, 2, 3], [4, 4, 4, 4], [2, 2]) == [[0, 2], [1, 3]]  # ties: earlier example, earlier bin


def test_the_loop_deals_packed_steps_by_tokens_and_padded_ones_in_order(tiny_model_dir, tiny_data, tmp_path,
                                                                        monkeypatch):
    """train() hands step_micro_batches the examples' lengths when it packs them (a packed micro-batch costs its
    tokens) and none when it pads them (length grouping decides those micro-batches)."""
    from fault_hooks import base_settings, write_config

    from tunesmith.config import load_config
    from tunesmith.train import loop, train

    seen = []

    def spy(order, micro, accum, processes, rank, lengths=None):
        seen.append(lengths)
        return step_micro_batches(order, micro, accum, processes, rank, lengths)

    monkeypatch.setattr(loop, "step_micro_batches", spy)
    for packing in (True, False):
        cfg = base_settings(tiny_model_dir, tiny_data, tmp_path / f"run{packing}",
                            **{"train.max_steps": 1, "train.packing": packing})
        train(load_config(write_config(tmp_path / f"c{packing}.yaml", cfg)), quiet=True)
    assert seen[0] is not None and len(seen[0]) >= 8 and all(n > 0 for n in seen[0])
    assert seen[1] is None


def test_count_targets_uses_the_causal_shift():
    assert count_targets([5, 6, 7, 8]) == 3
    assert count_targets([IGNORE, IGNORE, 7, 8]) == 2
    assert count_targets([7, IGNORE, IGNORE]) == 0  # label at position 0 is never predicted


def _batch(tok, texts, prompt_len=3):
    ids = [tok(t)["input_ids"] for t in texts]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), tok.pad_token_id)
    labels = torch.full((len(ids), T), IGNORE)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        labels[i, prompt_len:len(x)] = torch.tensor(x[prompt_len:])
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


TEXTS = ["the quick brown fox jumps", "hello", "convert the date to iso format please now",
         "paris is the capital of france", "abc", "what is the capital of france?", "one two", "system user assistant"]


def _grads_after(tok, micro_texts):
    model = tiny_model(tok, seed=3)
    acc = Accelerator(cpu=True)
    batches = [_batch(tok, t) for t in micro_texts]
    n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    backward_step(model, batches, n, acc)
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_accumulation_4x2_equals_one_batch_of_8(tok):
    """Loss is normalised by the step's target tokens, so accumulation equals a bigger batch (fp32, 1e-6)."""
    whole = _grads_after(tok, [TEXTS])
    accum = _grads_after(tok, [TEXTS[i:i + 2] for i in range(0, 8, 2)])
    for k in whole:
        assert_close_scaled(accum[k], whole[k], msg=k)


def test_token_loss_equals_mean_cross_entropy(tok):
    model = tiny_model(tok, seed=3)
    b = _batch(tok, TEXTS[:3])
    loss_sum, n, _ = token_loss(model, b)
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert_close_scaled(loss_sum / n, ref)


def test_eval_loss_is_token_weighted(tok):
    model = tiny_model(tok, seed=3)
    acc = Accelerator(cpu=True)
    b1, b2 = _batch(tok, TEXTS[:1]), _batch(tok, TEXTS[2:5])
    ev = eval_loss(model, [b1, b2], acc)
    s1, n1, _ = token_loss(model, b1)
    s2, n2, _ = token_loss(model, b2)
    assert ev.tokens == n1 + n2
    assert abs(ev.loss - float((s1 + s2).detach()) / (n1 + n2)) < 1e-6


def test_global_target_tokens_sums_the_step():
    assert global_target_tokens([2, 0, 1, 3], 0, 2, [10, 20, 30, 40]) == 40
    assert global_target_tokens([2, 0, 1, 3], 2, 2, [10, 20, 30, 40]) == 60
