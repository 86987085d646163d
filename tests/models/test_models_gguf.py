import json
import os
import time

import pytest
import torch
from models_helpers import logits, write_tiny_gguf

from tunesmith import models
from tunesmith.models import ModelError, resolver
from tunesmith.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_gguf(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    return write_tiny_gguf(tmp_path / "tiny.gguf", model, tok), model, tok


def test_gguf_converts_to_an_equivalent_safetensors_folder(cache, tiny_gguf):
    gguf, original, tok = tiny_gguf
    path = models.ensure_local(str(gguf))
    assert path.parent == cache / "gguf" and path.name.startswith("tiny-")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tunesmith-source.json"} <= set(os.listdir(path))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    tok2 = models.load_tokenizer(path)
    model = models.load_model(path, dtype=torch.float32, tokenizer=tok2).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, tok2), logits(original, tok))  # F32 GGUF: bit-identical
    # the GGUF says pad = eos (as SmolLM2's does); the converted tokenizer pads with a separate token
    assert tok2.pad_token == "<|pad|>" and tok2.eos_token == "<|im_end|>"
    assert tok2.chat_template == tok.chat_template
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok2.pad_token_id


def test_second_resolve_hits_the_cache_and_a_changed_file_reconverts(cache, tiny_gguf, monkeypatch):
    gguf = tiny_gguf[0]
    first = models.ensure_local(str(gguf))

    def no_conversion(*a):
        raise AssertionError("converted again")

    monkeypatch.setattr(resolver, "convert_gguf", no_conversion)
    assert models.ensure_local(str(gguf)) == first
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="converted again"):
        models.ensure_local(str(gguf))


def test_failed_conversion_leaves_no_cache_behind(cache, tiny_gguf, monkeypatch):
    def crash(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(resolver, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_local(str(tiny_gguf[0]))
    assert list((cache / "gguf").iterdir()) == []


def test_unreadable_gguf_is_a_model_error(cache, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelError, match="could not read GGUF"):
        models.ensure_local(str(bad))
    assert list((cache / "gguf").iterdir()) == []


def test_adapter_on_a_gguf_base_survives_a_cleared_cache(cache, tiny_gguf, tmp_path):
    import shutil

    from tunesmith.config import MethodConfig

    base = models.ensure_local(str(tiny_gguf[0]))
    tok = models.load_tokenizer(base)
    model, _ = models.adapt(models.load_model(base, dtype=torch.float32, tokenizer=tok), MethodConfig(name="lora"))
    models.save_model(model, tok, tmp_path / "out", base_ref=str(base), method="lora")
    manifest = json.loads((tmp_path / "out" / "tunesmith.json").read_text())
    assert manifest["base_gguf"] == str(tiny_gguf[0].resolve())
    shutil.rmtree(cache)
    loaded, _ = models.load_for_inference(tmp_path / "out", device="cpu")
    assert base.is_dir() and models.is_peft(loaded)


@pytest.mark.real_model
def test_builtin_model_converts_once_and_answers(cache):
    """The built-in GGUF: converted into an empty cache, it answers a chat prompt; a second load is fast."""
    t0 = time.time()
    path = models.ensure_local("smollm2-135m-instruct")
    convert_s = time.time() - t0
    t0 = time.time()
    model, tok = models.load_for_inference("smollm2-135m-instruct", device="cpu")
    load_s = time.time() - t0
    print(f"\nGGUF -> cache conversion {convert_s:.1f} s; cached load {load_s:.1f} s")
    assert path.parent == cache / "gguf" and load_s < 15
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.chat_template
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert out[0, -1].item() == tok.eos_token_id or out.shape[1] - ids["input_ids"].shape[1] == 24


def test_temp_folders_of_killed_conversions_are_removed(cache, tiny_gguf):
    from tunesmith.models.registry import gguf_cache_path

    dest = gguf_cache_path(tiny_gguf[0].resolve())
    dead = dest.parent / f".{dest.name}.tmp-99999999"  # no such process
    dead.mkdir(parents=True)
    models.ensure_local(str(tiny_gguf[0]))
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
