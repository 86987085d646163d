"""On a CUDA GPU (``make test-gpu``; skipped elsewhere): the kernels' equality with the plain computation in fp32 and in
bf16 mixed precision, and short training runs on the tiny and the built-in model in bf16.

None of this has run on a GPU yet (README "Tests on every machine" lists the code paths that never have): it is the
prepared check for when one is lent, sized to a few minutes together with the GPU benchmark.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import examples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def _lora(tok, device):
    from tunesmith.config import MethodConfig
    from tunesmith.models import adapt
    from tunesmith.testing import tiny_model

    model, _ = adapt(tiny_model(tok, seed=2), MethodConfig(name="lora", lora={"r": 4, "dropout": 0.0}))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(device)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_kernels_equal_the_plain_computation_on_cuda(tok, bf16):
    from tunesmith.data import collate_packed
    from tunesmith.testing import assert_close_scaled
    from tunesmith.train.kernels import apply_kernels
    from tunesmith.train.packing import enable_packing
    from tunesmith.train.steps import Compute, token_loss

    batch = {k: v.cuda() for k, v in collate_packed(examples(tok, [9, 14, 6])).items()}
    results = []
    for kernels in ("auto", "off"):
        model = _lora(tok, "cuda")
        if bf16:
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.bfloat16()
        enable_packing(model)
        apply_kernels(model, kernels)
        loss, n, _ = token_loss(model, batch, Compute(kernels == "auto", torch.bfloat16 if bf16 else None))
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    rtol = 1e-2 if bf16 else None
    assert_close_scaled(la, lb, rtol)
    assert ga.keys() == gb.keys() and ga
    if not bf16:  # in bf16 the tiny random model's gradients are sums of cancelling terms: the CPU test compares cosines
        for k in ga:
            assert_close_scaled(ga[k], gb[k], msg=k)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_short_run_on_cuda_in_bf16_mixed(tmp_path, tiny_model_dir, tiny_data, method):
    from tunesmith.config import load_config
    from tunesmith.train import train

    train_f, valid_f = tiny_data
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                             f"output_dir={tmp_path / 'run'}", "data.max_length=64", "train.batch_size=4",
                             "train.max_steps=4", "train.lr=1e-3", "eval.every_steps=2", "eval.samples=1",
                             "eval.compare_examples=4", f"method.name={method}", "model.dtype=auto"])
    res = train(cfg, quiet=True)
    assert res.status == "completed" and res.steps == 4
    info = json.loads((res.output_dir / "run.json").read_text())
    assert info["hardware"]["device"].startswith("cuda") and info["precision"]["name"] == "bf16-mixed"
    losses = [json.loads(x)["loss"] for x in open(res.output_dir / "metrics.jsonl") if '"kind": "train"' in x]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.real_model
def test_the_builtin_model_trains_on_cuda(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.train import train

    example = Path(__file__).resolve().parents[2] / "examples" / "iso_dates" / "config.yaml"
    cfg = load_config(example, [f"output_dir={tmp_path / 'run'}", "model.dtype=auto", "train.max_steps=6",
                                "eval.every_steps=6", "eval.compare_examples=8"])
    res = train(cfg, quiet=True)
    assert res.status == "completed" and res.comparison is not None
