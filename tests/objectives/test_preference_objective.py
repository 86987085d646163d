"""Preference tuning through the one training loop, on a tiny seeded model: the loss at step 0, each loss type against
its formula on the model's own log-probabilities, the reference model (adapters off, a named copy, the disk cache),
packing, resume, the quick path and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from tunesmith.config import load_config
from tunesmith.data import IGNORE, preference
from tunesmith.objectives import for_config
from tunesmith.objectives.preference import Preference, ScoredPair, _reference_logps, pair_logps
from tunesmith.testing import assert_close_scaled, save_tiny_model, tiny_model, write_pair_jsonl
from tunesmith.train import train
from tunesmith.train.packing import enable_packing
from tunesmith.train.steps import Compute

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_pair_jsonl(d / "train.jsonl", 16, seed=0), write_pair_jsonl(d / "valid.jsonl", 8, seed=1)


def _cfg(tmp_path, model_dir, pairs, *overrides, name="run"):
    train_f, valid_f = pairs
    base = [f"model.name={model_dir}", f"data.train={train_f}", f"data.valid={valid_f}", f"output_dir={tmp_path / name}",
            "objective.name=dpo", "data.max_length=64", "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2",
            "train.warmup_steps=1", "eval.every_steps=2", "eval.samples=1", "eval.max_new_tokens=4",
            "eval.compare_examples=4", "eval.metric_examples=0", "method.lora.r=4", "method.lora.dropout=0.0"]
    return load_config(None, base + list(overrides))


def _events(run_dir, kind):
    return [e for e in map(json.loads, open(Path(run_dir) / "metrics.jsonl")) if e["kind"] == kind]


def _items(tok, path, cfg) -> list[ScoredPair]:
    records = preference.read_preferences(path)
    return [ScoredPair(p) for p in preference.render_pairs(records, tok, cfg.data).items]


# ---------------------------------------------------------------- through train()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_dpo_loss_is_ln2_at_step_0_and_falls(tmp_path, tiny_model_dir, pairs, method):
    """Step 1 runs at lr 0 (one warmup step) with the policy equal to its reference: every pair's loss is -log
    sigmoid(0) = ln 2 and every reward 0. The reference is the starting model whether it is the LoRA model with its
    adapters off or the full model's log-probabilities taken before the first step."""
    res = train(_cfg(tmp_path, tiny_model_dir, pairs, f"method.name={method}"), quiet=True)
    steps = _events(res.output_dir, "train")
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert steps[0]["stats"]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["stats"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < LN2 - 0.005 and steps[-1]["stats"]["rewards/margins"] > 0  # it learns the preference
    evals = _events(res.output_dir, "eval")
    assert evals and evals[-1]["perplexity"] is None and "rewards/accuracy" in evals[-1]["stats"]
    compare = json.loads((res.output_dir / "compare.json").read_text())
    assert compare["preference"]["pairs"] == 4 and 0 <= compare["preference"]["tuned_accuracy"] <= 1


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_train(tmp_path, tiny_model_dir, pairs, objective):
    res = train(_cfg(tmp_path, tiny_model_dir, pairs, f"objective.name={objective}"), quiet=True)
    losses = [e["loss"] for e in _events(res.output_dir, "train")]
    assert res.status == "completed" and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_resume_is_bit_exact(tmp_path, tiny_model_dir, pairs):
    """Stopped after step 2 and resumed, a DPO run logs the losses of a run never stopped, bit for bit: the reference
    log-probabilities come back from the cache, the data position and RNG from the checkpoint."""
    whole = train(_cfg(tmp_path, tiny_model_dir, pairs, name="whole"), quiet=True)
    polls = []
    stopped = train(_cfg(tmp_path, tiny_model_dir, pairs, name="parts"), quiet=True,
                    stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    assert stopped.status == "interrupted" and stopped.steps == 2
    parts = train(_cfg(tmp_path, tiny_model_dir, pairs, name="parts"), resume=True, quiet=True)
    assert [e["loss"] for e in _events(parts.output_dir, "train")] == [e["loss"] for e in _events(whole.output_dir, "train")]
    assert [e["val_loss"] for e in _events(parts.output_dir, "eval")] == \
        [e["val_loss"] for e in _events(whole.output_dir, "eval")]


def test_a_bad_pair_file_stops_before_the_model_loads(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) + "\n"
                   + json.dumps({"prompt": "hi", "chosen": "a", "rejected": ""}) + "\n")
    from tunesmith.cli import main

    rc = main(["train", "--objective", "dpo", "--data", str(bad), "--model", str(tiny_model_dir),
               "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_quick_path(tmp_path, tiny_model_dir, pairs):
    """`tunesmith train --objective dpo --data pairs.jsonl --method lora --epochs 1 --out DIR`, every other value its
    default: the command a new user types."""
    exe = Path(sys.executable).parent / "tunesmith"
    out = tmp_path / "quick"
    proc = subprocess.run([str(exe), "train", "--objective", "dpo", "--data", str(pairs[0]), "--valid", str(pairs[1]),
                           "--model", str(tiny_model_dir), "--method", "lora", "--epochs", "1", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preference accuracy" in proc.stdout + proc.stderr
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "report.html").is_file()


# ---------------------------------------------------------------- the loss on the model's own log-probabilities


def _plain_logps(model, seqs):
    """Summed answer log-probabilities and answer lengths, one sequence at a time through the model's full logits."""
    sums, counts = [], []
    for ex in seqs:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
        labels = torch.tensor(ex.labels[1:])
        mask = labels != IGNORE
        logp = torch.log_softmax(logits, -1)[mask].gather(1, labels[mask][:, None]).squeeze(1)
        sums.append(logp.sum())
        counts.append(float(mask.sum()))
    return torch.stack(sums), torch.tensor(counts)


def _formula(name, settings, pc, pr, rc, rr, nc, nr):
    """Each objective's per-pair loss from its paper (see objectives/preference_losses.py for the citations)."""
    b = settings.beta
    h = (pc - rc) - (pr - rr)
    if name == "orpo":  # Hong et al. 2024: NLL of chosen + beta * -log sigmoid(log odds ratio)
        mc, mr = pc / nc, pr / nr
        odds = (mc - torch.log(-torch.expm1(mc))) - (mr - torch.log(-torch.expm1(mr)))
        return -mc - b * F.logsigmoid(odds)
    if name == "simpo":  # Meng et al. 2024
        return -F.logsigmoid(b * (pc / nc - pr / nr) - settings.gamma)
    t, eps = settings.loss_type, settings.label_smoothing
    if t == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h)
    elif t == "robust":
        loss = (-(1 - eps) * F.logsigmoid(b * h) + eps * F.logsigmoid(-b * h)) / (1 - 2 * eps)
    elif t == "hinge":
        loss = torch.relu(1 - b * h)
    else:  # ipo, log-ratios averaged over answer tokens (as TRL)
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * b)) ** 2
    return loss + (settings.rpo_alpha or 0.0) * (-pc / nc)


CASES = [("dpo", {}), ("dpo", {"loss_type": "ipo", "beta": 0.5}), ("dpo", {"loss_type": "hinge"}),
         ("dpo", {"loss_type": "robust", "label_smoothing": 0.2}), ("dpo", {"label_smoothing": 0.1}),
         ("dpo", {"rpo_alpha": 0.7}), ("orpo", {}), ("simpo", {"gamma": 0.3})]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(map(str, s.values())) or 'default'}"
                                                    for n, s in CASES])
