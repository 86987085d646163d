"""Reinforcement fine-tuning (objective grpo) on a tiny seeded model: advantages and each loss type against plain
implementations of the papers' formulas, the objective's loss and gradient against the formula on log-probabilities
taken one answer at a time, groups that teach nothing, a run end to end with a reward function, resume, bad input."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tunesmith.config import ConfigError, load_config
from tunesmith.data.errors import DataError
from tunesmith.data.prompts import PromptRow, load_prompt_splits, read_prompt_rows
from tunesmith.objectives.grpo import GRPO, Group, RenderedPrompt
from tunesmith.objectives.grpo_losses import clipped_token_loss, group_advantages, summed_loss
from tunesmith.testing import assert_close_scaled, tiny_model, write_prompt_jsonl
from tunesmith.train import train
from tunesmith.train.packing import enable_packing
from tunesmith.train.steps import Compute

REWARD = "tunesmith.testing:reward_char_overlap"


# ---------------------------------------------------------------- the formulas


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_rewards_relative_to_their_group(scale):
    rewards = [[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [3.0, -1.0, 0.0, 2.0]]
    adv, zero = group_advantages(torch.tensor(rewards, dtype=torch.float64), scale)
    everything = [r for row in rewards for r in row]
    for i, row in enumerate(rewards):
        mean, sd = statistics.fmean(row), statistics.stdev(row)
        div = {"group": sd + 1e-4, "batch": statistics.stdev(everything) + 1e-4, "none": 1.0}[scale]
        want = [0.0] * 4 if sd == 0 else [(r - mean) / div for r in row]
        assert adv[i].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert zero.tolist() == [False, True, False]  # the group that scored alike teaches nothing


def _plain_token_loss(logp, old, adv, lo, hi, ref, beta):
    """The per-token objective written out one token at a time (Shao et al. 2024 eq. 3, with DAPO's two ranges)."""
    out = []
    for t in range(len(logp)):
        ratio = math.exp(logp[t] - old[t])
        surrogate = min(ratio * adv[t], min(max(ratio, 1 - lo), 1 + hi) * adv[t])
        kl = math.exp(ref[t] - logp[t]) - (ref[t] - logp[t]) - 1 if beta else 0.0
        out.append(-surrogate + beta * kl)
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_loss_type_equals_the_formula(loss_type, beta):
    """Old log-probs unlike the new ones, so both clip ranges bite; answers of different lengths; one left out."""
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    logp = (-torch.rand(10, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(10, generator=g, dtype=torch.float64) * 0.4
    ref = logp.detach() + torch.randn(10, generator=g, dtype=torch.float64) * 0.2
    adv_answer = torch.tensor([1.2, -0.7, 0.3, -1.5], dtype=torch.float64)
    weight = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.float64)  # answer 3 cut at the limit
    tok, _, clipped = clipped_token_loss(logp, old, adv_answer[rows], 0.2, 0.28, ref, beta)
    got = summed_loss(tok, rows, weight, 4, loss_type)
    got.backward()

    x = logp.detach().clone().requires_grad_()
    plain = _plain_token_loss(x.tolist(), old.tolist(), adv_answer[rows].tolist(), 0.2, 0.28, ref.tolist(), beta)
    assert tok.detach().tolist() == pytest.approx(plain, rel=1e-12)
    per_token = torch.stack([-torch.minimum(torch.exp(x[t] - old[t]) * adv_answer[rows[t]],
                                            torch.clamp(torch.exp(x[t] - old[t]), 0.8, 1.28) * adv_answer[rows[t]])
                             + (beta * (torch.exp(ref[t] - x[t]) - (ref[t] - x[t]) - 1)) for t in range(10)])
    if loss_type == "grpo":  # each answer's mean over its counted tokens, summed over answers
        want = sum((per_token[rows == a] * weight[rows == a]).sum() / max(1.0, float(weight[rows == a].sum()))
                   for a in range(4))
    else:  # every counted token's loss, summed (the step divides)
        want = (per_token * weight).sum()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    assert_close_scaled(logp.grad, x.grad)
    ratio = torch.exp(logp.detach() - old)
    assert clipped.tolist() == (((ratio < 0.8) & (adv_answer[rows] < 0)) | ((ratio > 1.28) & (adv_answer[rows] > 0))).tolist()
    assert clipped.any()


# ---------------------------------------------------------------- the objective on a model


def _settings(**kw):
    cfg = load_config(None, ["objective.name=grpo", f"objective.grpo.grader={REWARD}",
                             *[f"objective.grpo.{k}={v}" for k, v in kw.items()]])
    return cfg.objective.grpo


def _groups(tok, answers_per_prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for key, lp in enumerate([7, 4]):
        prompt = RenderedPrompt(torch.randint(5, len(tok), (lp,), generator=g).tolist(), PromptRow((), {}, None), key)
        answers = tuple(tuple(torch.randint(5, len(tok), (n,), generator=g).tolist()) for n in (3, 6, 2)[:answers_per_prompt])
        rewards = torch.rand(answers_per_prompt, generator=g, dtype=torch.float64)
        adv, _ = group_advantages(rewards[None], "group")
        out.append(Group(prompt, answers, (True, False, True)[:answers_per_prompt], tuple(rewards.tolist()),
                         tuple(adv[0].tolist()), float(rewards.std()), {}, 0.5))
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("layout", ["prefixed", "packed", "padded"])
def test_the_objectives_loss_is_the_formula_on_each_answers_log_probs(tok, loss_type, layout):
    """GRPO.loss of two groups (each prompt once in the row where prefixed) and its gradient equal the formula on
    log-probabilities taken one answer at a time from full logits; the answer cut at the limit adds nothing."""
    obj = GRPO(_settings(loss_type=loss_type))
    groups = _groups(tok)
    model = tiny_model(tok, seed=3)
    if layout != "padded":
        enable_packing(model)
    loss, stats = obj.loss(model, obj.collate(groups, tok, layout), Compute())
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = torch.zeros(())
    for grp in groups:
        for a, adv, done in zip(grp.answers, grp.advantages, grp.finished):
            ids = torch.tensor([grp.prompt.prompt_ids + list(a)])
            logits = model(input_ids=ids).logits[0, len(grp.prompt.prompt_ids) - 1:-1].float()  # (len(a), V)
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(a)[:, None]).squeeze(1)
            per_token = -torch.exp(logp - logp.detach()) * adv  # ratio 1: the clip never bites
            if done:  # mask_truncated_completions (default): the cut answer is left out
                want = want + (per_token.mean() if loss_type == "grpo" else per_token.sum())
    want.backward()
    assert_close_scaled(loss.detach(), want.detach(), msg="loss")
    for k, p in model.named_parameters():
        assert_close_scaled(got[k], p.grad, msg=k)
    assert obj.weight(groups[0]) == {"grpo": 3, "dapo": 3 + 2, "dr_grpo": 3 * 128}[loss_type]
    figures = obj.per_unit(stats, 1)
    assert figures["reward"] == pytest.approx(sum(sum(g.rewards) for g in groups) / 6, rel=1e-6)
    assert figures["clipped_completions"] == pytest.approx(2 / 6) and figures["clip_ratio"] == 0.0


def test_a_group_that_scored_alike_teaches_nothing(tok):
    obj = GRPO(_settings())
    groups = [Group(g.prompt, g.answers, (True,) * 3, (0.5,) * 3, (0.0,) * 3, 0.0, {}, 0.0) for g in _groups(tok)]
    model = tiny_model(tok, seed=3)
    enable_packing(model)
    loss, stats = obj.loss(model, obj.collate(groups, tok, "prefixed"), Compute())
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(not p.grad.any() for p in model.parameters())
    assert obj.per_unit(stats, 1)["frac_reward_zero_std"] == 1.0
    for _ in range(4):
        assert obj.zero_spread_warning() is None
        obj.per_unit(stats, 1)
    assert "too hard or too easy" in obj.zero_spread_warning()


# ---------------------------------------------------------------- data


def test_prompt_rows_keep_every_field_for_the_grader(tmp_path):
    f = tmp_path / "rft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "meta": {"level": 1}},
        {"prompt": "capital of France?", "answer": "Paris"},  # TRL's prompt-only row
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "hello"},
    ]) + "\n")
    rows, fmt, issues = read_prompt_rows(f)
    assert not issues and fmt == "messages" and len(rows) == 3
    assert rows[0].item["meta"] == {"level": 1} and rows[1].messages[-1].content == "capital of France?"


