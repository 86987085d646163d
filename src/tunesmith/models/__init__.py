"""Models: resolve a reference (alias, folder, GGUF, hub id) to a local folder, load, adapt, save.

Public API:
- ``ensure_local(ref, revision=None) -> Path`` (alias ``resolve``): a local HF folder; GGUF files are
  converted once into ``cache_dir()``.
- ``load_tokenizer(path, *, trust_remote_code=False, chat_template=None)``; ``load_model(path, *, dtype,
  trust_remote_code=False, dropout=None, tokenizer=None)``; ``select_dtype(requested, device)``.
- ``adapt(model, method_cfg) -> (model, ParamCounts)``: full, freeze, or LoRA via PEFT.
- ``save_model(model, tokenizer, path, *, base_ref, method)``; ``load_for_inference(ref, *, dtype=None)``.
- ``list_models() -> list[ModelInfo]``; ``ModelError`` for every user-facing failure.
"""

from .adapt import ParamCounts, adapt, base_model, count_params, find_blocks, parse_layers
from .errors import ModelError, ModelWarning
from .loading import (DROPOUT_FIELDS, PRECISIONS, Precision, cpu_bf16_speedup, cpu_has_fast, ensure_pad_token, keep_trained_in,
                      load_model, matmul_shape, load_tokenizer, select_dtype, select_precision, set_dropout)
from .registry import ALIASES, ModelInfo, cache_dir, list_models
from .resolver import ensure_local, resolve
from .saving import MANIFEST, is_peft, load_for_inference, save_model

__all__ = [
    "ALIASES", "DROPOUT_FIELDS", "MANIFEST", "ModelError", "ModelInfo", "ModelWarning", "ParamCounts", "adapt",
    "base_model",
    "cache_dir", "count_params", "cpu_has_fast", "ensure_local", "ensure_pad_token", "find_blocks", "is_peft", "list_models",
    "load_for_inference", "load_model", "load_tokenizer", "parse_layers", "resolve", "save_model", "select_dtype",
    "set_dropout", "PRECISIONS", "Precision", "cpu_bf16_speedup", "keep_trained_in", "matmul_shape", "select_precision",
]
