"""--format gguf: written with the gguf package, read back with transformers' GGUF loader.

Tolerances (largest logit difference over the largest logit): f32 files are bit-identical; f16 and
q8_0 files hold exactly the f16/Q8_0-rounded weights (difference 0 against the model with its weights
rounded in memory); against the unrounded tiny model, f16 <= 1e-3 (measured 2e-4) and q8_0 <= 0.02
(measured 0.005); SmolLM2-135M in test_export_real.py.
"""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunesmith import models
from tunesmith.evaluate import generate_batch
from tunesmith.export import ExportCheckFailed, ExportError, export_model, logits, probe_ids, round_weights_, write_gguf
from tunesmith.export.gguf import pre_tokenizer_name
from tunesmith.testing import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": "hello world"}], [{"role": "user", "content": "the quick brown fox"}],
           [{"role": "system", "content": "reverse"}, {"role": "user", "content": "paris france date"}]]


def _read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _tensor_types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _llama(tok, **overrides):
    cfg = tiny_model(tok).config.to_dict() | overrides
    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_f32_file_reads_back_bit_identical_with_its_tokenizer_and_chat_template(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    path = write_gguf(model, tok, tmp_path / "tiny.gguf", dtype="f32", name="tiny")
    loaded, tok2 = _read_back(path)
    ids = probe_ids(tok)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # the tokenizer and chat template round-trip
    assert tok2.chat_template == tok.chat_template
    assert (tok2.eos_token, tok2.pad_token, tok2.bos_token) == ("<|im_end|>", "<|pad|>", None)
    for text in ["hello world, what is the capital of france?", "  two  spaces\nand a new line 0123 ⌘",
                 tok.apply_chat_template(PROMPTS[2], add_generation_prompt=True, tokenize=False)]:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"], text
    assert generate_batch(loaded, tok2, PROMPTS, max_new_tokens=8) == generate_batch(model, tok, PROMPTS,
                                                                                     max_new_tokens=8)
    # the metadata llama.cpp reads
    fields = gguf.GGUFReader(str(path)).fields
    value = {k: fields[k].contents() for k in fields}
    assert value["general.architecture"] == "llama" and value["general.name"] == "tiny"
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert len(value["tokenizer.ggml.tokens"]) == len(tok) == value["llama.vocab_size"]
    assert value["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.CONTROL] * 4  # the ChatML special tokens
    assert value["tokenizer.ggml.eos_token_id"] == value["tokenizer.ggml.eot_token_id"] == 2
    assert value["tokenizer.ggml.padding_token_id"] == 3 and "tokenizer.ggml.bos_token_id" not in value
    assert value["tokenizer.ggml.add_bos_token"] is False and value["tokenizer.chat_template"] == tok.chat_template
    types = _tensor_types(path)
    assert "output.weight" not in types and set(types.values()) == {"F32"}  # tied head: no output tensor
    assert value["general.file_type"] == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("dtype, types, bound", [("f16", {"F16", "F32"}, 1e-3), ("q8_0", {"Q8_0", "F32"}, 0.02)])
def test_f16_and_q8_0_hold_exactly_the_rounded_weights(tmp_path, dtype, types, bound):
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids = probe_ids(tok)
    reference = logits(model, ids)
    path = write_gguf(model, tok, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    kinds = _tensor_types(path)
    assert set(kinds.values()) == types and kinds["blk.0.attn_norm.weight"] == "F32"  # norms stay F32
    loaded, _ = _read_back(path)
    got = logits(loaded, ids)
    assert torch.equal(got, logits(round_weights_(model, "gguf", dtype), ids))
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    assert 0 < rel <= bound, rel


@pytest.mark.parametrize("overrides", [{"tie_word_embeddings": False}, {"head_dim": 16},
                                       {"num_key_value_heads": 1, "tie_word_embeddings": False}])
def test_untied_head_other_head_dim_and_gqa_round_trip_exactly(tmp_path, overrides):
    tok = tiny_tokenizer()
    model = _llama(tok, **overrides)
    path = write_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    assert ("output.weight" in _tensor_types(path)) == (not model.config.tie_word_embeddings)
    loaded, _ = _read_back(path)
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = probe_ids(tok)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_q8_0_falls_back_to_f16_for_rows_that_do_not_split_into_blocks(tmp_path):
    tok = tiny_tokenizer()
    model = _llama(tok, hidden_size=48, intermediate_size=96, head_dim=12)  # rows of 48: not a multiple of 32
    path = write_gguf(model, tok, tmp_path / "m.gguf", dtype="q8_0")
    kinds = _tensor_types(path)
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.ffn_down.weight"] == "Q8_0"
    loaded, _ = _read_back(path)
    ids = probe_ids(tok)
    assert torch.equal(logits(loaded, ids), logits(round_weights_(model, "gguf", "q8_0"), ids))


def test_lora_run_exports_merged_and_answers_like_the_run(lora_run, tmp_path):
    out = tmp_path / "run.gguf"
    result = export_model(lora_run, "gguf", out, dtype="f32")
    assert [c.ok for c in result.checks] == [True] * 3 and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    unmerged, tok = models.load_for_inference(lora_run, device="cpu")
    loaded, tok2 = _read_back(out)
    ids = probe_ids(tok)
    torch.testing.assert_close(logits(loaded, ids), logits(unmerged, ids), rtol=0, atol=1e-5)
    assert generate_batch(loaded, tok2, PROMPTS, max_new_tokens=8) == generate_batch(unmerged, tok, PROMPTS,
                                                                                     max_new_tokens=8)


def test_a_folder_as_out_names_the_file_and_f16_is_the_default(lora_run, tmp_path):
    result = export_model(lora_run, "gguf", tmp_path)
    assert result.path == tmp_path / f"{lora_run.name}-f16.gguf" and result.path.is_file()
    assert any(c.info and c.name.startswith("f16 weights") for c in result.checks)


def test_pre_tokenizer_and_licence_come_from_the_gguf_the_model_descends_from(tmp_path):
    tok = tiny_tokenizer()
    source = tmp_path / "source.gguf"  # metadata only, as a base GGUF would carry it
    w = gguf.GGUFWriter(str(source), "llama")
    w.add_tokenizer_pre("smollm")
    w.add_license("apache-2.0")
    w.add_token_list([f"t{i}" for i in range(len(tok))])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = write_gguf(tiny_model(tok), tok, tmp_path / "m.gguf", dtype="f16", source_gguf=source)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["general.license"].contents() == "apache-2.0"


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["qwen2"]}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": split}) == "qwen2"
    with pytest.raises(ExportError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_other_architectures_and_features_fail_with_a_clear_message(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ExportError, match="Llama-architecture.*'qwen2'.*--format hf"):
        write_gguf(qwen, tok, tmp_path / "q.gguf")
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    with pytest.raises(ExportError, match="rope_type 'llama3'"):
        write_gguf(_llama(tok, rope_parameters=llama3_rope), tok, tmp_path / "r.gguf")
    with pytest.raises(ExportError, match="attention_bias=True"):
        write_gguf(_llama(tok, attention_bias=True), tok, tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())  # refused before a file is opened


def test_a_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    model = _llama(tiny_tokenizer(), vocab_size=3, pad_token_id=None, eos_token_id=0)
    with pytest.raises(ExportError, match="byte-level BPE"):
        write_gguf(model, tok, tmp_path / "w.gguf")


def test_a_file_that_does_not_read_back_equal_is_not_kept(lora_run, tmp_path, monkeypatch):
    """A writer bug (here: q/k rows not permuted) is caught by reading the file back; nothing is left."""
    from tunesmith.export import gguf as gguf_writer

    monkeypatch.setattr(gguf_writer, "permute_rotary", lambda w, n_head: w)
    with pytest.raises(ExportCheckFailed, match="FAIL GGUF read back vs the source"):
        export_model(lora_run, "gguf", tmp_path / "bad.gguf", dtype="f32")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_through_the_cli_exits_2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.cli import main

    tok = tiny_tokenizer()
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err
    assert "Llama-architecture" in err and "'gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "g.gguf").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
