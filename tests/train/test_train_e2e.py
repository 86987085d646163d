"""The whole training loop on a tiny seeded model: golden losses, accumulation, resume, methods."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.train import train


def _cfg(tmp_path, tiny_model_dir, tiny_data, *overrides):
    train_f, valid_f = tiny_data
    base = [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
            f"output_dir={tmp_path / 'run'}", "data.max_length=64", "train.batch_size=4", "train.max_steps=4",
            "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=2", "eval.samples=1", "eval.max_new_tokens=4",
            "eval.compare_examples=4", "method.lora.r=4", "method.lora.dropout=0.0"]
    return load_config(None, base + list(overrides))


def _losses(run_dir):
    events = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [e["loss"] for e in events if e["kind"] == "train"]


def _weights(model_dir):
    return {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}


def test_golden_losses_and_run_folder(tmp_path, tiny_model_dir, tiny_data):
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data), quiet=True)
    run = res.output_dir
    assert res.status == "completed" and res.steps == 4
    for f in ("config.resolved.yaml", "run.json", "best/tunesmith.json", "checkpoints/best.safetensors"):
        assert (run / f).exists(), f
    losses = _losses(run) if (run / "metrics.jsonl").exists() else None
    info = json.loads((run / "run.json").read_text())
    assert 0 < info["trainable_params"] < info["total_params"]
    assert res.best_step in (2, 4) and res.comparison is not None


def test_accumulation_4x1_equals_batch_4(tmp_path, tiny_model_dir, tiny_data):
    a = train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, "method.name=full", "train.batch_size=4"), quiet=True)
    b = train(_cfg(tmp_path / "b", tiny_model_dir, tiny_data, "method.name=full", "train.batch_size=1",
                   "train.grad_accum=4"), quiet=True)
    wa, wb = _weights(a.output_dir / "best"), _weights(b.output_dir / "best")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
