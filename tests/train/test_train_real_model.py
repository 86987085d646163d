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
    assert info["precision"]["name"] == "float32" and 0 < info["trainable_params"] < info["total_params"]
    assert res.comparison["examples"] == 4

    model, tok = models.load_for_inference(str(res.output_dir), device="cpu")
    assert models.is_peft(model)
    reply = generate_text(model, tok, "Convert 3 March 2021 to ISO 8601.", max_new_tokens=12)
    assert isinstance(reply, str) and reply


@pytest.mark.real_model
def test_bf16_mixed_lora_gradients_on_the_builtin_model_are_fp32s_to_bf16_rounding():
    """model.dtype bf16-mixed (auto's choice on a CPU with AMX): the built-in model's base in bf16, products in bf16,
    adapters and loss in fp32, through the kernels. One packed batch of the benchmark's chats: the loss within 1% of the
    fp32 computation and the adapters' gradients within bf16's reach of it (measured: loss 0.5%, gradients 3.5% in
    norm, cosine 0.9996; PEFT under autocast 0.04%, 3.8%, 0.9995)."""
    import torch

    from tunesmith.config import MethodConfig
    from tunesmith.data import collate_packed, load_examples, render_examples
    from tunesmith.train.kernels import apply_kernels
    from tunesmith.train.packing import enable_packing
    from tunesmith.train.steps import Compute, token_loss

    if not models.cpu_has_fast(torch.bfloat16):
        pytest.skip("this CPU has no bf16 matrix units: bf16 is emulated there, hundreds of times slower")
    folder = models.ensure_local("smollm2-135m-instruct")
    tok = models.load_tokenizer(folder)
    data = Path(__file__).resolve().parents[2] / "bench" / "data" / "chat_train.jsonl"
    items = render_examples(load_examples(data), tok, load_config(None, [f"data.train={data}"]).data).items[:4]
    batch = collate_packed(items)

    def loss_and_grad(dtype, autocast):
        model = models.load_model(folder, dtype=dtype, tokenizer=tok)
        torch.manual_seed(1)
        model, _ = models.adapt(model, MethodConfig(name="lora", lora={
            "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
        models.keep_trained_in(model, torch.float32)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(2))
        enable_packing(model)
        apply_kernels(model)
        loss, n, _ = token_loss(model, batch, Compute(True, autocast))
        (loss / n).backward()
        return float(loss) / n, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref_loss, ref = loss_and_grad(torch.float32, None)
    loss, grad = loss_and_grad(torch.bfloat16, torch.bfloat16)
    assert grad.dtype == torch.float32
    assert abs(loss - ref_loss) / ref_loss < 1e-2
    assert float((grad - ref).norm() / ref.norm()) < 0.06
    assert float(torch.nn.functional.cosine_similarity(grad, ref, dim=0)) > 0.999
