"""Export a tuned model as an HF folder, a PEFT adapter folder or a GGUF file, and check it by loading it back.
A text-to-image model (a diffusers pipeline or its LoRA) goes to images.py: a pipeline folder or the LoRA file.

Each export is written under a temporary name next to ``out`` and renamed into place only after it
has been read back and compared with the source (see verify.py), so ``out`` is complete or absent. A run's
safety.json (the release gate's measurement and decision) is then copied into the export folder, or beside a
GGUF file as ``NAME.gguf.safety.json``; `chat` and `serve` read it from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import ExportError
from .gguf import GGUF_DTYPES, end_of_turn_id, write_gguf
from .source import Source, short_name, fix_generation_config, load_source, merge_adapter, model_folder
from .verify import Check, compare_logits, compare_tokenizers, dtype_effect, logits, probe_ids, round_weights_

FORMATS = ("hf", "adapter", "gguf")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16", "adapter": None}


class ExportCheckFailed(Exception):
    """The export was written but did not load back equal to its source; nothing was kept (exit code 1)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    dtype: str | None
    seconds: float
    checks: list[Check] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    base_model: str | None = None  # adapters: the base they go on
    kind: str = "causal-lm"  # or "text-to-image" (images.py)

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def export_model(ref: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
                 verify: bool = True, progress: Callable[[str], None] = lambda msg: None,
                 style: str | None = None) -> ExportResult:
    """Write the model ``ref`` names (run folder, saved model, alias, HF folder, GGUF) as ``fmt`` at ``out``.

    Arguments are checked before any model loads (ExportError); a failed read-back check raises
    ExportCheckFailed and leaves nothing at ``out``.
    """
    t0 = time.time()
    image = _text_to_image(ref)
    if image is not None:  # a diffusers pipeline or its LoRA: images.py
        from .images import export_image_model

        result = export_image_model(ref, image, fmt, Path(out).expanduser(), dtype=dtype, overwrite=overwrite,
                                    verify=verify, progress=progress, style=style)
        result.seconds = time.time() - t0
        return result
    if style is not None:
        raise ExportError(f"--style {style} names a text-to-image LoRA file layout (diffusers, kohya, comfyui), and "
                          f"{ref} is a language model: its adapter is PEFT's folder")
    if fmt == "diffusers":
        raise ExportError(f"--format diffusers writes a text-to-image pipeline, and {ref} is a language model: use "
                          "--format hf, adapter or gguf")
    dtype = _check_dtype(fmt, dtype)
    out = _check_out(ref, fmt, Path(out).expanduser(), dtype, overwrite)
    if fmt == "adapter":
        result = _export_adapter(ref, out, verify, progress)
    else:
        progress(f"loading {ref}")
        src = load_source(ref)
        writer = _export_hf if fmt == "hf" else _export_gguf
        result = writer(src, out, dtype, verify, progress)
    from ..safety.gate import attach

    attach(ref, result.path, fmt)  # the release gate's decision travels with the model (safety.json)
    result.seconds = time.time() - t0
    return result


def _text_to_image(ref) -> Path | None:
    from ..models import ModelError
    from ..models.diffusion import text_to_image_folder

    from ..models.registry import ALIASES

    try:
        return text_to_image_folder(ref)
    except ModelError:
        alias = ALIASES.get(str(ref))
        if alias is not None and alias.kind == "text-to-image":
            raise
        return None  # an unfinished run, say: the language-model path says what is wrong


def _check_dtype(fmt: str, dtype: str | None) -> str | None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if fmt == "adapter":
        if dtype is not None:
            raise ExportError("--dtype does not apply to --format adapter (the adapter is copied as trained)")
        return None
    dtype = dtype or DEFAULT_DTYPE[fmt]
    allowed = tuple(HF_DTYPES) if fmt == "hf" else GGUF_DTYPES
    if dtype not in allowed:
        hint = " (q8_0 is a GGUF type: use --format gguf)" if dtype == "q8_0" else ""
        raise ExportError(f"--dtype {dtype!r} for --format {fmt}: allowed: {', '.join(allowed)}{hint}")
    return dtype


