"""Read a synthetic-world image back into its attributes, deterministically, and score images against captions.

How an image is read (numpy only, no learned parts, so the figures it gives can be trusted and reproduced):
1. Colours: every pixel is given its nearest palette colour (`synth.COLOURS`). The background is the commonest colour
   on the image's border; the objects' colour is the commonest other colour among "pure" pixels (within
   PURE_DISTANCE of a palette colour: anti-aliased edges blend two colours and are left out of the vote).
2. Mask: a pixel is object where it is more than half way from the background colour to the object colour
   (projection onto the line between them), i.e. at least 50% covered.
3. Objects: 4-connected components of the mask, those under MIN_AREA pixels (grid scale) dropped as noise.
4. Shape features per object: its bounding box, fill ratio (area / box area), and the intersection-over-union of
   its mask with each shape's template drawn into the same box by the synth's own drawing code. The shape is the
   template with the best IoU if that IoU is at least MIN_IOU, else "unknown" (a blob matches no shape).
   Size is the longer box side against `synth.SIZE_THRESHOLD`; the position of a single object is read from its
   box centre (the larger offset from the image centre decides; "middle" when both are under MIDDLE_RADIUS).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from . import synth

PURE_DISTANCE = 60.0  # RGB distance to a palette colour under which a pixel votes for the objects' colour
MIN_AREA = 8  # grid pixels; smaller components are noise
MIN_IOU = 0.55  # below it against every template, an object's shape is "unknown"
MIDDLE_RADIUS = 4.0  # grid pixels
_PALETTE_NAMES = tuple(synth.COLOURS)
_PALETTE = np.array([synth.COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)


@dataclass
class Found:
    """One object read from an image (grid-scale box)."""

    shape: str
    size: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels: the best-fitting shape's box
    area: int  # pixels at least half covered
    fill: float  # area / area of those pixels' bounding box
    iou: dict[str, float]  # shape -> IoU with that shape's template


@dataclass
class Reading:
    """What the detector read from one image: the attributes a caption states, and the objects behind them."""

    shape: str | None  # the shape all objects share; "mixed" when they differ; None without objects
    colour: str | None
    size: str | None  # as shape
    count: int
    background: str
    position: str | None  # for a single object
    objects: list[Found] = field(default_factory=list)

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "count": self.count,
                "background": self.background, "position": self.position}


def _as_array(image) -> np.ndarray:
    """(H, W, 3) float32 RGB from a PIL image, a uint8 HWC array or a float CHW/HWC array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0.0, 1.0) * 255.0
    return arr.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an (N, 2) array of (y, x); written by hand
    because scipy is not a dependency (and at 32x32 a flood fill costs about a millisecond)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


# Area of each shape as a fraction of its box, and where its centroid lies below its box centre (fraction of side):
# what turns an object's total coverage and centroid into the box a shape hypothesis would have been drawn in.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}