@pytest.mark.parametrize("layout", ["prefixed", "packed", "padded"])
def test_each_loss_equals_its_formula_on_the_models_log_probabilities(tok, tiny_model_dir, pairs, name, settings,
                                                                       layout):
    """The objective's summed loss and its gradient (prefixed: each pair's prompt once, then chosen, then rejected
    seeing the prompt only; packed: every chosen and rejected sequence in one row, attention kept inside each; padded:
    one row each) equal the paper's formula applied to log-probabilities taken one sequence at a time from full logits,
    at fp32 rounding of their scale."""
    cfg = _cfg(Path("/unused"), tiny_model_dir, pairs, f"objective.name={name}",
               *[f"objective.{name}.{k}={v}" for k, v in settings.items()])
    obj = for_config(cfg)
    torch.manual_seed(0)
    ref = tiny_model(tok, seed=9)  # a reference unlike the policy, so the log-ratios are not 0
    items = _items(tok, pairs[0], cfg)[:4]
    with torch.no_grad():
        rc, rr = _plain_logps(ref, [i.pair.chosen for i in items])[0], _plain_logps(ref, [i.pair.rejected for i in items])[0]
    items = [ScoredPair(i.pair, float(c), float(r)) for i, c, r in zip(items, rc, rr)]

    model = tiny_model(tok, seed=3)
    if layout != "padded":
        enable_packing(model)
    loss, stats = obj.loss(model, obj.collate(items, tok, layout), Compute())
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    pc, nc = _plain_logps(model, [i.pair.chosen for i in items])
    pr, nr = _plain_logps(model, [i.pair.rejected for i in items])
    want = _formula(name, getattr(cfg.objective, name), pc, pr, rc, rr, nc, nr).sum()
    want.backward()
    assert_close_scaled(loss.detach(), want.detach(), msg="loss")
    for k, p in model.named_parameters():
        assert_close_scaled(got[k], p.grad, msg=k)
    assert stats["rewards/accuracy"] in {0.0, 1.0, 2.0, 3.0, 4.0}  # a sum over the 4 pairs, divided by the loop


