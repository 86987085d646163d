"""Answers that share a prompt hold it once in a packed row (data.collate_prefixed): a preference pair is prompt, chosen,
then rejected seeing the prompt but not the chosen answer. Every answer's log-probabilities and the gradients through
them equal those of the plain layout (each answer with its own copy of the prompt), on the CPU attention kernel, the
sdpa loop (train.kernels off), the fused decoder blocks, with gradient checkpointing and in bf16; an answer cannot see
another answer of its prompt; a FlashAttention model is never given such a row; a DPO run trains to the same losses."""

import json

import pytest
import torch
from train_helpers import record_calls

from tunesmith.data import IGNORE, RenderedExample, collate_packed, collate_prefixed
from tunesmith.objectives.preference import sequence_logps
from tunesmith.testing import SCALED_RTOL, assert_close_scaled, tiny_model
from tunesmith.train import loop, packing
from tunesmith.train.kernels import apply_kernels
from tunesmith.train.packing import PackedCausalAttention, PackedRow, enable_packing, row_layout
from tunesmith.train.steps import Compute

# (prompt length, answer lengths): a pair, a one-token prompt, a group of three (reinforcement fine-tuning's shape),
# a lone answer
SHAPES = [(9, [5, 7]), (1, [4, 3]), (6, [3, 8, 2]), (4, [6])]


def _grouped(tok, shapes=SHAPES, seed=0):
    """(examples, groups): every answer of a shape after its prompt, numbered answer-major as the preference objective
    numbers them (all first answers, then all second answers, ...), so the row's order is not the examples' order."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, len(tok), (n,), generator=g).tolist()  # noqa: E731
    by_group = []
    for lp, answers in shapes:
        prompt = draw(lp)
        by_group.append([RenderedExample(prompt + a, [IGNORE] * lp + a, None) for a in map(draw, answers)])
    examples, where = [], {}
    for j in range(max(len(m) for m in by_group)):
        for gi, members in enumerate(by_group):
            if j < len(members):
                where[gi, j] = len(examples)
                examples.append(members[j])
    groups = [(lp, [where[gi, j] for j in range(len(answers))]) for gi, (lp, answers) in enumerate(shapes)]
    return examples, groups


def _logps_and_grads(model, batch, n, compute):
    """Each sequence's summed answer log-probability (n,), and the gradients of a weighted sum of them (weights that
    differ per sequence, as a preference loss's do)."""
    model.zero_grad(set_to_none=True)
    seq, count = sequence_logps(model, batch, compute, n)
    (seq * torch.linspace(-1.0, 2.0, n)).sum().backward()
    return seq.detach(), count, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_collate_prefixed_holds_each_prompt_once(tok):
    examples, groups = _grouped(tok)
    batch = collate_prefixed(examples, groups)
    plain = collate_packed(examples)
    saved = sum(lp * (len(a) - 1) - (len(a) - 1) for lp, a in SHAPES)  # each further answer: prompt less one token
    assert batch["input_ids"].size(1) == plain["input_ids"].size(1) - saved
    assert int((batch["labels"] != IGNORE).sum()) == int((plain["labels"] != IGNORE).sum())  # the same targets
    # the first group: prompt 9 + answer 5 (one sequence), then the prompt's last token and answer 7 at positions 8..
    assert batch["attention_spans"][:2].tolist() == [[0, 8, 8, 14], [0, 8, 14, 22]]
    assert batch["position_ids"][0, 14:22].tolist() == list(range(8, 16))
    assert batch["input_ids"][0, 14] == batch["input_ids"][0, 8]  # the repeated prompt token
    assert batch["cu_seq_lens_q"][:3].tolist() == [0, 14, 22]
    assert sorted(batch["segment_sequence"].tolist()) == list(range(len(examples)))
    assert batch["segment_sequence"][:2].tolist() == groups[0][1]