def test_bad_prompt_rows_are_refused_with_file_line_and_code(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"question": "no prompt field"},
        {"messages": [{"role": "user", "content": "fine"}]},
    ]) + "\n")
    cfg = load_config(None, ["objective.name=grpo", f"objective.grpo.grader={REWARD}", f"data.train={f}",
                             "data.min_examples=1"])
    with pytest.raises(DataError) as e:
        load_prompt_splits(cfg.data, 0)
    codes = {(i.code, i.line) for i in e.value.issues}
    assert codes == {("E036", 1), ("E035", 2)}


@pytest.mark.parametrize("overrides,says", [
    (["objective.name=grpo"], "needs a grader"),
    (["objective.name=grpo", f"objective.grpo.grader={REWARD}", "data.format=preference"], "data.format to auto"),
    (["objective.name=grpo", f"objective.grpo.grader={REWARD}", "method.name=full", "distributed.strategy=fsdp"],
     "distributed.strategy=ddp"),
])
def test_a_grpo_setting_that_cannot_work_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)


# ---------------------------------------------------------------- through train()


def _cfg(tmp_path, model_dir, *overrides, name="run"):
    train_f = write_prompt_jsonl(tmp_path / "train.jsonl", 12, seed=0)
    valid_f = write_prompt_jsonl(tmp_path / "valid.jsonl", 6, seed=1)
    base = [f"model.name={model_dir}", f"data.train={train_f}", f"data.valid={valid_f}", f"output_dir={tmp_path / name}",
            "objective.name=grpo", f"objective.grpo.grader={REWARD}", "objective.grpo.num_generations=4",
            "objective.grpo.max_completion_length=6", "objective.grpo.temperature=1.0", "data.max_length=48",
            # the tiny random model seldom ends an answer within 6 tokens: keep cut answers in the loss so it trains
            "objective.grpo.mask_truncated_completions=false",
            "train.batch_size=2", "train.max_steps=4", "train.lr=5e-3", "train.warmup_steps=0", "eval.every_steps=2",
            "eval.samples=2", "eval.compare_examples=4", "eval.metric_examples=0", "method.lora.r=4",
            "method.lora.dropout=0.0", "checkpoint.every_steps=2"]
    return load_config(None, base + list(overrides))


