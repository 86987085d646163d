"""Images from a text-to-image pipeline, each from a seed of its own; and how well they show their captions.

``generate_images`` gives every image its own ``torch.Generator`` (diffusers takes one per batch row), so an image
depends on its prompt, its seed and the weights alone, not on the batch it was drawn in: the evaluation grids of a run
compare across evaluations, base against tuned, and a resumed run draws what the uninterrupted one did.

``caption_accuracy`` reads images back with the built-in model's detector (tunesmith.images.detector) when every
caption is in the synthetic world's grammar; other captions have no deterministic reader (a CLIP score is the
measure there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                    batch_size: int = 16) -> np.ndarray:
    """uint8 images (N, H, W, 3), image i drawn for ``prompts[i]`` from ``seeds[i]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from ..models.diffusion import pipeline_denoiser

    nets = [m for m in (pipeline_denoiser(pipe), pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                        getattr(pipe, "text_encoder_3", None)) if m is not None]
    device = next(nets[0].parameters()).device
    extra = {"clean_caption": False} if type(pipe).__name__.startswith("IF") else {}  # IF's cleaning needs bs4, ftfy
    if type(pipe).__name__.startswith("Flux"):  # its default size is 128 x the VAE's factor: the VAE's is the model's
        extra = {"height": pipe.vae.config.sample_size, "width": pipe.vae.config.sample_size}
    was_training = [m.training for m in nets]  # each its own: a frozen T5 stays in eval mode while CLIP trains
    for m in nets:
        m.eval()
    out = []
    try:
        for b in range(0, len(prompts), batch_size):
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[b:b + batch_size]]
            images = pipe(list(prompts[b:b + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="np", **extra).images  # (B, H, W, 3) in [0, 1]
            out.append(np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8))
    finally:
        for m, mode in zip(nets, was_training):
            m.train(mode)
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def readable(captions: Sequence[str]) -> bool:
    """Whether the detector can judge these captions: all in the built-in model's caption grammar."""
    from ..images import synth

    try:
        for c in captions:
            synth.parse_caption(c)
    except ValueError:
        return False
    return bool(captions)


def caption_accuracy(images: np.ndarray, captions: Sequence[str]) -> list[bool] | None:
    """Per image, whether the detector reads back everything its caption says; None where it cannot judge."""
    if not readable(captions):
        return None
    from ..images import detector

    return [bool(r["all"]) for r in detector.score(list(images), list(captions))["rows"]]


def save_grid(images: np.ndarray, path: Path, columns: int) -> Path:
    """The images as one PNG, ``columns`` a row (the images of a prompt side by side), 2 pixels apart, scaled up to
    be seen (a 32-pixel image is shown at 96)."""
    from PIL import Image

    n, h, w, _ = images.shape
    scale = max(1, 96 // max(h, w))
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * (w * scale + 2), rows * (h * scale + 2)), "white")
    for i, im in enumerate(images):
        tile = Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, ((i % columns) * (w * scale + 2), (i // columns) * (h * scale + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def detector_comparison(base: np.ndarray, tuned: np.ndarray, prompts: Sequence[str], control: Sequence[str],
                        n: int) -> dict:
    """Base versus tuned images of the same prompts and seeds, read back by the detector: for ``prompts`` each side's
    accuracy, the mean paired difference and its bootstrap 95% CI; the same for ``control`` (drawn after them: what
    the base already drew, so a drop is an old concept lost). Images are ``n`` per prompt, prompt by prompt. Empty
    where the detector cannot judge the captions.
    Used by the end of a run (objectives/denoise) and by `tunesmith eval`."""
    from .compare import paired_bootstrap_ci

    k = len(prompts) * n
    captions = [p for p in prompts for _ in range(n)]
    out: dict = {}
    acc_b, acc_t = caption_accuracy(base[:k], captions), caption_accuracy(tuned[:k], captions)
    if acc_b is not None and acc_t is not None:
        diffs = np.asarray(acc_t, dtype=float) - np.asarray(acc_b, dtype=float)
        low, high = paired_bootstrap_ci(diffs)
        out |= {"what": "images the detector reads back as captioned", "base_accuracy": float(np.mean(acc_b)),
                "tuned_accuracy": float(np.mean(acc_t)), "diff": float(diffs.mean()), "ci_low": low, "ci_high": high,
                "judged_images": len(captions)}
        drawn_b, drawn_t = held_out_concept_rate(base[:k], captions), held_out_concept_rate(tuned[:k], captions)
        if drawn_b is not None and drawn_t is not None:
            out |= {"concept": drawn_t[0], "concept_base_rate": drawn_b[1], "concept_tuned_rate": drawn_t[1]}
    if control:
        cc = [c for c in control for _ in range(n)]
        cb, ct = caption_accuracy(base[k:], cc), caption_accuracy(tuned[k:], cc)
        if cb is not None and ct is not None:
            diffs = np.asarray(ct, dtype=float) - np.asarray(cb, dtype=float)
            low, high = paired_bootstrap_ci(diffs)
            out |= {"control_base_accuracy": float(np.mean(cb)), "control_tuned_accuracy": float(np.mean(ct)),
                    "control_diff": float(diffs.mean()), "control_ci_low": low, "control_ci_high": high,
                    "control_images": len(cc)}
    return out


def held_out_concept_rate(images: np.ndarray, captions: Sequence[str]) -> tuple[str, float] | None:
    """(concept, the fraction of images the detector reads as showing it) when every caption asks for the same concept
    the built-in model never saw in pre-training (its held-out shape or colour), whatever else the image gets right;
    None otherwise."""
    from ..images import detector, synth

    if not readable(captions):
        return None
    asked = {(key, synth.parse_caption(c)[key]) for c in captions for key in ("shape", "colour")
             if synth.parse_caption(c)[key] == synth.HELD_OUT[key]}
    if len(asked) != 1:
        return None
    key, concept = asked.pop()
    if not all(synth.parse_caption(c)[key] == concept for c in captions):
        return None
    rows = detector.score(list(images), list(captions))["rows"]
    return concept, float(np.mean([r["read"][key] == concept for r in rows]))


def detector_lines(figures: dict) -> list[str]:
    """``detector_comparison``'s figures as the lines a run's log and `tunesmith eval` print."""
    lines = []
    if "base_accuracy" in figures:
        f = figures
        lines.append(f"held-out captions drawn as captioned: base {f['base_accuracy']:.1%} -> tuned "
                     f"{f['tuned_accuracy']:.1%} (diff {f['diff']:+.1%}, 95% CI [{f['ci_low']:+.1%}, "
                     f"{f['ci_high']:+.1%}]; {f['judged_images']} images)")
    if "concept" in figures:
        lines.append(f"the held-out concept '{figures['concept']}' drawn: base {figures['concept_base_rate']:.1%} -> "
                     f"tuned {figures['concept_tuned_rate']:.1%} of the images")
    if "control_base_accuracy" in figures:
        f = figures
        lines.append(f"control captions (what the base drew): base {f['control_base_accuracy']:.1%} -> tuned "
                     f"{f['control_tuned_accuracy']:.1%} (diff {f['control_diff']:+.1%}, 95% CI "
                     f"[{f['control_ci_low']:+.1%}, {f['control_ci_high']:+.1%}]; {f['control_images']} images)")
    return lines
