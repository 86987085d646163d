"""The one training test on the real built-in model: load it, train two LoRA steps, generate from the run."""

import json
import math
from pathlib import Path

import pytest

from tunesmith import models
from tunesmith.config import load_config
from tunesmith.evaluate import generate_text
from tunesmith.train import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iso_dates"


@pytest.mark.real_model
def test_two_lora_steps_on_the_builtin_model(tmp_path):
    cfg = load_config(EXAMPLE / "config.yaml", [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.log_every=1",
        "eval.every_steps=2", "eval.max_batches=1", "eval.samples=1", "eval.max_new_tokens=12",
        "eval.compare_examples=4"])
    res = train(cfg, quiet=True)
    assert res.status == "completed" and res.steps == 2
    events = [json.loads(line) for line in open(res.output_dir / "metrics.jsonl")]
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < 20 for x in losses)
    info = json.loads((res.output_dir / "run.json").read_text())
    assert info["hardware"]["dtype"] == "torch.float32" and 0 < info["trainable_params"] < info["total_params"]
    assert res.comparison["examples"] == 4

    model, tok = models.load_for_inference(str(res.output_dir), device="cpu")
    assert models.is_peft(model)
    reply = generate_text(model, tok, "Convert 3 March 2021 to ISO 8601.", max_new_tokens=12)
    assert isinstance(reply, str) and reply
