import pytest
import torch
from models_helpers import snapshot, train_steps

from tunesmith import models
from tunesmith.config import FreezeConfig, LoraConfig, MethodConfig
from tunesmith.models import ModelError, ModelWarning, adapt
from tunesmith.testing import tiny_model



def _unique_total(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_full_trains_everything_and_counts_tied_weights_once(tok):
    model = tiny_model(tok)
    model, counts = adapt(model, MethodConfig(name="full"))
    emb = model.model.embed_tokens.weight.numel()
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert counts.total == counts.trainable == _unique_total(model) == with_duplicates - emb
    assert "lm_head.weight" not in counts.trainable_names and "model.embed_tokens.weight" in counts.trainable_names
    before = snapshot(model)
    train_steps(model, tok)
    assert _changed(before, snapshot(model)) == set(before)


def test_freeze_last_layers_trains_only_those(tok):
    model = tiny_model(tok, layers=3)
    model, counts = adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_last_layers=1)))
    assert counts.trainable_names and all(n.startswith("model.layers.2.") for n in counts.trainable_names)
    assert counts.trainable == sum(p.numel() for p in model.model.layers[2].parameters())
    assert counts.total == _unique_total(model)
    before = snapshot(model)
    train_steps(model, tok)
    after = snapshot(model)
    trained = {k for k in before if k.startswith("model.layers.2.")}
    assert _changed(before, after) == trained  # frozen tensors bit-identical, embeddings/lm_head included
    assert not model.lm_head.weight.requires_grad


def test_freeze_layers_and_patterns(tok):
    model = tiny_model(tok, layers=4)
    cfg = FreezeConfig(train_layers=["0-1", "3"], train_patterns=[r"^model\.norm\."])
    model, counts = adapt(model, MethodConfig(name="freeze", freeze=cfg))
    layers = {int(n.split(".")[2]) for n in counts.trainable_names if n.startswith("model.layers.")}
    assert layers == {0, 1, 3} and "model.norm.weight" in counts.trainable_names
    before = snapshot(model)
    train_steps(model, tok)
    changed = _changed(before, snapshot(model))
    assert changed == {k for k in before if k.split(".")[2:3] in (["0"], ["1"], ["3"]) or k == "model.norm.weight"}


def test_freeze_tied_head_trains_the_embedding_and_says_so(tok):
    model = tiny_model(tok)
    with pytest.warns(ModelWarning, match="lm_head.weight is tied to model.embed_tokens.weight"):
        model, counts = adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_patterns=["lm_head"])))
    assert counts.trainable_names == ["model.embed_tokens.weight"]
    assert counts.trainable == model.model.embed_tokens.weight.numel()


@pytest.mark.parametrize("items, n, expected", [
    (["0-3", "10"], 12, {0, 1, 2, 3, 10}), (["5"], 6, {5}), ([" 1 - 2 "], 3, {1, 2}), ([], 4, set()),
])
def test_parse_layers(items, n, expected):
    assert models.parse_layers(items, n) == expected


@pytest.mark.parametrize("items, message", [
    (["12"], r"method.freeze.train_layers: '12' is out of range: the model has 12 blocks, indices 0-11"),
    (["3-1"], r"range '3-1' runs backwards; write it as '1-3'"),
    (["-1"], r"'-1' is not a block index or range; write e.g. '10' or '0-3'"),
    (["a"], r"'a' is not a block index"),
])
def test_parse_layers_errors(items, message):
    with pytest.raises(ModelError, match=message):
        models.parse_layers(items, 12)


def test_freeze_selection_errors(tok):
    model = tiny_model(tok)
    with pytest.raises(ModelError, match=r"train_last_layers: got 3, but the model has 2 blocks \(allowed 1-2\)"):
        adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_last_layers=3)))
    with pytest.raises(ModelError, match="train_patterns: 'lm_haed' matches no parameter name; .*model.norm.weight"):
        adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_patterns=["lm_haed"])))
    with pytest.raises(ModelError, match="not a valid regular expression"):
        adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_patterns=["("])))
    with pytest.raises(ModelError, match="out of range"):
        adapt(model, MethodConfig(name="freeze", freeze=FreezeConfig(train_layers=["2"])))


def test_find_blocks_is_generic(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert models.find_blocks(tiny_model(tok, layers=3)) == ("model.layers", 3)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert models.find_blocks(gpt2) == ("transformer.h", 2)
    model, counts = adapt(gpt2, MethodConfig(name="freeze", freeze=FreezeConfig(train_last_layers=1)))
    assert counts.trainable_names and all(n.startswith("transformer.h.1.") for n in counts.trainable_names)


def _lora(**kw) -> MethodConfig:
    return MethodConfig(name="lora", lora=LoraConfig(**kw))


def test_lora_trains_only_adapters(tok):
    torch.manual_seed(0)
    model, counts = adapt(tiny_model(tok), _lora(r=4, alpha=8, dropout=0.0))
    # all-linear: q, k, v, o, gate, up, down in 2 blocks, each r * (in + out); lm_head is not adapted.
    # hidden 32, kv 16, mlp 64: r * (64 + 48 + 48 + 64 + 96 + 96 + 96) = 4 * 512 per block.
    assert counts.trainable == 2 * 4 * 512
    assert counts.total == _unique_total(model)
    assert all("lora_A" in n or "lora_B" in n for n in counts.trainable_names)
    assert not any("lm_head" in n or "embed_tokens" in n for n in counts.trainable_names)
    before = snapshot(model)
    train_steps(model, tok)
    changed = _changed(before, snapshot(model))
    assert changed and all("lora_" in k for k in changed)  # base weights bit-identical
    assert {k for k in before if "lora_B" in k} <= changed


def test_lora_target_modules_and_rslora(tok):
    model, counts = adapt(tiny_model(tok), _lora(r=2, target_modules=["q_proj", "v_proj"], use_rslora=True))
    assert counts.trainable == 2 * 2 * ((32 + 32) + (32 + 16))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32.0 / 2 ** 0.5)


def test_lora_unknown_target_module_names_the_field(tok):
    with pytest.raises(ModelError, match=r"method.lora.target_modules=\['qproj'\]: .*Linear modules in this model: "
                                         r".*q_proj"):
        adapt(tiny_model(tok), _lora(target_modules=["qproj"]))


def test_dora_creates_a_dora_layer(tok):
    model, counts = adapt(tiny_model(tok), _lora(r=2, target_modules=["q_proj"], use_dora=True))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" in q.lora_magnitude_vector
    assert any("lora_magnitude_vector" in n for n in counts.trainable_names)
    before = snapshot(model)
    train_steps(model, tok)
    assert all("lora_" in k for k in _changed(before, snapshot(model)))
