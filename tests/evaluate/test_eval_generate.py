import copy

import pytest
import torch

from eval_helpers import CONVERSATIONS, chat
from tunesmith.evaluate import eos_token_ids, generate_batch, generate_text, render_prompt
from tunesmith.evaluate.generate import length_sorted_batches


def _greedy_unpadded(model, tok, conv, max_new_tokens):
    """transformers' own generate on one unpadded prompt: the ground truth."""
    ids = torch.tensor([render_prompt(tok, conv)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_prompts_differ_a_lot_in_length(eval_tok):
    lengths = [len(render_prompt(eval_tok, c)) for c in CONVERSATIONS]
    assert max(lengths) > 5 * min(lengths)


def test_batched_greedy_equals_one_at_a_time(model, eval_tok):
    batched = generate_batch(model, eval_tok, CONVERSATIONS, max_new_tokens=12, batch_size=4)
    single = [generate_batch(model, eval_tok, [c], max_new_tokens=12, batch_size=1)[0] for c in CONVERSATIONS]
    assert batched == single
    assert len(set(batched)) == len(batched) and all(batched)  # real, distinct outputs, not a degenerate model
    assert batched[1] == _greedy_unpadded(model, eval_tok, CONVERSATIONS[1], 12)
    assert batched[4] == _greedy_unpadded(model, eval_tok, CONVERSATIONS[4], 12)


def test_callers_tokenizer_is_left_unchanged(model, eval_tok):
    eval_tok.padding_side = "right"
    pad, eos = eval_tok.pad_token, eval_tok.eos_token
    generate_batch(model, eval_tok, CONVERSATIONS[:3], max_new_tokens=2, batch_size=3)
    assert (eval_tok.padding_side, eval_tok.pad_token, eval_tok.eos_token) == ("right", pad, eos)


def test_order_is_preserved(model, eval_tok):
    out = generate_batch(model, eval_tok, CONVERSATIONS, max_new_tokens=6, batch_size=3)
    perm = [5, 0, 3, 1, 4, 2]
    out_perm = generate_batch(model, eval_tok, [CONVERSATIONS[i] for i in perm], max_new_tokens=6, batch_size=3)
    assert out_perm == [out[i] for i in perm]


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_generation_config_eos_stops_generation(model, eval_tok):
    conv = CONVERSATIONS[2]
    ids = torch.tensor([render_prompt(eval_tok, conv)])
    first = int(model.generate(input_ids=ids, max_new_tokens=1, do_sample=False,
                               pad_token_id=eval_tok.pad_token_id)[0, -1])
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [eval_tok.eos_token_id, first]
    assert eos_token_ids(m, eval_tok) == [eval_tok.eos_token_id, first]
    assert generate_batch(m, eval_tok, [conv, CONVERSATIONS[0]], max_new_tokens=8)[0] == ""


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, eval_tok):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=50, seed=7)
    torch.manual_seed(123)
    a = generate_batch(model, eval_tok, CONVERSATIONS[:3], **kw)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the seeded generation did not consume the caller's stream
    assert generate_batch(model, eval_tok, CONVERSATIONS[:3], **kw) == a


def test_train_mode_is_restored(model, eval_tok):
    model.train()
    try:
        generate_batch(model, eval_tok, CONVERSATIONS[:1], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_stop_strings_cut_the_reply(model, eval_tok):
    full = generate_batch(model, eval_tok, [CONVERSATIONS[3]], max_new_tokens=12)[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = generate_batch(model, eval_tok, [CONVERSATIONS[3]], max_new_tokens=12, stop_strings=[stop])[0]
    assert cut == full[:full.index(stop)].strip()


def test_generate_text(model, eval_tok):
    conv = chat("hello world", system="reverse")
    assert generate_text(model, eval_tok, "hello world", system="reverse", max_new_tokens=6) == \
        generate_batch(model, eval_tok, [conv], max_new_tokens=6)[0]
    assert isinstance(generate_text(model, eval_tok, "the quick brown", raw=True, max_new_tokens=4), str)


def test_missing_chat_template_is_explained(model):
    from tunesmith.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        generate_batch(model, tok, CONVERSATIONS[:1], max_new_tokens=2)


def test_peft_model(eval_tok):
    from peft import LoraConfig, get_peft_model

    from eval_helpers import lively_model

    base = lively_model(eval_tok)
    expected = generate_batch(base, eval_tok, CONVERSATIONS[:3], max_new_tokens=5)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero: the wrapped model must answer exactly as the base did.
    assert generate_batch(lora, eval_tok, CONVERSATIONS[:3], max_new_tokens=5, batch_size=2) == expected


# ---------------------------------------------------------------- one random stream per reply (row_seeds)


def test_a_row_seeded_reply_depends_on_its_prompt_and_seed_alone(model, eval_tok):
    """The same reply whatever batch it was generated in (batch size, neighbours, order) or process: what lets several
    processes sample a GRPO step's answers as one process does. Different seeds give different replies."""
    from tunesmith.evaluate.generate import generate_ids

    prompts = [render_prompt(eval_tok, c) for c in CONVERSATIONS]
    seeds = [101 + 7 * i for i in range(len(prompts))]
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.95, top_k=20)
    together = generate_ids(model, eval_tok, prompts, batch_size=len(prompts), row_seeds=seeds, **kw)
    alone = [generate_ids(model, eval_tok, [p], batch_size=1, row_seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    backwards = generate_ids(model, eval_tok, prompts[::-1], batch_size=2, row_seeds=seeds[::-1], **kw)[::-1]
    assert together == alone == backwards
    other = generate_ids(model, eval_tok, prompts, batch_size=4, row_seeds=[s + 1 for s in seeds], **kw)
    assert other != together
    with pytest.raises(ValueError, match="do_sample"):
        generate_ids(model, eval_tok, prompts, max_new_tokens=2, row_seeds=seeds)


def test_row_seeded_sampling_draws_from_the_warped_distribution():
    """Inverse-CDF sampling with one stream per row samples softmax(scores): token frequencies over 20,000 seeds are within 4.5
    standard errors of the probabilities; top-k's removed tokens are never drawn."""
    from transformers.generation.logits_process import LogitsProcessorList

    from tunesmith.evaluate.generate import RowSeededSampling, sampling_warpers

    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20_000
    sampler = RowSeededSampling(range(n), "cpu")
    picks = sampler(None, scores.expand(n, -1)).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=6).double() / n
    p = torch.softmax(scores[0].double(), dim=-1)
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)

    warped = LogitsProcessorList([*sampling_warpers(0.7, 1.0, 3), RowSeededSampling(range(n), "cpu")])
    picks = warped(None, scores.expand(n, -1).clone()).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=6).double() / n
    p = torch.softmax(scores[0, :3].double() / 0.7, dim=-1)
    assert (freq[3:] == 0).all() and ((freq[:3] - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
