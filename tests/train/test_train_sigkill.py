"""Bit-exact resume after SIGKILL: a `tunesmith train` process is killed at seeded random points (in the middle
of an epoch, between the micro-batches of one accumulated step, at a step boundary, and inside each phase
of a checkpoint write), resumed with --resume until it completes, and must give the per-step losses,
validation losses, final checkpoint (weights and optimizer state) and delivered model of an uninterrupted
run, to the bit (fp32, CPU, tiny model), for LoRA, freeze and full fine-tuning.

10 kills in all (4 LoRA, 3 freeze, 3 full). The first LoRA process is a fresh interpreter (what a user runs);
the others are forked from the test process to skip the 5-20 s import of torch and transformers
(fault_hooks.py); a kill is a kill either way.
"""

import json
import random
import signal

import pytest
import torch
from fault_hooks import Child, base_settings, write_config
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import train

TOTAL, ACCUM = 10, 2  # 32 examples / (2 x 2) = 8 steps per epoch: the run crosses an epoch boundary
# (method, checkpoint every N steps, the kind of each kill point): every checkpoint phase is hit once
PLANS = [
    ("lora", 2, ["accum", "ckpt:manifest", "step", "ckpt:renamed"]),
    ("freeze", 2, ["ckpt:weights", "accum", "step"]),
    ("full", 1, ["micro", "ckpt:optimizer", "accum"]),
]


def _settings(tiny_model_dir, tiny_data, out, method, every):
    extra = {"method.name": method, "train.batch_size": 2, "train.grad_accum": ACCUM, "train.max_steps": TOTAL,
             "eval.every_steps": 3, "checkpoint.every_steps": every, "checkpoint.keep_last": 2,
             "method.lora.dropout": 0.1, "model.dropout": 0.1}  # dropout: the RNG state must resume too
    if method == "freeze":
        extra["method.freeze.train_last_layers"] = 1
    return base_settings(tiny_model_dir, tiny_data, out, **extra)


def _site(kind: str, rng: random.Random, start: int, every: int) -> str:
    """A random kill point reachable by a process that resumes after step ``start``."""
    remaining = TOTAL - start
    if kind == "micro":
        return f"micro:{rng.randint(1, remaining * ACCUM)}"
    if kind == "accum":  # before the second micro-batch of a step: the first one's gradients are accumulated
        return f"micro:{ACCUM * rng.randint(1, remaining)}"
    if kind == "step":
        return f"step:{rng.randint(1, remaining)}"
    saves = sum(1 for s in range(start + 1, TOTAL + 1) if s % every == 0 or s == TOTAL)
    return f"ckpt:{rng.randint(1, saves)}:{kind.split(':')[1]}"  # kind is ckpt:PHASE


def _events(run, kind):
    return [e for e in map(json.loads, open(run / "metrics.jsonl")) if e["kind"] == kind]


def _model_tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("method, every, kinds", PLANS, ids=[p[0] for p in PLANS])
def test_killed_run_resumes_bit_exact(tmp_path, tiny_model_dir, tiny_data, method, every, kinds):
    ref = train(load_config(write_config(tmp_path / "ref.yaml", _settings(tiny_model_dir, tiny_data,
                                                                           tmp_path / "ref", method, every))), quiet=True)
    assert ref.status == "completed"

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", _settings(tiny_model_dir, tiny_data, run, method, every))
    rng = random.Random(f"sigkill-{method}")
    sites = []
    for i, kind in enumerate(kinds):
        latest = ckpt.latest_checkpoint(run / "checkpoints")
        start = ckpt.checkpoint_step(latest) if latest else 0
        site = _site(kind, rng, start, every)
        sites.append((start, site))
        argv = ["train", str(cfg), "--quiet"] + (["--resume"] if i else [])
        child = Child(argv, site, tmp_path / "procs", mode="spawn" if i == 0 and method == "lora" else "fork")
        assert child.wait_marker(), f"{site} not reached (from step {start}):\n{child.output()}"
        assert child.kill() == -signal.SIGKILL
        # a checkpoint is complete or absent: every step-* folder verifies, whatever the kill interrupted
        for p in ckpt.list_checkpoints(run / "checkpoints"):
            assert ckpt.verify_checkpoint(p) is None, (site, p)
    final = Child(["train", str(cfg), "--quiet", "--resume"], "none", tmp_path / "procs", mode="fork")
    assert final.wait() == 0, final.output()

    # per-step losses: each step logged once (metrics.jsonl was cut back at each resume), equal to the bit
    train_events = _events(run, "train")
    assert [e["step"] for e in train_events] == list(range(1, TOTAL + 1)), sites
    assert [(e["step"], e["loss"], e["lr"]) for e in train_events] == \
           [(e["step"], e["loss"], e["lr"]) for e in _events(ref.output_dir, "train")], sites
    assert [(e["step"], e["val_loss"]) for e in _events(run, "eval")] == \
           [(e["step"], e["val_loss"]) for e in _events(ref.output_dir, "eval")], sites
    # final weights and optimizer state, and the delivered model
    last = f"checkpoints/step-{TOTAL:06d}"
    for f in ("trainable.safetensors", "optimizer.safetensors"):
        _assert_same_tensors(load_file(run / last / f), load_file(ref.output_dir / last / f), f"{f} {sites}")
    _assert_same_tensors(_model_tensors(run / "best"), _model_tensors(ref.output_dir / "best"), f"best/ {sites}")
    state = json.loads((run / last / "state.json").read_text())
    assert state["rng"] == json.loads((ref.output_dir / last / "state.json").read_text())["rng"]
    print(method, "kills (resumed from step, site):", sites)
