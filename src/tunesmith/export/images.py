"""Export a text-to-image model: a whole diffusers pipeline folder (LoRA merged), or the LoRA file alone.

- ``diffusers``: the tuned pipeline with its LoRA fused into the weights (diffusers' ``fuse_lora``, then the adapters
  unloaded; every tensor checked for NaN/inf before anything is written), saved with ``save_pretrained``: a folder
  ``DiffusionPipeline.from_pretrained`` loads with no tunesmith and no PEFT. A full or freeze run's pipeline is saved as
  it is.
- ``adapter``: the run's ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format) and tunesmith.json naming the
  base, the folder ``pipe.load_lora_weights`` reads; ``--style kohya|comfyui|all`` writes the same LoRA in kohya-ss /
  A1111's and ComfyUI's key layouts instead or as well (lora_formats.py), each loaded back its users' way and checked.

As for language models (exporting.py), each export is written under a temporary name next to ``out``, loaded back the
way its users will load it, and renamed into place only if it draws the run's images: the same prompts and seeds, the
tuned model (a run's best/, as ``load_tuned_pipeline`` loads it) against the export. The LoRA file on a plain base must
draw the very same pixels; a merged pipeline sums W + BA once instead of at every call, which may move a pixel by a
level or two after the sampler's steps (``PIXEL_TOLERANCE``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .verify import Check

IMAGE_FORMATS = ("diffusers", "adapter")
PIXEL_TOLERANCE = 4  # most a pixel channel (0-255) of a merged pipeline's image may move from the unmerged one's
PROBE_PROMPTS = ["two small red circles on a blue background", "a big yellow triangle on a white background"]
PROBE_SEEDS = [0, 1]


def export_image_model(ref, folder: Path, fmt: str, out: Path, *, dtype: str | None, overwrite: bool, verify: bool,
                       progress, style: str | None = None):
    """Write the text-to-image model in ``folder`` (what ``ref`` names) as ``fmt`` at ``out``; see the module."""
    from .exporting import ExportResult, _check_out

    if fmt == "gguf":
        raise ExportError(f"{ref} is a text-to-image model, and GGUF files hold language models for llama.cpp: export "
                          "it with --format diffusers (a whole pipeline folder, LoRA merged) or --format adapter (its "
                          "LoRA weights)")
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"--format {fmt!r} for a text-to-image model: allowed: {', '.join(IMAGE_FORMATS)} (hf is a "
                          "transformers language-model folder; diffusers is the pipeline folder)")
    if dtype not in (None, "f32"):
        raise ExportError(f"--dtype {dtype!r} for a text-to-image export: the weights are written as trained (f32); "
                          "load them with DiffusionPipeline.from_pretrained(folder, dtype=torch.float16) for half "
                          "precision")
    if style is not None and fmt != "adapter":
        raise ExportError(f"--style {style} names a LoRA file layout: it goes with --format adapter")
    from .lora_formats import styles

    chosen = styles(style or "diffusers")  # checked before anything loads
    out = _check_out(ref, fmt, out, dtype, overwrite)
    if fmt == "diffusers":
        path, checks, base = _export_pipeline(folder, out, verify, progress)
    else:
        path, checks, base = _export_lora(folder, out, verify, progress, chosen, every=style == "all")
    return ExportResult(path, fmt, "f32" if fmt == "diffusers" else None, 0.0, checks, base_model=base,
                        kind="text-to-image")


def _export_pipeline(folder: Path, out: Path, verify: bool, progress):
    from ..models.diffusion import is_pipeline, load_pipeline, load_tuned_pipeline, lora_components
    from .exporting import _raise_if_failed, _staged

    progress(f"loading {folder}")
    pipe = load_tuned_pipeline(folder)
    settings = _settings(folder)
    reference = draw(pipe, settings) if verify else None
    checks: list[Check] = []
    lora = not is_pipeline(folder)
    if lora:
        progress("fusing the LoRA weights into the pipeline (checked for NaN/inf before it is kept)")
        parts = [getattr(pipe, n) for n in lora_components(pipe)]
        pipe.fuse_lora(components=lora_components(pipe), lora_scale=1.0)
        pipe.unload_lora_weights()
        bad = [n for m in parts for n, p in m.named_parameters()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad or any(has_lora_module(m) for m in parts):
            raise ExportError(f"after fusing the LoRA, {len(bad)} tensors hold NaN or inf (e.g. {bad[:1]}) or "
                              "adapters are left; nothing was written")
        if verify:
            checks.append(compare_images(reference, draw(pipe, settings), "merged vs the run (in memory)",
                                         PIXEL_TOLERANCE))
    with _staged(out) as tmp:
        progress("writing the pipeline folder (safetensors)")
        pipe.save_pretrained(tmp, safe_serialization=True)
        _write_manifest(tmp, folder, "diffusers-pipeline", merged=lora)
        if verify:
            progress("loading it back with diffusers.DiffusionPipeline.from_pretrained")
            checks.append(compare_images(reference, draw(load_pipeline(tmp), settings),
                                         "reloaded pipeline folder vs the run", PIXEL_TOLERANCE if lora else 0))
            _raise_if_failed(checks, out)
    return out, checks, _manifest(folder).get("base_model")


def has_lora_module(module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def _export_lora(folder: Path, out: Path, verify: bool, progress, chosen=("diffusers",), every: bool = False):
    """The LoRA in each chosen layout, each loaded back and checked. ``every`` (``--style all``): a layout this
    family's file cannot be written in, or read back for the check, is left out with the reason as an info line
    (the diffusers one is always written); a style named alone is refused instead."""
    from ..models import MANIFEST
    from ..models.diffusion import LORA_FILE, is_pipeline, load_pipeline, load_tuned_pipeline
    from ..models.resolver import ensure_local
    from .exporting import _raise_if_failed, _staged

    if is_pipeline(folder) or not (folder / LORA_FILE).is_file():
        raise ExportError(f"{folder} is a whole pipeline, not a LoRA run (no {LORA_FILE}): --format adapter needs a "
                          "run trained with method.name: lora; full and freeze runs export with --format diffusers")
    base = _manifest(folder).get("base_model")
    checks: list[Check] = []
    from .lora_formats import load_style, write_style

    with _staged(out) as tmp:
        progress(f"writing the LoRA as {', '.join(chosen)} and {MANIFEST}")
        tmp.mkdir(parents=True)
        files = {}
        for s in chosen:
            try:
                files[s] = write_style(s, folder / LORA_FILE, tmp, ensure_local(base))
            except ExportError as e:
                if not every or s == "diffusers":
                    raise
                checks.append(Check(f"--style {s}", True, f"not written: {e}", info=True))
        if verify:
            settings = _settings(folder)
            reference = draw(load_tuned_pipeline(folder), settings)
            for s in list(files):
                progress(f"loading the {s} file back on a plain base pipeline")
                plain = load_pipeline(ensure_local(base))
                try:
                    how = load_style(plain, s, tmp)
                except ExportError as e:
                    if not every or s == "diffusers":
                        raise
                    (tmp / files.pop(s)).unlink()
                    checks.append(Check(f"--style {s}", True, f"not written: {e}", info=True))
                    continue
                checks.append(compare_images(reference, draw(plain, settings), f"{files[s]}: {how} on the base vs "
                                             "the run", 0))
            _raise_if_failed(checks, out)
        _write_manifest(tmp, folder, "diffusers-lora" if "diffusers" in files else "lora", merged=False,
                        lora_files=files)
    return out, checks, base


# ---------------------------------------------------------------- drawing and comparing


def _settings(folder: Path):
    from ..evaluate.image_cli import run_settings

    return run_settings(folder)[0]


def draw(pipe, settings) -> np.ndarray:
    """The probe images (uint8, (N, H, W, 3)): fixed prompts and seeds, the run's sampler steps and guidance."""
    from ..evaluate.images import generate_images

    prompts = list(settings.validation_prompts[:2]) or PROBE_PROMPTS
    seeds = [s for _ in prompts for s in PROBE_SEEDS]
    return generate_images(pipe, [p for p in prompts for _ in PROBE_SEEDS], seeds, steps=settings.inference_steps,
                           guidance=settings.guidance_scale)


