"""--format adapter: the PEFT LoRA folder, loadable with peft.PeftModel.from_pretrained on the base."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import models
from tunesmith.export import ExportError, export_model, logits, probe_ids


def test_adapter_loads_with_plain_peft_on_its_base_and_gives_the_runs_logits(lora_run, tmp_path):
    out = tmp_path / "adapter"
    result = export_model(lora_run, "adapter", out)
    assert all(c.ok for c in result.checks) and result.checks[0].name.startswith("PeftModel.from_pretrained")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "tunesmith.json"} <= {p.name for p in out.iterdir()}
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert result.base_model == base
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    run, tok = models.load_for_inference(lora_run, device="cpu")
    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    assert torch.equal(logits(plain, ids), logits(run, ids))
    # tunesmith loads the exported adapter too (generate / chat accept it)
    again, _ = models.load_for_inference(out, device="cpu")
    assert models.is_peft(again) and torch.equal(logits(again, ids), logits(run, ids))


def test_full_run_has_no_adapter_to_export(full_run, tmp_path):
    with pytest.raises(ExportError, match="not a LoRA run.*--format hf"):
        export_model(full_run, "adapter", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_dtype_does_not_apply_to_an_adapter(lora_run, tmp_path):
    with pytest.raises(ExportError, match="--dtype does not apply"):
        export_model(lora_run, "adapter", tmp_path / "a", dtype="f16")