def _events(run_dir, kind):
    return [e for e in map(json.loads, open(Path(run_dir) / "metrics.jsonl")) if e["kind"] == kind]


def test_a_grpo_run_samples_grades_and_reports(tmp_path, tiny_model_dir):
    res = train(_cfg(tmp_path, tiny_model_dir), quiet=True)
    assert res.status == "completed"
    steps = _events(res.output_dir, "train")
    assert len(steps) == 4 and all(s["stats"]["reward_std"] > 0 and s["grad_norm"] > 0 for s in steps)  # it trains
    for s in steps:
        st = s["stats"]
        assert {"reward", "reward_std", "frac_reward_zero_std", "completion_length", "clipped_completions",
                "clip_ratio", "generation_s", "entropy"} <= set(st)
        assert 0 <= st["frac_reward_zero_std"] <= 1 and 1 <= st["completion_length"] <= 6
        assert 0 < st["entropy"] <= math.log(len(tok_vocab(tiny_model_dir)))  # nats, at most uniform's
    evals = _events(res.output_dir, "eval")
    assert evals and evals[-1]["val_loss"] == pytest.approx(-evals[-1]["stats"]["reward"])
    assert math.isfinite(evals[-1]["stats"]["reward_sampled"]) and evals[-1]["stats"]["reward_sampled"] <= 1
    samples = evals[-1]["samples"]  # the held-out answers with their grades
    assert len(samples) == 2 and all({"prompt", "output", "grade"} <= set(s) for s in samples)
    compare = json.loads((res.output_dir / "compare.json").read_text())["reinforcement"]
    assert compare["prompts"] == 4 and compare["ci_low"] <= compare["diff"] <= compare["ci_high"]
    report = (res.output_dir / "report.html").read_text()
    assert "rewards over time" in report and "sampled answers: length, cut share and entropy" in report
    assert "<th>grade</th>" in report and "None held-out" not in report