def compare_images(reference: np.ndarray, other: np.ndarray, what: str, tolerance: int) -> Check:
    """Pass when no pixel channel differs by more than ``tolerance`` levels (of 255)."""
    if reference.shape != other.shape:
        return Check(what, False, f"images of shape {tuple(other.shape)} != {tuple(reference.shape)}")
    diff = np.abs(reference.astype(np.int16) - other.astype(np.int16))
    same = float((diff == 0).mean())
    return Check(what, int(diff.max()) <= tolerance, f"{len(reference)} images for fixed prompts and seeds: max "
                 f"|Δpixel| {int(diff.max())} of 255 (tolerance {tolerance}), mean {float(diff.mean()):.3g}; "
                 f"{same:.1%} of pixel values equal")


def _manifest(folder: Path) -> dict:
    from ..models import MANIFEST

    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_manifest(tmp: Path, folder: Path, fmt: str, merged: bool, lora_files: dict | None = None) -> None:
    from .. import __version__
    from ..models import MANIFEST

    src = _manifest(folder)
    doc = {"format": fmt, "kind": "text-to-image", "exported_from": str(folder), "method": src.get("method"),
           "merged_adapter": merged, "base_model": src.get("base_model"), "pipeline": src.get("pipeline"),
           "tunesmith_version": __version__} | ({"lora_files": lora_files} if lora_files else {})
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
