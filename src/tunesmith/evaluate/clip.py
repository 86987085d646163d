"""CLIP score: how well images match their captions, by a CLIP model the user points to (a local folder).

The score of one image and its caption is torchmetrics' ``CLIPScore`` (Hessel et al. 2021, "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning", with w = 100):

    score(image, caption) = 100 * max(cos(E_image(image), E_text(caption)), 0)

with E_image and E_text CLIP's projected image and text embeddings; a set of images scores the mean. Written here
rather than taken from torchmetrics because torchmetrics is not a dependency for this one formula, and because
tunesmith needs the per-image scores (the paired bootstrap CI of base versus tuned), which CLIPScore averages away.
The folder holds a transformers ``CLIPModel`` and its processor (tokenizer + image processor), e.g. a download of
openai/clip-vit-base-patch32; captions longer than the text encoder's positions are cut, as torchmetrics cuts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models.errors import ModelError


class ClipScorer:
    """A CLIP model and processor loaded from ``folder``; ``scores(images, captions)`` per image."""

    def __init__(self, folder, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"--clip-model {folder}: not a transformers model folder (no config.json); give a folder "
                             "holding a CLIPModel and its processor, e.g. a download of openai/clip-vit-base-patch32")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"--clip-model {folder}: could not load a CLIPModel and CLIPProcessor: {e}") from None
        self.folder, self.device, self.batch_size = folder, torch.device(device), batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def scores(self, images: np.ndarray, captions: Sequence[str]) -> list[float]:
        """100 * max(cosine, 0) of each uint8 image (N, H, W, 3) with its caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out: list[float] = []
        for b in range(0, len(captions), self.batch_size):
            ims = [im for im in images[b:b + self.batch_size]]
            text = self.processor.tokenizer(list(captions[b:b + self.batch_size]), padding=True, truncation=True,
                                            max_length=self.max_length, return_tensors="pt").to(self.device)
            pixels = self.processor.image_processor(ims, return_tensors="pt")["pixel_values"].to(self.device)
            img = _features(self.model.get_image_features(pixel_values=pixels))  # (B, D)
            txt = _features(self.model.get_text_features(**text))  # (B, D)
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (B,)
            out += (100.0 * cos.clamp(min=0)).tolist()
        return out


def _features(value) -> torch.Tensor:
    """The projected embeddings: a tensor, or (newer transformers) an output whose pooler_output holds them."""
    return value if isinstance(value, torch.Tensor) else value.pooler_output


def clip_score(scorer: ClipScorer, images: np.ndarray, captions: Sequence[str]) -> float:
    """The mean CLIP score of the images with their captions (torchmetrics' CLIPScore over the set)."""
    return float(np.mean(scorer.scores(images, captions)))