def template(shape: str, box: tuple[float, float, float], window: tuple[int, int]) -> np.ndarray:
    """(h, w) coverage in [0, 1] of `shape` drawn by the synth's own code in box (x0, y0, side) (pixels, window
    coordinates) on a window of (h, w) pixels, anti-aliased the same way."""
    s = synth.SUPERSAMPLE
    h, w = window
    img = Image.new("L", (w * s, h * s), 0)
    synth.draw_shape(ImageDraw.Draw(img), shape, box, s, 255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def _read_object(pixels: np.ndarray, coverage: np.ndarray, scale: float) -> Found:
    """Fit each shape to one component: the box its total coverage and centroid imply, drawn as a template and
    compared with the observed coverage by soft IoU (sum of minima / sum of maxima)."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    H, W = coverage.shape
    pad = 2
    wy0, wx0 = max(0, ys.min() - pad), max(0, xs.min() - pad)
    wy1, wx1 = min(H, ys.max() + 1 + pad), min(W, xs.max() + 1 + pad)
    near = np.zeros((H, W), dtype=bool)  # the component grown by one pixel: its anti-aliased rim, not a neighbour
    near[ys, xs] = True
    near[1:] |= near[:-1].copy(); near[:-1] |= near[1:].copy(); near[:, 1:] |= near[:, :-1].copy(); near[:, :-1] |= near[:, 1:].copy()
    seen = (coverage * near)[wy0:wy1, wx0:wx1]  # (h, w)
    total = float(seen.sum())
    gy, gx = np.mgrid[wy0:wy1, wx0:wx1]
    cy, cx = float((seen * (gy + 0.5)).sum() / total), float((seen * (gx + 0.5)).sum() / total)
    iou, boxes = {}, {}
    for shape in synth.SHAPES:
        side = float(np.sqrt(total / _FILL[shape]))
        box = (cx - side / 2 - wx0, cy - side / 2 - _CENTROID_DROP[shape] * side - wy0, side)
        t = template(shape, box, seen.shape)
        iou[shape] = float(np.minimum(seen, t).sum() / np.maximum(seen, t).sum())
        boxes[shape] = (box[0] + wx0, box[1] + wy0, side)
    best = max(iou, key=iou.get)
    x0, y0, side = boxes[best]
    return Found(shape=best if iou[best] >= MIN_IOU else "unknown",
                 size="large" if side / scale > synth.SIZE_THRESHOLD else "small",
                 box=(round(x0, 2), round(y0, 2), round(x0 + side, 2), round(y0 + side, 2)), area=len(pixels),
                 fill=len(pixels) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)), iou=iou)


def _position(obj: Found, resolution: int, scale: float) -> str:
    x0, y0, x1, y1 = obj.box
    dx, dy = ((x0 + x1) / 2 - resolution / 2) / scale, ((y0 + y1) / 2 - resolution / 2) / scale
    if max(abs(dx), abs(dy)) < MIDDLE_RADIUS:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _agreed(values: list[str]) -> str | None:
    return None if not values else values[0] if len(set(values)) == 1 else "mixed"


def detect(image) -> Reading:
    """Read one square image (PIL, uint8 HWC array, or float array in [0, 1]) into a `Reading`."""
    arr = _as_array(image)
    resolution = arr.shape[0]
    scale = resolution / synth.GRID
    dist = np.sqrt(((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1))  # (H, W, K)
    label, near = dist.argmin(-1), dist.min(-1)
    border = np.concatenate([label[0], label[-1], label[1:-1, 0], label[1:-1, -1]])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    votes = label[(label != bg) & (near < PURE_DISTANCE)]
    if votes.size == 0:
        return Reading(None, None, None, 0, _PALETTE_NAMES[bg], None)
    fg = Counter(votes.tolist()).most_common(1)[0][0]
    # (H, W) fraction of the way from the background colour to the object colour
    axis = _PALETTE[fg] - _PALETTE[bg]
    t = ((arr - _PALETTE[bg]) @ axis) / float(axis @ axis)
    min_area = MIN_AREA * scale * scale
    coverage = np.clip(t, 0.0, 1.0)
    objects = [_read_object(p, coverage, scale) for p in _components(t > 0.5) if len(p) >= min_area]
    count = len(objects)
    return Reading(shape=_agreed([o.shape for o in objects]), colour=_PALETTE_NAMES[fg] if count else None,
                   size=_agreed([o.size for o in objects]), count=count, background=_PALETTE_NAMES[bg],
                   position=_position(objects[0], resolution, scale) if count == 1 else None, objects=objects)


def matches(reading: Reading, caption: str) -> dict[str, bool]:
    """For each attribute the caption states: whether the reading has it."""
    got = reading.attributes()
    return {k: got[k] == v for k, v in synth.parse_caption(caption).items()}


ATTRIBUTES = ("shape", "colour", "size", "count", "background", "position")


def score(images, captions: list[str]) -> dict:
    """How many images read back as captioned: per attribute (over the captions stating it), and all of them.

    Returns {"n": N, "all_correct": fraction, "per_attribute": {attr: fraction}, "rows": [per-image dicts]}."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    rows, hits, stated = [], Counter(), Counter()
    for image, caption in zip(images, captions):
        reading = detect(image)
        ok = matches(reading, caption)
        for k, v in ok.items():
            stated[k] += 1
            hits[k] += v
        rows.append({"caption": caption, "read": reading.attributes(), "correct": ok, "all": all(ok.values())})
    n = len(rows)
    return {"n": n, "all_correct": sum(r["all"] for r in rows) / n if n else 0.0,
            "per_attribute": {k: hits[k] / stated[k] for k in ATTRIBUTES if stated[k]}, "rows": rows}
