"""evaluate.base_model: the base a tuned model is compared with, for the length of a with block."""

import gc
import weakref

import pytest
import torch

from tunesmith.evaluate import base_model
from tunesmith.models import load_for_inference

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_for_inference(tiny_model_dir, dtype=torch.float32, device="cpu")
    expected = _logits(model)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return lora.eval(), expected


def test_a_lora_models_own_base_is_its_adapters_off(lora):
    tuned, base_logits = lora
    tuned_logits = _logits(tuned)
    assert not torch.allclose(tuned_logits, base_logits)  # the adapter changes the output
    with base_model(tuned, None) as base:
        assert base.adapters_off and base.model is tuned and base.tokenizer is None
        torch.testing.assert_close(_logits(base.model), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(tuned), tuned_logits, rtol=0, atol=0)  # adapters on again


def test_another_base_is_loaded_like_the_tuned_model_then_let_go(lora, tiny_model_dir):
    tuned, base_logits = lora
    with base_model(tuned, tiny_model_dir, own_base=False) as base:  # not its own base: loaded, even for LoRA
        assert not base.adapters_off and base.model is not tuned and base.tokenizer is not None
        assert next(base.model.parameters()).dtype == torch.float32 and not base.model.training
        torch.testing.assert_close(_logits(base.model), base_logits, rtol=0, atol=0)
        loaded = weakref.ref(base.model)
    assert base.model is None and base.tokenizer is None
    gc.collect()
    assert loaded() is None  # nothing keeps the copy's weights alive


def test_a_full_model_has_its_base_loaded(tiny_model_dir):
    tuned, _ = load_for_inference(tiny_model_dir, dtype=torch.float32, device="cpu")
    with base_model(tuned, tiny_model_dir) as base:
        assert not base.adapters_off and base.model is not tuned
    with pytest.raises(ValueError, match="no base to load"):
        with base_model(tuned, None):
            pass
