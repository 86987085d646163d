"""Write a Llama-architecture model and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio).

The layout is the one llama.cpp's ``convert_hf_to_gguf.py`` writes for ``LlamaForCausalLM``, so
llama.cpp and transformers' GGUF loader both read it:

- tensor names from ``gguf.get_tensor_name_map`` (``token_embd``, ``blk.N.attn_q``, ``output_norm``...);
  a tied LM head is simply absent (readers tie ``output`` to ``token_embd``), an untied one is ``output``;
- q/k projection rows permuted into llama.cpp's interleaved rotary order (readers undo it);
- 1-D tensors (the RMSNorm weights) always F32; matrices F32, F16 or Q8_0 (``gguf.quants.quantize``,
  bit-exact with ggml's reference), falling back to F16 for rows not a multiple of 32, as llama.cpp does;
- the tokenizer as metadata: ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with tokens, token
  types, merges, the pre-tokenizer name, bos/eos/unk/pad/eot ids, add_bos/add_eos and the chat template.

Why by hand: the ``gguf`` package provides the writer, the name map, quantisation and the special
vocabulary reader, but the converter that ties them together is a llama.cpp script, not a library.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError

GGUF_DTYPES = ("f32", "f16", "q8_0")
# Tokens that end an assistant turn in the common chat templates (ChatML, Llama 3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def write_gguf(model, tokenizer, path: str | Path, *, dtype: str = "f16", name: str | None = None,
               source_gguf: str | Path | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM, adapters merged) and ``tokenizer`` to the GGUF file ``path``.

    ``source_gguf``: the GGUF the model descends from, if any; its pre-tokenizer name and licence are
    carried over (the tokenizer was built from it, so its llama.cpp pre-tokenizer is the right one).
    Raises ExportError for architectures, rope scalings and tokenizers this writer cannot express.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not a GGUF type this writer supports; "
                          f"allowed: {', '.join(GGUF_DTYPES)}")
    check_supported(model)
    cfg, path = model.config, Path(path)
    rows = model.get_input_embeddings().num_embeddings
    source = _source_fields(source_gguf)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hparams(writer, cfg, rows, dtype, name or "tunesmith export", source.get("general.license"))
        _add_tokenizer(writer, tokenizer, rows, source)
        for gguf_name, data, qtype in _tensors(model, dtype):
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def check_supported(model) -> None:
    """ExportError unless the model is a plain Llama (the configurations llama.cpp's llama graph runs)."""
    from ..models import is_peft

    if is_peft(model):
        raise ExportError("the model still carries LoRA adapters: merge them first (export --format gguf does)")
    cfg = model.config
    if cfg.model_type != "llama":
        arch = ", ".join(getattr(cfg, "architectures", None) or [type(model).__name__])
        raise ExportError(f"GGUF export supports Llama-architecture models (model_type 'llama': SmolLM/SmolLM2, "
                          f"TinyLlama, Llama 2); this model is {cfg.model_type!r} ({arch}). Export it with "
                          "--format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    unsupported = [f"rope_type {rope_type!r} (only 'default' rotary embeddings)"] if rope_type != "default" else []
    unsupported += [f"{flag}=True" for flag in ("attention_bias", "mlp_bias") if getattr(cfg, flag, False)]
    if getattr(cfg, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {cfg.hidden_act!r} (llama.cpp's llama uses silu)")
    if _head_dim(cfg) % 2:
        unsupported.append(f"odd head_dim {_head_dim(cfg)}")
    if unsupported:
        raise ExportError(f"this Llama model uses {', '.join(unsupported)}, which the GGUF writer does not express; "
                          "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


# ---------------------------------------------------------------- hyper-parameters


def _add_hparams(writer, cfg, rows: int, dtype: str, name: str, license_: str | None) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if license_:
        writer.add_license(license_)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(rows)
    writer.add_rope_dimension_count(_head_dim(cfg))
    if _head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(_head_dim(cfg))  # llama.cpp assumes hidden/heads otherwise
        writer.add_value_length(_head_dim(cfg))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- tensors


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows from HF's half-split rotary order to llama.cpp's interleaved order; w: (n_head * head_dim, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, dtype: str):
    """(gguf name, numpy data, raw GGML type or None) for every weight, in state-dict order."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: readers reuse token_embd
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"the model has a tensor {key!r} that a llama GGUF has no place for; "
                              "export with --format hf instead")
        w = t.detach().to(device="cpu", dtype=torch.float32).numpy()  # (out, in) or (n,)
        if gguf_name.endswith("attn_q.weight"):
            w = permute_rotary(w, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = permute_rotary(w, cfg.num_key_value_heads)
        yield (gguf_name, *_encode(w, dtype))


def as_stored(w: np.ndarray, dtype: str) -> np.ndarray:
    """``w`` as a GGUF of ``dtype`` stores it, read back to float32 (what a reader will compute with)."""
    from gguf.quants import dequantize

    data, qtype = _encode(w, dtype)
    if qtype is None:
        return data.astype(np.float32)
    return dequantize(data, qtype).reshape(w.shape)


def _encode(w: np.ndarray, dtype: str):
    import gguf
    from gguf.quants import QuantError, quantize

    if w.ndim <= 1 or dtype == "f32":  # norms stay F32 in every llama.cpp file type
        return np.ascontiguousarray(w, dtype=np.float32), None
    if dtype == "q8_0":
        try:
            return quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except QuantError:
            pass  # rows not a multiple of the 32-value block: F16, as llama.cpp's converter falls back
    return np.ascontiguousarray(w, dtype=np.float16), None


# ---------------------------------------------------------------- tokenizer


def _add_tokenizer(writer, tokenizer, rows: int, source: dict) -> None:
    import gguf

    spec = _tokenizer_spec(tokenizer)
    tokens, types = vocab_tokens(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    pre = source.get("tokenizer.ggml.pre") if source.get("n_tokens") == len(tokens) else None
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        # merges (both tokenizer.json spellings) and chat templates (single or named) as llama.cpp reads them
        special = gguf.SpecialVocab(d, load_merges=True, special_token_types=(), n_vocab=rows)
    special.special_token_ids, special.add_special_token = {}, {}  # set from the tokenizer object, below
    if not special.merges:
        raise ExportError("the tokenizer has no BPE merges: a GGUF without them would not tokenize")
    special.add_to_gguf(writer, quiet=True)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])


def _tokenizer_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        kind = f"{model.get('type', type(tokenizer).__name__)} with a {decoder.get('type', 'no')} decoder"
        raise ExportError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3 and Qwen "
                          f"use); this tokenizer is {kind}. Export with --format hf and convert that folder with "
                          "llama.cpp's convert_hf_to_gguf.py")
    return spec


def vocab_tokens(tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types, padded to the embedding rows with unused [PADn]."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= rows:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the embedding only {rows} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:  # embedding rows past the vocabulary (padded for speed), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE).

    Recognised by structure: byte-level with GPT-2's built-in regex -> 'gpt-2'; a Split on a known
    regex then byte-level without regex -> that regex's name in transformers' GGUF table (the names
    llama.cpp uses). Anything else would tokenize differently in llama.cpp, so it is refused.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise ExportError(f"cannot tell which llama.cpp pre-tokenizer matches this tokenizer's {kinds or 'missing'} "
                      "pre-tokenizer; export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the token that ends an assistant turn in the chat template, if the vocabulary has one."""
    vocab, template = tokenizer.get_vocab(), tokenizer.chat_template or ""
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in template:
            return vocab[token]
    return None


def _source_fields(source_gguf) -> dict:
    """The fields carried over from the GGUF a model descends from: pre-tokenizer, licence, token count."""
    if not source_gguf or not Path(source_gguf).is_file():
        return {}
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(source_gguf)).fields
    except (OSError, ValueError):
        return {}  # unreadable: fall back to recognising the pre-tokenizer from the tokenizer itself
    out = {k: fields[k].contents() for k in ("tokenizer.ggml.pre", "general.license") if k in fields}
    if "tokenizer.ggml.tokens" in fields:
        out["n_tokens"] = len(fields["tokenizer.ggml.tokens"].data)
    return out
