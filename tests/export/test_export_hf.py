"""--format hf: the adapter merged into the base, loadable with plain transformers, same logits as the run."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import models
from tunesmith.export import ExportCheckFailed, ExportError, export_model, logits, probe_ids

IM_END = 2  # the tiny tokenizer's <|im_end|>


def _no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_merged_lora_loads_with_plain_transformers_and_gives_the_runs_logits(lora_run, tmp_path):
    out = tmp_path / "exports" / "hf"
    result = export_model(lora_run, "hf", out)
    assert result.dtype == "f32" and all(c.ok for c in result.checks) and len(result.checks) == 4
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "tunesmith.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists() and _no_temp_files(out.parent)

    unmerged, tok = models.load_for_inference(lora_run, device="cpu")  # PeftModel, adapters not merged
    assert models.is_peft(unmerged)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no tunesmith, no peft
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.lm_head.weight is merged.model.embed_tokens.weight
    plain_tok = AutoTokenizer.from_pretrained(out)
    ids = probe_ids(plain_tok)
    assert torch.equal(ids, probe_ids(tok))
    ref, got = logits(unmerged, ids), logits(merged, ids)
    base = logits(AutoModelForCausalLM.from_pretrained(ref_base(lora_run)).eval(), ids)
    assert (ref - base).abs().max() > 0.1  # the adapter matters, so equal logits mean the merge is right
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # measured: ~1e-7 (float rounding of W + BA)

    assert plain_tok.chat_template == tok.chat_template and plain_tok.pad_token == "<|pad|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert IM_END in gen["eos_token_id"] and gen["pad_token_id"] == tok.pad_token_id
    manifest = json.loads((out / "tunesmith.json").read_text())
    assert manifest["merged_adapter"] is True and manifest["method"] == "lora"
    # greedy generation with the generation config alone stops at the end of the turn
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)])
    a = merged.generate(prompt, max_new_tokens=8, do_sample=False)
    b = unmerged.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, eos_token_id=[IM_END])
    assert a.tolist() == b.tolist()


def ref_base(run):
    return json.loads((run / "best" / "tunesmith.json").read_text())["base_model"]


def test_full_run_is_copied_with_a_generation_config_that_stops_at_the_end_of_a_turn(full_run, tmp_path):
    out = tmp_path / "hf"
    export_model(full_run, "hf", out)
    saved = json.loads((full_run / "best" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == 0  # the run's own config would run past <|im_end|>
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == IM_END and 0 in gen["eos_token_id"]
    source, tok = models.load_for_inference(full_run, device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = probe_ids(tok)
    assert torch.equal(logits(exported, ids), logits(source, ids))  # f32 copy: bit-identical


def test_f16_export_holds_exactly_the_rounded_weights(lora_run, tmp_path):
    result = export_model(lora_run, "hf", tmp_path / "hf16", dtype="f16")
    with safe_open(tmp_path / "hf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    check = next(c for c in result.checks if c.name.startswith("reloaded folder vs the source with weights rounded"))
    assert check.ok and "max |Δlogit| 0 = 0" in check.detail  # the file holds exactly the f16-rounded weights


def test_nan_adapter_is_refused_and_nothing_is_written(lora_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-run"
    shutil.copytree(lora_run, bad)
    weights = load_file(bad / "best" / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, bad / "best" / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="NaN"):
        export_model(bad, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_temp_files(tmp_path)


def test_existing_output_needs_overwrite(lora_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(lora_run, "hf", out)
    export_model(lora_run, "hf", out, overwrite=True, verify=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_a_merge_that_loses_the_adapter_is_caught_and_nothing_is_kept(lora_run, tmp_path, monkeypatch):
    """The failure users report: a merged model that no longer answers like the tuned one."""
    from tunesmith.export import exporting

    monkeypatch.setattr(exporting, "merge_adapter", lambda model: model.unload())  # drops the adapter, no merge
    with pytest.raises(ExportCheckFailed) as e:
        export_model(lora_run, "hf", tmp_path / "out")
    assert "FAIL merged vs unmerged" in str(e.value) and "FAIL reloaded folder vs the source" in str(e.value)
    assert not (tmp_path / "out").exists() and _no_temp_files(tmp_path)
