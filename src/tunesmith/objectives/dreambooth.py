"""DreamBooth's prior preservation (Ruiz et al. 2022): class images drawn once by the base model itself, cached.

Teaching a subject from a few images under "a photo of sks dog" also teaches the model that every dog looks like this
one (and forgets how to draw others): the class prompt collapses onto the subject. Prior preservation trains, beside
each subject image, on an image the base model drew for the class prompt ("a photo of a dog"), so the class keeps what
the base model knew. As diffusers' ``train_dreambooth.py``: ``num_class_images`` images drawn before training, each
training example a pair (subject image i mod n, class image i mod m) over max(n, m) examples, the pair's two images
in the same batch, and the loss instance + ``prior_loss_weight`` x prior.

The class images are drawn with the pipeline's own sampler (the evaluation's steps and guidance), image j from a
stream of ``class_seed`` of its own, and kept on disk under the cache folder keyed by everything that decides their
pixels: the base model's weights and scheduler, the prompt, the count, the seed and the sampler settings. The next
run with the same key reads them back instead of drawing them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..events import Message
from . import stream_seed

CLASS_FOLDER = "class-images"
MANIFEST = "manifest.json"
DRAW_BATCH = 16


def base_fingerprint(net) -> str:
    """A hash of the base model's weights (denoiser, text encoder, VAE) and its scheduler and pipeline classes. LoRA
    adapter tensors are left out and PEFT's ``base_layer`` names read as the plain ones, so a LoRA run and a full run
    of the same base agree."""
    h = hashlib.sha256()
    for part, module in (("unet", net.unet), ("text_encoder", net.text_encoder), ("vae", net.vae)):
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            if "lora_" in name:
                continue
            h.update(f"{part}.{name.replace('.base_layer', '')}".encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(dict(net.pipeline.scheduler.config), sort_keys=True, default=str).encode())
    h.update(type(net.pipeline).__name__.encode())
    return h.hexdigest()[:20]


def class_key(net, settings) -> str:
    """The cache key of a set of class images: base model, prompt, count, seed, sampler steps and guidance."""
    db = settings.dreambooth
    what = json.dumps({"model": base_fingerprint(net), "prompt": db.class_prompt, "count": db.num_class_images,
                       "seed": db.class_seed, "steps": settings.inference_steps,
                       "guidance": settings.guidance_scale}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:24]


def class_seed(seed: int, j: int) -> int:
    """The seed of class image j."""
    return stream_seed(seed, -3, j)


def class_images(net, pipe, settings, emit) -> list:
    """The ``num_class_images`` class images as ImageRecords (captioned with the class prompt): read from the cache
    when a run drew them before, else drawn now with ``pipe`` (the base pipeline) and written there."""
    from .. import models
    from ..data.images import ImageRecord, content_hash
    from ..data.example import Origin

    db = settings.dreambooth
    folder = models.cache_dir() / CLASS_FOLDER / class_key(net, settings)
    names = [f"{j:05d}.png" for j in range(db.num_class_images)]
    done = _complete(folder, names)
    if done is None:
        _draw(pipe, folder, names, settings, emit)
        done = _complete(folder, names)
        emit(Message("info", f"dreambooth: {len(names)} class images drawn by the base model for {db.class_prompt!r} "
                             f"({settings.inference_steps} steps, guidance {settings.guidance_scale:g}, seed "
                             f"{db.class_seed}), cached in {folder}"))
    else:
        emit(Message("info", f"dreambooth: {len(names)} class images for {db.class_prompt!r} from the cache {folder}"))
    return [ImageRecord(folder / n, db.class_prompt, Origin(str(folder / n), 1), {"class_image": j}, tuple(size),
                        "RGB", content_hash(folder / n) if sha is None else sha)
            for j, (n, size, sha) in enumerate(done)]


def _complete(folder: Path, names: list[str]) -> list[tuple[str, list[int], str | None]] | None:
    """(name, size, content hash) of every image when the folder holds the whole set (its manifest written last),
    else None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["images"]
    except (ValueError, KeyError):
        return None
    by_name = {row["file"]: row for row in listed}
    if any(n not in by_name or not (folder / n).is_file() for n in names):
        return None
    return [(n, by_name[n]["size"], by_name[n].get("sha256")) for n in names]


def _draw(pipe, folder: Path, names: list[str], settings, emit) -> None:
    """Draw the class images in batches, each PNG written under a temporary name and renamed, the manifest last (a
    set cut short by a crash is drawn again, never half read)."""
    from PIL import Image

    from ..data.images import content_hash
    from ..evaluate.images import generate_images

    db = settings.dreambooth
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    emit(Message("info", f"dreambooth: drawing {len(names)} class images for {db.class_prompt!r} with the base model"))
    for b in range(0, len(names), DRAW_BATCH):
        part = names[b:b + DRAW_BATCH]
        seeds = [class_seed(db.class_seed, b + i) for i in range(len(part))]
        with torch.no_grad():
            images = generate_images(pipe, [db.class_prompt] * len(part), seeds, steps=settings.inference_steps,
                                     guidance=settings.guidance_scale)  # (B, H, W, 3) uint8
        for name, pixels in zip(part, images):
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            Image.fromarray(pixels).save(tmp, format="PNG")
            os.replace(tmp, folder / name)
            rows.append({"file": name, "size": [int(pixels.shape[1]), int(pixels.shape[0])],
                         "sha256": content_hash(folder / name)})
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"prompt": db.class_prompt, "seed": db.class_seed, "steps": settings.inference_steps,
                               "guidance": settings.guidance_scale, "images": rows}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def pair_count(n_instance: int, settings) -> int:
    """Training examples per epoch: diffusers' DreamBooth dataset has max(instance images, class images) examples."""
    db = settings.dreambooth
    return max(n_instance, db.num_class_images) if db.with_prior else n_instance