def tok_vocab(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).get_vocab()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_kl_to_the_starting_model(tmp_path, tiny_model_dir, method):
    """beta > 0: the reference is the LoRA model with its adapters off, or (full) a frozen copy of the starting model;
    at step 1 the policy is the reference, so the KL is exactly 0; it grows once the policy has moved."""
    res = train(_cfg(tmp_path, tiny_model_dir, f"method.name={method}", "objective.grpo.beta=0.1", "train.lr=2e-2"),
                quiet=True)
    kls = [e["stats"]["kl"] for e in _events(res.output_dir, "train")]
    assert kls[0] == 0.0 and kls[-1] > 0.0


def test_a_resumed_grpo_run_samples_and_trains_as_the_uninterrupted_one(tmp_path, tiny_model_dir):
    """The answers of a step are sampled with a seed of (run seed, step): stopped after step 2 and resumed, the run
    logs the rewards and losses of a run never stopped, bit for bit."""
    whole = train(_cfg(tmp_path, tiny_model_dir, name="whole"), quiet=True)
    polls = []
    stopped = train(_cfg(tmp_path, tiny_model_dir, name="parts"), quiet=True,
                    stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    assert stopped.status == "interrupted" and stopped.steps == 2
    resumed = train(_cfg(tmp_path, tiny_model_dir, name="parts"), resume=True, quiet=True)
    a, b = _events(whole.output_dir, "train"), _events(resumed.output_dir, "train")
    assert [(e["loss"], e["stats"]["reward"]) for e in a] == [(e["loss"], e["stats"]["reward"]) for e in b]
    assert [e["val_loss"] for e in _events(whole.output_dir, "eval")] == \
        [e["val_loss"] for e in _events(resumed.output_dir, "eval")]


def test_the_quick_path_and_check(tmp_path, tiny_model_dir):
    """`tunesmith train --objective grpo --data prompts.jsonl --grader grader.json --method lora --max-steps N --out
    DIR`, every other value its default; `tunesmith check` on the same files; a bad grader stops both with exit 2."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "tunesmith"
    data = write_prompt_jsonl(tmp_path / "prompts.jsonl", 20, seed=0)
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps({"type": "text_similarity", "name": "overlap", "evaluation_metric": "fuzzy_match",
                                  "input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}"}))
    out = tmp_path / "quick"
    proc = subprocess.run([str(exe), "train", "--objective", "grpo", "--data", str(data), "--grader", str(grader),
                           "--model", str(tiny_model_dir), "--method", "lora", "--max-steps", "2", "--out", str(out),
                           "--set", "objective.grpo.max_completion_length=8", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out grade" in proc.stdout + proc.stderr
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "report.html").is_file()
    assert "rewards over time" in (out / "report.html").read_text()
    check = [str(exe), "check", "--data", str(data), "--model", str(tiny_model_dir), "--set", "objective.name=grpo"]
    proc = subprocess.run(check + ["--set", f"objective.grpo.grader={grader}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "grader: text_similarity 'overlap'" in proc.stdout, proc.stdout + proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "string_check", "name": "x", "operation": "startswith",
                               "input": "{{sample.output_text}}", "reference": "a"}))
    proc = subprocess.run(check + ["--set", f"objective.grpo.grader={bad}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "operation" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([str(exe), "train", "--objective", "grpo", "--data", str(data), "--grader", str(bad),
                           "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "objective.grpo.grader" in proc.stderr, proc.stderr[-2000:]