# ---------------------------------------------------------------- the reference model


def _dpo(tmp_path, tiny_model_dir, pairs, *overrides):
    cfg = _cfg(tmp_path, tiny_model_dir, pairs, *overrides)
    return cfg, for_config(cfg)


@pytest.fixture
def moved_lora(tok):
    """The tiny model (seed 2) with LoRA whose B matrices are non-zero, as after some training."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from train_helpers import lora_model

    return lora_model(tok, seed=2)


def test_adapters_off_reference_equals_the_base_loaded_separately(tmp_path, tok, pairs, moved_lora):
    """A LoRA model whose adapters have moved: its reference log-probabilities with the adapters switched off equal
    those of the base model loaded on its own (``objective.dpo.reference_model``), and differ from the adapted
    model's own."""
    base_dir = save_tiny_model(tmp_path / "base", seed=2)  # the weights lora_model(seed=2) adapted
    cfg, obj = _dpo(tmp_path, base_dir, pairs)
    items = _items(tok, pairs[1], cfg)
    acc = Accelerator(cpu=True)
    off = _reference_logps(obj, moved_lora, None, None, items, tok, cfg, acc, Compute())
    copy = _reference_logps(obj, moved_lora, str(base_dir), base_dir, items, tok, cfg, acc, Compute())
    assert_close_scaled(torch.tensor(off), torch.tensor(copy), msg="reference log-probs")
    batch = Preference("orpo", None).collate(items, tok, "padded")  # orpo: no reference needed to collate
    pc, _, _, _ = pair_logps(moved_lora, batch, Compute())  # the adapted model itself
    assert (pc - torch.tensor([c for c, _ in off])).abs().max() > 1e-3