def test_collate_prefixed_refuses_examples_that_do_not_share_the_prefix(tok):
    examples, groups = _grouped(tok)
    with pytest.raises(ValueError, match="do not share"):
        collate_prefixed(examples, [(groups[0][0] + 1, groups[0][1])] + groups[1:])  # the answers differ there
    with pytest.raises(ValueError, match="exactly one group"):
        collate_prefixed(examples, groups[1:])
    lone = RenderedExample([5, 6, 7], [IGNORE] * 3, None)
    with pytest.raises(ValueError, match="nothing after"):
        collate_prefixed([lone], [(3, [0])])


@pytest.mark.parametrize("path", ["cpu kernel", "sdpa loop", "fused blocks", "checkpointing"])
def test_shared_prompts_give_every_answer_its_plain_log_probs_and_gradients(tok, path):
    examples, groups = _grouped(tok)
    model = tiny_model(tok, seed=5)
    enable_packing(model)
    if path == "fused blocks":
        assert apply_kernels(model)["layers"] == model.config.num_hidden_layers
    if path == "checkpointing":  # the recomputation in backward must take the row's spans too
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compute = Compute(fused=path != "sdpa loop")
    want = _logps_and_grads(model, collate_packed(examples), len(examples), compute)
    got = _logps_and_grads(model, collate_prefixed(examples, groups), len(examples), compute)
    assert torch.equal(got[1], want[1])  # every answer's tokens counted, in the examples' numbering
    assert_close_scaled(got[0], want[0], msg="log-probs")
    assert want[2].keys() == got[2].keys() and got[2]
    for k in want[2]:
        assert_close_scaled(got[2][k], want[2][k], msg=k)


def test_shared_prompts_in_bf16_mixed_precision(tok):
    examples, groups = _grouped(tok)
    model = tiny_model(tok, seed=5)
    enable_packing(model)
    model.train()
    compute = Compute(autocast=torch.bfloat16)
    want = _logps_and_grads(model, collate_packed(examples), len(examples), compute)
    got = _logps_and_grads(model, collate_prefixed(examples, groups), len(examples), compute)
    assert_close_scaled(got[0], want[0], rtol=SCALED_RTOL[torch.bfloat16], msg="log-probs")
    for k in want[2]:
        assert_close_scaled(got[2][k], want[2][k], rtol=SCALED_RTOL[torch.bfloat16], msg=k)


def test_an_answer_cannot_see_another_answer_of_its_prompt(tok):
    """Change every token of a pair's first answer (same length): the second answer's token log-probs do not move;
    change the prompt: they do."""
    examples, groups = _grouped(tok, [(7, [6, 5])])
    first, second = examples
    model = tiny_model(tok, seed=1)
    enable_packing(model)

    def second_logps(first_answer, prompt_token=None):
        ids = list(first.input_ids[:7]) + first_answer
        if prompt_token is not None:
            ids[2] = prompt_token
        a = RenderedExample(ids, [IGNORE] * 7 + first_answer, None)
        b = RenderedExample(ids[:7] + second.input_ids[7:], second.labels, None)
        batch = collate_prefixed([a, b], [(7, [0, 1])])
        from tunesmith.train.loss import token_logprobs

        with torch.no_grad():
            logps, rows = token_logprobs(model, batch)
        return logps[rows == 1]

    base = second_logps(first.input_ids[7:])
    assert_close_scaled(second_logps([(t + 1) % len(tok) for t in first.input_ids[7:]]), base)
    assert not torch.allclose(second_logps(first.input_ids[7:], prompt_token=(first.input_ids[2] + 1) % len(tok)), base)


