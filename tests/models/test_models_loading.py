import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith import models
from tunesmith.models import ModelError, ModelWarning, select_dtype


def _cpu_features(monkeypatch, avx512_bf16=False, amx=False, amx_fp16=False):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)


def test_select_dtype_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    _cpu_features(monkeypatch)  # an AVX2 laptop: no bf16/fp16 matrix hardware
    assert select_dtype("auto", cpu) == torch.float32
    assert select_dtype("float32", cpu) == torch.float32
    with pytest.warns(ModelWarning, match="no bfloat16 matrix hardware.*far slower"):
        assert select_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.warns(ModelWarning, match="no float16 matrix hardware"):
        assert select_dtype("float16", cpu) == torch.float16
    with pytest.raises(ModelError, match="allowed: auto, float32, bf16-mixed, bfloat16, float16"):
        select_dtype("fp8", cpu)


@pytest.mark.parametrize("features", [{"avx512_bf16": True}, {"amx": True}])
def test_bf16_on_a_cpu_with_bf16_hardware_is_asked_for_without_a_warning(monkeypatch, recwarn, features):
    _cpu_features(monkeypatch, **features)
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert select_dtype("auto", torch.device("cpu")) == torch.float32  # inference on a CPU: fp32 unless asked
    assert not [w for w in recwarn if issubclass(w.category, ModelWarning)]
    assert models.cpu_has_fast(torch.bfloat16) and not models.cpu_has_fast(torch.float16)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_select_dtype_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert select_dtype("auto", torch.device("cuda")) == expected
    if not bf16:
        with pytest.raises(ModelError, match="does not support bf16"):
            select_dtype("bfloat16", torch.device("cuda"))


def test_auto_precision_on_a_cpu_without_bf16_units_is_float32_without_measuring(monkeypatch):
    _cpu_features(monkeypatch)  # AVX2 only: bf16 would be emulated
    monkeypatch.setattr(models.loading, "_speedups", {})
    p = models.select_precision("auto", "cpu", "lora", (576, 1536))
    assert (p.name, p.load_dtype, p.trained_dtype, p.autocast) == ("float32", torch.float32, None, None)
    assert "no bf16 matrix units" in p.reason and models.loading._speedups == {(576, 1536): 0.0}


@pytest.mark.parametrize("speedup, expected", [(6.3, "bf16-mixed"), (1.49, "float32"), (0.58, "float32")])
def test_auto_precision_on_a_bf16_cpu_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.setattr(models.loading, "cpu_bf16_speedup", lambda shape: speedup)
    p = models.select_precision("auto", "cpu", "lora", (576, 1536))
    assert p.name == expected and f"{speedup:.1f}x" in p.reason
    tiny = models.select_precision("auto", "cpu", "lora", (64, 128))  # too narrow: fp32, not measured
    assert tiny.name == "float32" and "too small" in tiny.reason


def test_measuring_bf16_leaves_the_global_random_state_alone(monkeypatch):
    """The measurement runs after the run's seed is set and before its adapters are initialised: drawing its matrices
    from the global RNG would give a run other adapters than the same run started again (the cache skips it then)."""
    monkeypatch.setattr(models.loading, "_speedups", {})
    torch.manual_seed(0)
    before = torch.get_rng_state()
    models.cpu_bf16_speedup((64, 128))
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_mixed_keeps_what_trains_in_fp32_and_a_lora_base_in_bf16():
    lora = models.select_precision("bf16-mixed", "cpu", "lora")
    full = models.select_precision("bf16-mixed", "cpu", "full")
    freeze = models.select_precision("bf16-mixed", "cpu", "freeze")
    assert (lora.load_dtype, lora.trained_dtype, lora.autocast) == (torch.bfloat16, torch.float32, torch.bfloat16)
    # full and freeze deliver the whole model: its weights stay fp32 (master weights), the products run in bf16
    assert (full.load_dtype, full.trained_dtype, full.autocast) == (torch.float32, torch.float32, torch.bfloat16)
    assert freeze.load_dtype == torch.float32
    pure = models.select_precision("bfloat16", "cpu")
    assert (pure.load_dtype, pure.trained_dtype, pure.autocast) == (torch.bfloat16, None, None)
    with pytest.raises(ModelError, match="allowed: auto, float32, bf16-mixed, bfloat16, float16"):
        models.select_precision("fp8", "cpu")


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "float16")])
def test_auto_precision_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    p = models.select_precision("auto", "cuda", "lora")
    assert p.name == expected and p.autocast == (torch.bfloat16 if bf16 else torch.float16)


def test_keep_trained_in_casts_only_what_trains():
    layer = torch.nn.Linear(4, 4).bfloat16()
    layer.bias.requires_grad_(False)
    assert models.keep_trained_in(layer, torch.float32) == 1
    assert layer.weight.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16


