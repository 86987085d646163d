"""Export: a tuned model as an HF safetensors folder (adapter merged), a PEFT adapter folder, or a GGUF file.

Public API:
- ``export_model(ref, fmt, out, *, dtype=None, overwrite=False, verify=True, progress=...) -> ExportResult``:
  ``fmt`` one of ``hf`` (dtype f32|f16|bf16), ``adapter``, ``gguf`` (dtype f32|f16|q8_0); every export is
  loaded back and compared with its source before it is kept (``ExportCheckFailed`` otherwise).
- ``write_gguf(model, tokenizer, path, *, dtype, name=None, source_gguf=None)``: the GGUF writer (Llama).
- ``merge_adapter(model)``, ``fix_generation_config(model, tokenizer)``, ``load_source(ref)``.
- ``ExportError`` for bad input (the CLI exits 2), ``ExportCheckFailed`` for a failed read-back (exit 1).
"""

from .errors import ExportError
from .exporting import FORMATS, HF_DTYPES, ExportCheckFailed, ExportResult, export_model
from .gguf import GGUF_DTYPES, check_supported, write_gguf
from .source import Source, fix_generation_config, load_source, merge_adapter, stop_token_ids
from .verify import (TOLERANCE, Check, compare_logits, compare_tokenizers, dtype_effect, logits, probe_ids,
                     round_weights_)

__all__ = [
    "FORMATS", "GGUF_DTYPES", "HF_DTYPES", "TOLERANCE", "Check", "ExportCheckFailed", "ExportError", "ExportResult",
    "Source", "check_supported", "compare_logits", "compare_tokenizers", "dtype_effect", "export_model",
    "fix_generation_config", "load_source", "logits", "merge_adapter", "probe_ids", "round_weights_",
    "stop_token_ids", "write_gguf",
]