def test_the_cpu_kernel_on_shared_spans_equals_sdpa_on_each_sequence():
    """PackedCausalAttention on (s, p, b, e) spans against sdpa run on each answer's own sequence (its prompt rows
    copied before it): the answers' outputs identical (the same kernel on the same rows), the input gradients equal
    (the prompt's keys and values summed over its answers)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = ((0, 6, 6, 15), (0, 6, 15, 20), (20, 20, 20, 31), (31, 34, 34, 36), (31, 34, 36, 44), (31, 34, 44, 46))
    t, heads, kv, d = 46, 6, 2, 16
    g = torch.randn(1, t, heads, d, generator=torch.Generator().manual_seed(1))

    def qkv():
        x = torch.randn(1, t, (heads + 2 * kv) * d, generator=torch.Generator().manual_seed(0)).requires_grad_()
        q, k, v = x.split([heads * d, kv * d, kv * d], -1)
        return x, [y.view(1, t, -1, d).transpose(1, 2) for y in (q, k, v)]

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    x1, (q, k, v) = qkv()
    outs = []
    for s, p, b, e in spans:
        o = sdpa_attention_forward(module, *(packing.joined_rows(y, s, p, b, e) for y in (q, k, v)), None, scaling=0.25,
                                   is_causal=True)[0]
        outs.append(o if b == p else o[:, p - s:])
    ref = torch.cat(outs, dim=1)
    ref.backward(g)
    x2, (q, k, v) = qkv()
    out = PackedCausalAttention.apply(q, k, v, spans, 0.25)
    out.backward(g)
    assert torch.equal(out, ref)
    assert_close_scaled(x2.grad, x1.grad)


def test_row_layout_and_a_flash_attention_model(tok, monkeypatch):
    model = tiny_model(tok, seed=1)
    assert row_layout(model) == "padded"
    enable_packing(model)
    assert row_layout(model) == "prefixed"
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert row_layout(model) == "packed"  # its varlen kernel cannot show two answers one prompt
    examples, groups = _grouped(tok)
    with pytest.raises(RuntimeError, match="FlashAttention"):
        packing.model_forward(model, collate_prefixed(examples, groups))


def test_a_shared_span_longer_than_a_sliding_window_is_refused():
    """A span's length is its prompt rows plus its own: 3 + 6 = 9 tokens here, though no segment of the row is."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    row = PackedRow((0, 6, 12), shared=((0, 3, 3, 6), (0, 3, 6, 12)))
    q = torch.randn(1, 6, 12, 16)
    k = v = torch.randn(1, 2, 12, 16)
    assert packing.packed_attention_forward(module, q, k, v, None, scaling=0.25, packed_row=row, sliding_window=9)[0] \
        .shape == (1, 12, 6, 16)
    with pytest.raises(ValueError, match="attention window"):
        packing.packed_attention_forward(module, q, k, v, None, scaling=0.25, packed_row=row, sliding_window=8)


def test_a_dpo_run_with_shared_prompts_trains_to_the_losses_of_the_plain_layout(tmp_path, tiny_model_dir, monkeypatch):
    """The same DPO run (LoRA, reference with the adapters off) with each pair's prompt held once and with every
    sequence whole: the same per-step losses and held-out figures, at fp32 rounding."""
    from tunesmith.config import load_config
    from tunesmith.testing import write_pair_jsonl
    from tunesmith.train import train

    train_f, valid_f = write_pair_jsonl(tmp_path / "t.jsonl", 16, seed=0), write_pair_jsonl(tmp_path / "v.jsonl", 8, seed=1)

    def run(name):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                                 f"output_dir={tmp_path / name}", "objective.name=dpo", "data.max_length=64",
                                 "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2", "train.warmup_steps=1",
                                 "eval.every_steps=2", "eval.samples=0", "eval.compare_base=false",
                                 "eval.metric_examples=0", "method.lora.r=4", "method.lora.dropout=0.0"])
        res = train(cfg, quiet=True)
        events = [json.loads(line) for line in open(res.output_dir / "metrics.jsonl")]
        return [e for e in events if e["kind"] == "train"], [e for e in events if e["kind"] == "eval"]

    calls = record_calls(monkeypatch, PackedCausalAttention)
    shared_steps, shared_evals = run("shared")
    assert any(p != b for c in calls for _, p, b, _ in c[3])  # rows with a shared prompt reached the kernel
    plain = lambda model: "packed" if packing.packs(model) else "padded"  # noqa: E731
    monkeypatch.setattr(loop, "row_layout", plain)
    monkeypatch.setattr(packing, "row_layout", plain)
    plain_steps, plain_evals = run("plain")
    assert_close_scaled(torch.tensor([e["loss"] for e in shared_steps]), torch.tensor([e["loss"] for e in plain_steps]))
    for a, b in zip(shared_evals, plain_evals, strict=True):
        assert_close_scaled(torch.tensor(list(a["stats"].values())), torch.tensor(list(b["stats"].values())))
