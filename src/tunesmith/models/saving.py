"""Save the model a run delivers, and load any model reference for inference.

A saved model folder is either a PEFT adapter (LoRA: adapter_model.safetensors + adapter_config.json)
or a whole HF model in safetensors (full, freeze), always with the tokenizer (chat template
included) and ``tunesmith.json``, which names the base model an adapter belongs on.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .errors import ModelError
from .loading import load_model, load_tokenizer, select_dtype
from .resolver import ensure_local, run_output

MANIFEST = "tunesmith.json"


def save_model(model, tokenizer, path: str | Path, *, base_ref: str, method: str) -> Path:
    """Write ``model`` (adapter only, for a PeftModel) + tokenizer + tunesmith.json into ``path``."""
    from .. import __version__

    path = Path(path)
    adapter = is_peft(model)
    if (method == "lora") != adapter:
        raise ModelError(f"save_model: method {method!r} but the model is "
                         f"{'a PEFT adapter model' if adapter else 'a plain model'}")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # PeftModel: the adapter; else safetensors + config + generation_config
    tokenizer.save_pretrained(path)
    manifest = {"base_model": str(base_ref), "method": method, "format": "peft-adapter" if adapter else "hf-model",
                "tunesmith_version": __version__}
    source = Path(base_ref) / "tunesmith-source.json"  # a converted GGUF: remember the file, to reconvert if needed
    if source.is_file():
        manifest["base_gguf"] = json.loads(source.read_text(encoding="utf-8"))["gguf"]
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_for_inference(ref: str | Path, *, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode for a base model ref, a saved model folder or a run folder.

    dtype defaults to select_dtype("auto", device); device to CUDA when available, else CPU.
    A LoRA folder is loaded as a PeftModel on its base (adapters not merged).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or select_dtype("auto", device)
    folder = Path(str(ref)).expanduser()
    if (folder / "config.resolved.yaml").is_file():
        folder = run_output(folder)
    if (folder / "adapter_config.json").is_file():
        model, tok = _load_adapter(folder, dtype, trust_remote_code)
    else:
        local = ensure_local(str(folder) if folder.exists() else str(ref))
        tok = load_tokenizer(local, trust_remote_code=trust_remote_code)
        model = load_model(local, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tok)
    model.to(device)
    model.eval()
    return model, tok


def _load_adapter(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    from peft import PeftModel

    base = _adapter_base(folder)
    # the tokenizer saved with the adapter: the chat template and pad token used in training
    tok = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tok)
    try:
        return PeftModel.from_pretrained(model, folder), tok
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a pickle that is more than tensors
        raise ModelError(f"{folder}: the adapter's .bin file holds Python objects besides tensors; it was not loaded, "
                         "because unpickling them could run code. Use adapter_model.safetensors") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not put the adapter {folder} on its base model {base}: {e}") from None


def _adapter_base(folder: Path) -> Path:
    """The local base folder of an adapter: tunesmith.json's base, else adapter_config.json's."""
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = manifest.get("base_model") or cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}: the adapter does not say which base model it belongs on "
                         f"(no base_model in {MANIFEST}, no base_model_name_or_path in adapter_config.json)")
    gguf = manifest.get("base_gguf")
    if not Path(base).exists() and gguf and Path(gguf).is_file():
        return ensure_local(gguf)  # the converted cache was cleared: convert the GGUF again
    try:
        return ensure_local(base)
    except ModelError as e:
        raise ModelError(f"{folder}: cannot find the adapter's base model {base!r}: {e}") from None
