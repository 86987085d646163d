"""What an export starts from: the model a reference names, loaded in fp32, and where it came from.

A reference is a run folder (its best model), a saved model folder (a LoRA adapter or a whole
model), an exported HF folder, a built-in alias, or a GGUF file, as ``models.load_for_inference``
accepts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import MANIFEST, is_peft, load_for_inference
from ..models.loading import all_finite
from ..models.registry import ALIASES, package_file
from ..models.resolver import run_output
from .errors import ExportError


@dataclass
class Source:
    ref: str
    model: object  # a PeftModel for an adapter, else a PreTrainedModel; fp32, CPU, eval mode
    tokenizer: object
    folder: Path | None  # the saved model folder (a run's best/) when the reference is one
    name: str  # a short name for metadata: the run folder's, the alias, the file stem
    source_gguf: Path | None = None  # the GGUF file the weights descend from, if any
    manifest: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return is_peft(self.model)


def model_folder(ref: str | Path) -> Path | None:
    """The saved model folder a reference points at: a run's delivered model, or the folder itself."""
    path = Path(str(ref)).expanduser()
    if (path / "config.resolved.yaml").is_file():
        return run_output(path)
    return path if path.is_dir() else None


def load_source(ref: str | Path) -> Source:
    """Load the model in fp32 on the CPU (merging in low precision would round the adapter away)."""
    folder = model_folder(ref)
    model, tok = load_for_inference(folder or ref, dtype=torch.float32, device="cpu")
    manifest = _read_json(folder / MANIFEST) if folder else {}
    return Source(str(ref), model, tok, folder, short_name(ref), _lineage_gguf(ref, folder, manifest), manifest)


def short_name(ref) -> str:
    path = Path(str(ref)).expanduser()
    if not path.exists():
        return str(ref)  # an alias or hub id
    if path.name in ("best", "final") and (path.parent / "config.resolved.yaml").is_file():
        return path.parent.name
    return path.stem


def merge_adapter(model):
    """The LoRA weights folded into the base weights: W' = W + (alpha/r) B A, per adapted layer.

    PEFT's safe merge computes each merged weight on a copy and refuses it if it holds NaN/inf,
    before it replaces the original; every other tensor is then checked too.
    """
    if not is_peft(model):
        return model
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT: "NaNs detected in the merged weights ..."
        raise ExportError(f"merging the adapter failed: {e}. The adapter holds NaN or inf values; "
                          "export an earlier checkpoint or retrain with a lower learning rate") from None
    bad = [n for n, p in merged.named_parameters() if p.is_floating_point() and not all_finite(p)]
    if bad:
        raise ExportError(f"after merging, {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); nothing was written")
    return merged


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a reply: the tokenizer's eos, the end-of-turn token, the configs' eos."""
    from .gguf import end_of_turn_id

    ids: list[int] = []
    values = [tokenizer.eos_token_id, end_of_turn_id(tokenizer), model.config.eos_token_id,
              getattr(model.generation_config, "eos_token_id", None)]
    for value in values:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def fix_generation_config(model, tokenizer) -> list[int]:
    """Make ``generate`` stop at the end of a turn in any tool that reads generation_config.json."""
    eos = stop_token_ids(model, tokenizer)
    gen = model.generation_config
    gen.eos_token_id = eos
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return eos


def _lineage_gguf(ref, folder: Path | None, manifest: dict) -> Path | None:
    """The GGUF file the weights were converted from: named by the manifest, the converted cache, or the ref."""
    candidates = [manifest.get("base_gguf")]
    bases = [folder, Path(manifest["base_model"]) if manifest.get("base_model") else None]
    for base in bases:
        if base is not None:
            candidates.append(_read_json(base / "tunesmith-source.json").get("gguf"))
    if str(ref) in ALIASES:
        candidates.append(package_file(ALIASES[str(ref)]))
    elif str(ref).lower().endswith(".gguf"):
        candidates.append(ref)
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