def test_load_model_and_tokenizer(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_model(tiny_model_dir, dtype=torch.float32)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= model.get_input_embeddings().num_embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.attention_dropout == 0.0


def test_load_model_in_bfloat16(tiny_model_dir):
    model = models.load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_dropout_override_reaches_the_attention(tiny_model_dir):
    model = models.load_model(tiny_model_dir, dtype=torch.float32, dropout=0.25)
    assert model.config.attention_dropout == 0.25
    assert all(layer.self_attn.attention_dropout == 0.25 for layer in model.model.layers)


def test_set_dropout_fields_per_architecture():
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    assert models.set_dropout(LlamaConfig(), 0.1) == ["attention_dropout"]
    gpt2 = GPT2Config()
    assert sorted(models.set_dropout(gpt2, 0.2)) == ["attn_pdrop", "embd_pdrop", "resid_pdrop"]
    assert gpt2.attn_pdrop == gpt2.resid_pdrop == gpt2.embd_pdrop == 0.2
    assert gpt2.summary_first_dropout == 0.1  # a head's dropout is left alone
    with pytest.raises(ModelError, match="model.dropout: .* has no dropout setting"):
        models.set_dropout(PretrainedConfig(), 0.1)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def _edit_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_an_error(model_copy):
    _edit_weights(model_copy, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelError, match="missing from the checkpoint .*model.layers.1.mlp.up_proj.weight"):
        models.load_model(model_copy, dtype=torch.float32)


def test_unexpected_weights_warn(model_copy):
    _edit_weights(model_copy, lambda w: w.update({"model.extra_head.weight": torch.zeros(2, 2)}))
    with pytest.warns(ModelWarning, match="not used by the model .*model.extra_head.weight"):
        models.load_model(model_copy, dtype=torch.float32)


def test_non_finite_weights_are_an_error(model_copy):
    def poison(w):
        w["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

    _edit_weights(model_copy, poison)
    with pytest.raises(ModelError, match="model.layers.0.self_attn.q_proj.weight holds NaN or inf"):
        models.load_model(model_copy, dtype=torch.float32)


def test_all_finite_sees_inf_and_tolerates_overflowing_sums():
    assert models.loading.all_finite(torch.full((4,), 6e4, dtype=torch.float16))  # sum overflows fp16, not fp32
    assert models.loading.all_finite(torch.full((2,), 3e38))  # sum overflows fp32; elements are finite
    assert not models.loading.all_finite(torch.tensor([1.0, float("inf"), float("-inf")]))


def test_tokenizer_larger_than_the_embedding_is_an_error(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    rows = models.load_model(tiny_model_dir, dtype=torch.float32).get_input_embeddings().num_embeddings
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 1)])
    with pytest.raises(ModelError, match=f"tokenizer has {rows + 1} tokens but the model's embedding has {rows} rows"):
        models.load_model(tiny_model_dir, dtype=torch.float32, tokenizer=tok)


def test_named_chat_template(tiny_model_dir):
    from tunesmith.data import resolve_chat_template

    tok = models.load_tokenizer(tiny_model_dir, chat_template="chatml")
    assert tok.chat_template == resolve_chat_template("chatml")


class FakeTokenizer:
    """Only what ensure_pad_token looks at."""

    def __init__(self, vocab, eos, pad=None):
        self.vocab, self.eos_token, self.pad_token = {t: i for i, t in enumerate(vocab)}, eos, pad

    def get_vocab(self):
        return self.vocab

    @property
    def eos_token_id(self):
        return self.vocab.get(self.eos_token)

    @property
    def pad_token_id(self):
        return self.vocab.get(self.pad_token)


@pytest.mark.parametrize("vocab, eos, pad, expected", [
    (["a", "<|endoftext|>", "<|im_end|>"], "<|im_end|>", "<|im_end|>", "<|endoftext|>"),  # SmolLM2's GGUF
    (["a", "<|endoftext|>", "<|im_end|>", "<|pad|>"], "<|im_end|>", None, "<|pad|>"),  # dedicated pad first
    (["a", "<|endoftext|>", "<|im_end|>"], "<|im_end|>", "a", "a"),  # a distinct pad is kept
])
def test_pad_token_is_not_eos_when_the_vocab_allows(vocab, eos, pad, expected):
    tok = FakeTokenizer(vocab, eos, pad)
    models.ensure_pad_token(tok)
    assert tok.pad_token == expected


def test_pad_falls_back_to_eos_with_a_warning():
    tok = FakeTokenizer(["a", "<|endoftext|>"], "<|endoftext|>")
    with pytest.warns(ModelWarning, match="padding with eos"):
        models.ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"