def _check_out(ref, fmt: str, out: Path, dtype: str | None, overwrite: bool) -> Path:
    if fmt == "gguf":
        if out.is_dir():
            out = out / f"{short_name(ref)}-{dtype}.gguf"
        elif out.suffix.lower() != ".gguf":
            raise ExportError(f"--out {out}: a GGUF export is one file; give a path ending in .gguf (or a folder)")
    elif out.is_file():
        raise ExportError(f"--out {out} is a file; --format {fmt} writes a folder")
    source = model_folder(ref)
    if source is not None and out.resolve() == source.resolve():
        raise ExportError(f"--out {out} is the model being exported; give another path")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists: give another path, or --overwrite to replace it")
    return out


@contextlib.contextmanager
def _staged(out: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``out``; on success it replaces ``out``, on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem if suffix else out.name}.tmp-{os.getpid()}{suffix}"
    _remove(tmp)
    try:
        yield tmp
        _remove(out)  # --overwrite was checked before anything loaded
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _raise_if_failed(checks: list[Check], out: Path) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ExportCheckFailed(f"the export to {out} did not load back equal to its source, so it was not kept:\n"
                                + "\n".join(f"  {c}" for c in checks))


def _merged(src: Source, verify: bool, progress) -> tuple[object, torch.Tensor | None, torch.Tensor, list[Check]]:
    """(model with adapters merged, the source's probe logits or None, probe ids, checks so far)."""
    ids = probe_ids(src.tokenizer)
    reference = logits(src.model, ids) if verify else None
    checks = []
    if src.is_adapter:
        progress("merging the LoRA adapter into the base weights (checked for NaN/inf before it is kept)")
        model = merge_adapter(src.model)
        if verify:
            checks.append(compare_logits(reference, logits(model, ids), "merged vs unmerged (in memory)"))
    else:
        model = src.model
    return model, reference, ids, checks


def _manifest(src: Source, fmt: str, dtype: str | None) -> dict:
    from .. import __version__

    return {"format": fmt, "dtype": dtype, "exported_from": src.ref, "method": src.manifest.get("method"),
            "merged_adapter": src.is_adapter, "base_model": src.manifest.get("base_model"),
            "tunesmith_version": __version__}


# ---------------------------------------------------------------- hf


def _export_hf(src: Source, out: Path, dtype: str, verify: bool, progress) -> ExportResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import MANIFEST

    model, reference, ids, checks = _merged(src, verify, progress)
    eos = fix_generation_config(model, src.tokenizer)
    round_weights_(model, "hf", dtype)  # values the dtype holds exactly: the cast below loses nothing more
    with _staged(out) as tmp:
        progress(f"writing safetensors ({dtype}), tokenizer, chat template and generation config")
        buffers = {name: b.clone() for name, b in model.named_buffers()}  # e.g. rotary inv_freq, not saved
        model.to(HF_DTYPES[dtype]).save_pretrained(tmp)
        model.float()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])  # unrounded, as a loaded model recomputes them
        src.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(src, "hf-model", dtype), indent=2) + "\n", encoding="utf-8")
        if verify:
            progress("loading it back with transformers.AutoModelForCausalLM")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            checks += _read_back_checks(reference, logits(model, ids), logits(reloaded, ids), dtype, "reloaded folder")
            checks.append(compare_tokenizers(src.tokenizer, AutoTokenizer.from_pretrained(tmp)))
            checks.append(_stop_check(reloaded.generation_config.eos_token_id, src.tokenizer))
            _raise_if_failed(checks, out)
    return ExportResult(out, "hf", dtype, 0.0, checks, eos)


