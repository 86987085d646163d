"""Aspect-ratio buckets: images trained at their own shape, about the target pixel area, without a forced square crop.

NovelAI's bucketing (2022), as kohya-ss sd-scripts and SimpleTuner do it: a list of (height, width) buckets whose sides
are multiples of ``step`` (the model's downscale factor, so every bucket maps to a whole latent and UNet grid) and whose
area is at most the target (resolution x resolution), from square out to ``max_aspect``; each image goes to the bucket
nearest its aspect ratio (in log ratio: 2:1 and 1:2 are as far from square), is resized to cover it and cropped by the
remainder only. A micro-batch holds images of one bucket (one tensor shape); ``bucket_order`` makes an epoch of such
groups from the seed and the epoch alone, so a resumed run recomputes it.

The crop is reported as SDXL's micro-conditioning wants it (diffusers' train_text_to_image_sdxl.py): the original
size (height, width) and the crop's top-left corner (top, left) in the resized image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_ASPECT = 2.0


@dataclass(frozen=True)
class Crop:
    """Where a target (height, width) was cut from an image: the size it was resized to and the crop's corner."""

    original: tuple[int, int]  # (height, width) before resizing
    resized: tuple[int, int]  # (height, width) after resizing to cover the target
    top: int
    left: int
    flipped: bool = False

    def top_left(self, width: int) -> tuple[int, int]:
        """(top, left) of the crop in the resized image as trained: mirrored when the crop was flipped (the place the
        same pixels have in the flipped image, as diffusers' SDXL script, which flips before cropping, reports it)."""
        return (self.top, self.resized[1] - self.left - width) if self.flipped else (self.top, self.left)


def make_buckets(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(height, width) buckets of at most resolution**2 pixels, sides multiples of ``step``, long side / short side at
    most ``max_aspect``: for each width the tallest height that fits, in both orientations; the square (resolution
    rounded down to ``step``) always among them. Sorted by aspect ratio (tall to wide)."""
    if step < 1 or resolution < step:
        raise ValueError(f"bucket step {step} must be between 1 and the resolution {resolution}")
    area = resolution * resolution
    found = {((resolution // step) * step,) * 2}
    for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):  # wider ones break max_aspect
        height = (area // width // step) * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            found |= {(height, width), (width, height)}  # both orientations (kohya-ss's make_bucket_resolutions)
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[1]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket nearest the aspect ratio of an image of ``size`` (width, height), in log ratio; ties
    go to the larger bucket area, then to the earlier bucket."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (round(abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), 12),
                                                   -buckets[i][0] * buckets[i][1], i))


def cover_crop(size: tuple[int, int], target: tuple[int, int], *, center: bool = True,
               rng: torch.Generator | None = None) -> Crop:
    """Resize an image of ``size`` (width, height) to cover ``target`` (height, width) keeping its aspect ratio, then
    crop the remainder: at the centre, or at offsets drawn from ``rng`` (top, then left). For a square target this is
    torchvision's Resize(int) then CenterCrop / RandomCrop, as diffusers' training scripts prepare images."""
    w, h = size
    th, tw = target
    if tw / w >= th / h:  # the width binds: it becomes the target's, the height follows (rounded down, as Resize)
        new_w, new_h = tw, max(th, int(tw * h / w))
    else:
        new_w, new_h = max(tw, int(th * w / h)), th
    if center:
        top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
    else:
        top = int(torch.randint(0, new_h - th + 1, (1,), generator=rng))
        left = int(torch.randint(0, new_w - tw + 1, (1,), generator=rng))
    return Crop((h, w), (new_h, new_w), top, left)


def bucket_order(buckets: list[int], micro: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """An epoch order of example indices in runs of ``micro`` from one bucket each (``buckets[i]``: example i's).

    Each bucket's examples are shuffled (seeded by seed, epoch and the bucket) and cut into groups of ``micro``; a
    bucket's last, partial group is filled with its own first examples again (so no example is left out of an epoch
    and every group is whole: a micro-batch never mixes shapes, and the loop's cut into micro-batches, processes and
    steps falls on group boundaries); then the groups are shuffled. Depends only on the arguments, so a resumed run
    recomputes it. Without ``shuffle``: file order within each bucket, buckets in order."""
    members: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        members.setdefault(b, []).append(i)
    groups = []
    for b in sorted(members):
        idx = members[b]
        if shuffle:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + b + 31)
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        padded = idx + [idx[j % len(idx)] for j in range(-len(idx) % micro)]
        groups += [padded[k:k + micro] for k in range(0, len(padded), micro)]
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_877)
        groups = [groups[j] for j in torch.randperm(len(groups), generator=g).tolist()]
    return [i for grp in groups for i in grp]


def epoch_examples(buckets: list[int], micro: int) -> int:
    """Examples in one epoch of ``bucket_order``: each bucket rounded up to whole groups."""
    counts: dict[int, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return sum(math.ceil(n / micro) * micro for n in counts.values())


def size_issues(records: list, buckets: list[tuple[int, int]]) -> list:
    """E040 under buckets: an image smaller than its bucket on either side (it would be enlarged). A wide image may be
    shorter than the resolution and still fill its wide bucket."""
    from .errors import Issue

    issues = []
    for r in records:
        h, w = buckets[nearest_bucket(r.size, buckets)]
        if r.size[0] < w or r.size[1] < h:
            issues.append(Issue("E040", f"{r.path.name} is {r.size[0]}x{r.size[1]}, smaller than its aspect-ratio bucket "
                                        f"{w}x{h}: give an image at least that large", str(r.path)))
    return issues