def test_cached_reference_log_probabilities_equal_computed_ones(tmp_path, tok, tiny_model_dir, pairs, monkeypatch):
    """prepare() computes the reference once per model + data + precision and reads it back bit for bit after."""
    from tunesmith.objectives import preference as pref_mod

    monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(tmp_path / "cache"))  # none of the other tests' entries
    cfg, obj = _dpo(tmp_path, tiny_model_dir, pairs)
    items = {"train": _items(tok, pairs[0], cfg), "valid": _items(tok, pairs[1], cfg)}
    model = tiny_model(tok)
    acc = Accelerator(cpu=True)
    calls = []
    real = pref_mod._reference_logps
    monkeypatch.setattr(pref_mod, "_reference_logps", lambda *a: calls.append(1) or real(*a))
    first = obj.prepare(model, items, tok, cfg, tiny_model_dir, acc, Compute(), lambda e: None, "float32")
    second = obj.prepare(model, items, tok, cfg, tiny_model_dir, acc, Compute(), lambda e: None, "float32")
    assert len(calls) == 1
    flat = lambda d: [(i.ref_chosen, i.ref_rejected) for s in d.values() for i in s]  # noqa: E731
    assert flat(first) == flat(second) and all(c is not None for c, _ in flat(first))
    fresh = real(obj, model, None, None, [i for s in items.values() for i in s], tok, cfg, acc, Compute())
    assert flat(first) == [tuple(v) for v in fresh]
    obj.prepare(model, items, tok, cfg, tiny_model_dir, acc, Compute(), lambda e: None, "bf16-mixed")
    assert len(calls) == 2  # another precision is another cache entry


# ---------------------------------------------------------------- kto, eval, sweep


def test_kto_trains_on_pairs_split_into_labelled_answers(tmp_path, tiny_model_dir, pairs):
    """KTO's loss at step 0 is 1 - sigmoid(0) = 0.5 for every answer (policy = reference, z0 = 0); its figures are the
    rewards of the desirable and the undesirable answers, each averaged over its own kind."""
    res = train(_cfg(tmp_path, tiny_model_dir, pairs, "objective.name=kto"), quiet=True)
    steps = _events(res.output_dir, "train")
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6) and res.status == "completed"
    assert set(steps[0]["stats"]) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"}
    kto = json.loads((res.output_dir / "compare.json").read_text())["kto"]
    assert kto["examples"] == 4 and math.isfinite(kto["tuned_separation"])


def test_eval_on_a_pair_file_gives_preference_accuracy_base_against_tuned(tmp_path, tiny_model_dir, pairs, capsys):
    from tunesmith.cli import main

    res = train(_cfg(tmp_path, tiny_model_dir, pairs), quiet=True)
    capsys.readouterr()
    assert main(["eval", str(res.output_dir), "--data", str(pairs[1]), "--json", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    pref = result["preference"]
    assert pref["pairs"] == 8 and 0 <= pref["base_accuracy"] <= 1 and pref["ci_low"] <= pref["diff"] <= pref["ci_high"]
    assert "skipped" not in result and result["comparison"]["n"] == 8  # the chosen answers are the references


def test_the_sweep_can_optimise_a_preference_figure(tmp_path, tiny_model_dir, pairs):
    from tunesmith.sweep.runner import metric_value
    from tunesmith.events import EvalEnd

    event = EvalEnd(2, 0.5, 0.6, None, None, 8, True, stats={"rewards/accuracy": 0.75})
    assert metric_value(event, "rewards/accuracy") == 0.75 and metric_value(event, "val_loss") == 0.6
    assert metric_value(event, "perplexity") is None


def test_the_safety_gate_and_export_work_on_a_dpo_run(tmp_path, tiny_model_dir, pairs):
    from tunesmith.cli import main

    cfg = _cfg(tmp_path, tiny_model_dir, pairs, "safety.gate=true", "safety.probe_limit=4",
               "safety.probe_max_new_tokens=8", "safety.probe_batch_size=8")
    res = train(cfg, quiet=True)
    gate = json.loads((res.output_dir / "safety.json").read_text())
    assert "base" in gate and "tuned" in gate
    assert main(["export", str(res.output_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert any((tmp_path / "hf").glob("*.safetensors"))


@pytest.mark.parametrize("overrides,says", [
    (["data.format=preference"], "objective.name to dpo"),
    (["objective.name=dpo", "data.format=messages"], "set data.format to preference"),
    (["objective.name=simpo", "data.format=unpaired"], "use objective kto"),
    (["objective.name=dpo", "train.augment.prompt_noise=0.1"], "train.augment rewrites supervised examples"),
])
def test_a_format_or_setting_the_objective_cannot_use_is_refused_with_the_fix(overrides, says):
    from tunesmith.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
