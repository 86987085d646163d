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
    device = next(pipe.unet.parameters()).device
    extra = {"clean_caption": False} if type(pipe).__name__.startswith("IF") else {}  # IF's cleaning needs bs4, ftfy
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    out = []
    try:
        for b in range(0, len(prompts), batch_size):
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[b:b + batch_size]]
            images = pipe(list(prompts[b:b + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="np", **extra).images  # (B, H, W, 3) in [0, 1]
            out.append(np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8))
    finally:
        pipe.unet.train(was_training)
        pipe.text_encoder.train(was_training)
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