def _read_back_checks(source: torch.Tensor, expected: torch.Tensor, got: torch.Tensor, dtype: str,
                      what: str) -> list[Check]:
    """The check against the source with its weights rounded as stored, and the dtype's cost, reported."""
    if dtype == "f32":
        return [compare_logits(source, got, f"{what} vs the source")]
    return [compare_logits(expected, got, f"{what} vs the source with weights rounded to {dtype} as stored"),
            dtype_effect(source, got, dtype)]


def _stop_check(eos, tokenizer) -> Check:
    eos = eos if isinstance(eos, list) else [eos]
    eot = end_of_turn_id(tokenizer)
    names = [tokenizer.convert_ids_to_tokens(i) for i in eos if i is not None]
    ok = bool(names) and (eot is None or eot in eos)
    return Check("generation stops", ok, f"generation_config.eos_token_id = {eos} ({', '.join(names)})"
                 + ("" if ok else "; the end-of-turn token is missing"))


# ---------------------------------------------------------------- gguf


def _export_gguf(src: Source, out: Path, dtype: str, verify: bool, progress) -> ExportResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf import check_supported

    model, reference, ids, checks = _merged(src, verify, progress)
    check_supported(model)  # before any time is spent writing
    eos = fix_generation_config(model, src.tokenizer)
    with _staged(out, suffix=".gguf") as tmp:
        progress(f"writing GGUF ({dtype}) with the tokenizer and chat template")
        write_gguf(model, src.tokenizer, tmp, dtype=dtype, name=src.name, source_gguf=src.source_gguf)
        if verify:
            progress("loading it back with transformers' GGUF loader")
            gguf_tok = AutoTokenizer.from_pretrained(tmp.parent, gguf_file=tmp.name)
            checks.append(compare_tokenizers(src.tokenizer, gguf_tok))
            reloaded = AutoModelForCausalLM.from_pretrained(tmp.parent, gguf_file=tmp.name, dtype=torch.float32).eval()
            expected = logits(round_weights_(model, "gguf", dtype), ids)  # the model is not needed unrounded any more
            checks += _read_back_checks(reference, expected, logits(reloaded, ids), dtype, "GGUF read back")
            _raise_if_failed(checks, out)
    return ExportResult(out, "gguf", dtype, 0.0, checks, eos)


# ---------------------------------------------------------------- adapter


def _export_adapter(ref, out: Path, verify: bool, progress) -> ExportResult:
    folder = model_folder(ref)
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise ExportError(f"{ref} is not a LoRA run or adapter folder (no adapter_config.json): --format adapter "
                          "needs a run trained with method.name: lora; full and freeze runs export with --format "
                          "hf or --format gguf")
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    checks: list[Check] = []
    with _staged(out) as tmp:
        progress("copying the adapter, its tokenizer and chat template")
        shutil.copytree(folder, tmp)
        if verify:
            progress("loading it back with peft.PeftModel.from_pretrained on its base model")
            checks.extend(_check_adapter(folder, tmp, base))
            _raise_if_failed(checks, out)
    return ExportResult(out, "adapter", None, 0.0, checks, base_model=base)


def _check_adapter(folder: Path, copy: Path, base: str | None) -> list[Check]:
    """The copy put on a plain base model with plain PEFT gives the run's logits exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import load_for_inference

    source, tok = load_for_inference(folder, dtype=torch.float32, device="cpu")
    ids = probe_ids(tok)
    reference = logits(source, ids)
    del source
    if base and Path(base).is_dir():
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), copy)
        how = "PeftModel.from_pretrained(base, adapter)"
    else:  # the base is not a local folder (a hub id, or a cleared cache): tunesmith finds it
        loaded, _ = load_for_inference(copy, dtype=torch.float32, device="cpu")
        how = "adapter loaded by tunesmith"
    return [compare_logits(reference, logits(loaded.eval(), ids), f"{how} vs the run"),
            compare_tokenizers(tok, AutoTokenizer.from_pretrained(copy))]
