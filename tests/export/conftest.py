"""Run folders to export, built in memory from the tiny seeded model (no training needed).

A LoRA run's adapter gets random B matrices (PEFT initialises B to zero, which would make the merge
a no-op and every comparison trivially equal).
"""

import pytest
import torch


def _run_folder(root, model, tok, base_ref, method):
    from tunesmith import models

    models.save_model(model, tok, root / "best", base_ref=str(base_ref), method=method)
    (root / "config.resolved.yaml").write_text(f"# a test run\nmethod:\n  name: {method}\n")
    return root


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tunesmith.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base):
    from tunesmith import models
    from tunesmith.config import MethodConfig

    tok = models.load_tokenizer(tiny_base)
    model, _ = models.adapt(models.load_model(tiny_base, dtype=torch.float32, tokenizer=tok), MethodConfig(name="lora"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return _run_folder(tmp_path_factory.mktemp("lora-run"), model, tok, tiny_base, "lora")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_base):
    """A full-fine-tuning run whose saved generation config stops only at <|endoftext|>, not at <|im_end|>."""
    from tunesmith import models

    tok = models.load_tokenizer(tiny_base)
    model = models.load_model(tiny_base, dtype=torch.float32, tokenizer=tok)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # "trained": differs from the base
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    return _run_folder(tmp_path_factory.mktemp("full-run"), model, tok, tiny_base, "full")

