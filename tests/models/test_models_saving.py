import json
import os

import pytest
import torch
from models_helpers import logits, train_steps

from tunesmith import models
from tunesmith.config import FreezeConfig, LoraConfig, MethodConfig
from tunesmith.models import ModelError


def _trained(tiny_model_dir, method: MethodConfig):
    tok = models.load_tokenizer(tiny_model_dir)
    model, _ = models.adapt(models.load_model(tiny_model_dir, dtype=torch.float32, tokenizer=tok), method)
    train_steps(model, tok, steps=2, lr=5e-2)
    return model, tok


def test_lora_round_trip_gives_identical_logits(tmp_path, tiny_model_dir):
    model, tok = _trained(tiny_model_dir, MethodConfig(name="lora", lora=LoraConfig(r=4, dropout=0.1)))
    out = models.save_model(model, tok, tmp_path / "out", base_ref=str(tiny_model_dir), method="lora")
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tunesmith.json"} <= files
    assert "model.safetensors" not in files  # only the adapter is stored
    manifest = json.loads((out / "tunesmith.json").read_text())
    assert manifest["base_model"] == str(tiny_model_dir) and manifest["method"] == "lora"
    loaded, tok2 = models.load_for_inference(out, device="cpu")
    assert models.is_peft(loaded) and not loaded.training
    assert torch.equal(logits(loaded, tok2), logits(model, tok))
    with loaded.disable_adapter():  # the adapter really changes the output
        assert not torch.equal(logits(loaded, tok2), logits(model, tok))


@pytest.mark.parametrize("method", [MethodConfig(name="full"),
                                    MethodConfig(name="freeze", freeze=FreezeConfig(train_last_layers=1))])
def test_full_and_freeze_round_trip_gives_identical_logits(tmp_path, tiny_model_dir, method):
    model, tok = _trained(tiny_model_dir, method)
    out = models.save_model(model, tok, tmp_path / "out", base_ref=str(tiny_model_dir), method=method.name)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tunesmith.json"} <= set(os.listdir(out))
    assert json.loads((out / "tunesmith.json").read_text())["method"] == method.name
    loaded, tok2 = models.load_for_inference(str(out), device="cpu")
    assert not models.is_peft(loaded) and not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, tok2), logits(model, tok))
    assert tok2.chat_template == tok.chat_template and tok2.pad_token == tok.pad_token


def test_run_folder_loads_best_else_final(tmp_path, tiny_model_dir):
    model, tok = _trained(tiny_model_dir, MethodConfig(name="lora", lora=LoraConfig(r=2)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text("method: {name: lora}\n")
    with pytest.raises(ModelError, match="without a delivered model"):
        models.load_for_inference(run, device="cpu")
    models.save_model(model, tok, run / "final", base_ref=str(tiny_model_dir), method="lora")
    final, _ = models.load_for_inference(run, device="cpu")
    assert models.is_peft(final)
    (run / "best").symlink_to(tiny_model_dir)  # a whole model: best/ wins over final/
    best, _ = models.load_for_inference(run, device="cpu")
    assert not models.is_peft(best)


def test_base_model_for_inference(tiny_model_dir):
    model, tok = models.load_for_inference(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_save_model_checks_the_method(tmp_path, tiny_model_dir):
    model, tok = _trained(tiny_model_dir, MethodConfig(name="full"))
    with pytest.raises(ModelError, match="method 'lora' but the model is a plain model"):
        models.save_model(model, tok, tmp_path / "out", base_ref=str(tiny_model_dir), method="lora")


def test_adapter_whose_base_is_gone(tmp_path, tiny_model_dir):
    model, tok = _trained(tiny_model_dir, MethodConfig(name="lora", lora=LoraConfig(r=2)))
    out = models.save_model(model, tok, tmp_path / "out", base_ref=str(tmp_path / "gone"), method="lora")
    with pytest.raises(ModelError, match="cannot find the adapter's base model .*gone"):
        models.load_for_inference(out, device="cpu")
