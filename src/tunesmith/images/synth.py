"""Seeded procedural images with captions: the built-in image model's world.

Every image is one `Scene`: a count (1-3) of same-shaped, same-coloured, same-sized objects on a plain background,
and for a single object sometimes a stated position. The scene is the attribute record; `caption()` is its text and
`render()` its pixels, drawn at 4x and box-filtered down so edges are anti-aliased like a real photo's. The detector
(`tunesmith.images.detector`) reads an image back into the same attributes.

A shape and a colour are in the vocabulary but HELD OUT of pre-training (`HELD_OUT`): the base model has never seen
them, so fine-tuning has something real to teach. `write_dataset` writes a fine-tuning folder for such a concept in
the formats tunesmith reads (images with same-named .txt captions, and metadata.jsonl with file_name/text).

Geometry is defined on a 32x32 grid (`GRID`) and scaled to the resolution asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GRID = 32  # geometry below is in pixels of a 32x32 image; other resolutions scale it
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges

# RGB of each colour word. Far apart (>= 110 in RGB distance) so the detector's nearest-colour masks are unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
REPLAY_SEED = 2_000_003  # offset of write_dataset's replay scenes (pre-training draws from seeds (seed, step), measuring from 1_000_003)
HELD_OUT = {"shape": "cross", "colour": "purple"}  # never drawn, never named, in pre-training
TRAIN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT["shape"])
TRAIN_COLOURS = tuple(c for c in COLOURS if c != HELD_OUT["colour"])

SIZES = {"small": (7, 9), "large": (11, 13)}  # side of an object's bounding box on the grid, inclusive range
SIZE_THRESHOLD = 10.0  # the detector's small/large boundary on the grid, between the two ranges
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom", "middle")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}
GAP = 3  # at least this many grid pixels between two objects' boxes, so they stay separate components

VOCABULARY = tuple(dict.fromkeys(
    [*COUNT_WORDS.values(), *SIZES, *COLOURS, *SHAPES, *PLURALS.values(),
     *" ".join(POSITION_PHRASES.values()).split(), "on", "a", "background"]))


@dataclass(frozen=True)
class Obj:
    """One object: centre (cx, cy) and side of its square bounding box, in grid pixels."""

    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Scene:
    """The attribute record of one image (what its caption states and how it was drawn)."""

    shape: str
    colour: str
    size: str
    count: int
    background: str
    position: str | None  # stated in the caption (single objects only), else None
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        where = f" {POSITION_PHRASES[self.position]}" if self.position else ""
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun}{where} on a {self.background} background"

    def attributes(self) -> dict:
        """What the caption states (the keys the detector reads back), without the drawing details."""
        out = {"shape": self.shape, "colour": self.colour, "size": self.size, "count": self.count,
               "background": self.background}
        if self.position:
            out["position"] = self.position
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "objects": [asdict(o) for o in self.objects]}


def parse_caption(text: str) -> dict:
    """The attributes a caption in this grammar states; ValueError naming the caption when it is not one."""
    words = text.lower().strip().split()
    try:
        count = {w: n for n, w in COUNT_WORDS.items()}[words[0]]
        size, colour, noun = words[1], words[2], words[3]
        shape = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}[noun]
        rest = " ".join(words[4:])
        position = next((p for p, phrase in POSITION_PHRASES.items() if rest.startswith(phrase + " ")), None)
        if position:
            rest = rest[len(POSITION_PHRASES[position]) + 1:]
        assert rest.startswith("on a ") and rest.endswith(" background")
        background = rest[len("on a "):-len(" background")]
        assert size in SIZES and colour in COLOURS and background in COLOURS
    except (KeyError, IndexError, AssertionError):
        raise ValueError(f"not a caption of the synthetic image grammar: {text!r}") from None
    out = {"shape": shape, "colour": colour, "size": size, "count": count, "background": background}
    if position:
        out["position"] = position
    return out


# ----------------------------------------------------------------------------------------------------------- sampling
def _place(rng: np.random.Generator, count: int, side_range: tuple[int, int], position: str | None) -> tuple[Obj, ...]:
    """Object boxes that fit in the image with GAP between them; a stated position puts the one object there."""
    c = GRID / 2
    for _ in range(100):
        objs: list[Obj] = []
        for _ in range(count):
            side = float(rng.integers(side_range[0], side_range[1] + 1))
            lo, hi = side / 2 + 1, GRID - side / 2 - 1  # 1 pixel margin to the edge
            if position is None:
                cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            else:
                # far along one axis (>= 7 from the centre), near the centre on the other (<= 2): the detector's
                # rule (the larger offset decides, "middle" under 4) reads it back without ambiguity
                far = rng.uniform(min(7.0, c - lo), c - lo)
                near = rng.uniform(-2.0, 2.0)
                cx, cy = {"left": (c - far, c + near), "right": (c + far, c + near), "top": (c + near, c - far),
                          "bottom": (c + near, c + far), "middle": (c + near, c + rng.uniform(-2.0, 2.0))}[position]
            o = Obj(round(cx, 2), round(cy, 2), side)
            if all(abs(o.cx - p.cx) >= (o.side + p.side) / 2 + GAP or abs(o.cy - p.cy) >= (o.side + p.side) / 2 + GAP
                   for p in objs):
                objs.append(o)
            else:
                break
        if len(objs) == count:
            return tuple(objs)
    # Crowded (three large objects): one object in each of `count` quadrants, kept GAP/2 from the quadrant's inner
    # edges and 1 pixel from the image's edges.
    cells = rng.permutation(4)[:count]
    objs = []
    for cell in cells:
        side = float(rng.integers(side_range[0], side_range[1] + 1))
        near, far = (1 + side / 2, c - GAP / 2 - side / 2), (c + GAP / 2 + side / 2, GRID - 1 - side / 2)
        lo_x, hi_x = near if cell % 2 == 0 else far
        lo_y, hi_y = near if cell < 2 else far
        objs.append(Obj(round(rng.uniform(lo_x, hi_x), 2), round(rng.uniform(lo_y, hi_y), 2), side))
    return tuple(objs)


def sample_scene(rng: np.random.Generator, *, shapes=TRAIN_SHAPES, colours=TRAIN_COLOURS,
                 backgrounds=TRAIN_COLOURS, p_position: float = 0.5, **fixed) -> Scene:
    """A random scene; `fixed` pins attributes (shape=, colour=, size=, count=, background=, position=)."""
    shape = fixed.get("shape") or shapes[rng.integers(len(shapes))]
    colour = fixed.get("colour") or colours[rng.integers(len(colours))]
    bgs = [b for b in backgrounds if b != colour]
    background = fixed.get("background") or bgs[rng.integers(len(bgs))]
    size = fixed.get("size") or ("small", "large")[rng.integers(2)]
    count = fixed.get("count") or int(rng.integers(1, 4))
    if "position" in fixed:
        position = fixed["position"]
    else:
        position = POSITIONS[rng.integers(len(POSITIONS))] if count == 1 and rng.random() < p_position else None
    if background == colour:
        raise ValueError(f"the background must differ from the shape's colour ({colour})")
    if position is not None and count != 1:
        raise ValueError("a position is stated for single objects only")
    return Scene(shape, colour, size, count, background, position, _place(rng, count, SIZES[size], position))


def sample_scenes(n: int, seed: int, **kwargs) -> list[Scene]:
    """n scenes from one seeded generator (the same seed gives the same scenes)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------- rendering
def shape_polygon(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]] | None:
    """The outline of a polygonal shape in the box (x0, y0, side); None for a circle (an ellipse)."""
    x1, y1 = x0 + side, y0 + side
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # apex up, base at the bottom
        return [(x0 + side / 2, y0), (x1, y1), (x0, y1)]
    if shape == "cross":  # a plus sign, arms a third of the side wide
        a, b = x0 + side / 3, x0 + 2 * side / 3
        c, d = y0 + side / 3, y0 + 2 * side / 3
        return [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d), (x0, c), (a, c)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float], scale: float, fill) -> None:
    """Draw one shape into `draw`, its box (x0, y0, side) given on the grid and multiplied by `scale`."""
    x0, y0, side = (v * scale for v in box)
    poly = shape_polygon(shape, x0, y0, side)
    if poly is None:
        draw.ellipse([x0, y0, x0 + side, y0 + side], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, resolution: int = GRID) -> Image.Image:
    """The scene as an RGB image of resolution x resolution pixels."""
    big = resolution * SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    scale = big / GRID
    for o in scene.objects:
        draw_shape(draw, scene.shape, (o.cx - o.side / 2, o.cy - o.side / 2, o.side), scale, COLOURS[scene.colour])
    return img.resize((resolution, resolution), Image.BOX)


def render_batch(scenes: list[Scene], resolution: int = GRID) -> np.ndarray:
    """Images as a uint8 array (N, H, W, 3)."""
    return np.stack([np.asarray(render(s, resolution)) for s in scenes])


# --------------------------------------------------------------------------------------------- prompts and datasets
def heldout_scene(rng: np.random.Generator, concept: str, p_position: float = 0.5) -> Scene:
    """A scene that shows the held-out `concept` (a shape or colour word, or "both")."""
    if concept == HELD_OUT["shape"]:
        return sample_scene(rng, shape=concept, p_position=p_position)
    if concept == HELD_OUT["colour"]:
        return sample_scene(rng, colour=concept, p_position=p_position)
    if concept == "both":
        return sample_scene(rng, shape=HELD_OUT["shape"], colour=HELD_OUT["colour"], p_position=p_position)
    raise ValueError(f"unknown held-out concept {concept!r}; known: {HELD_OUT['shape']}, {HELD_OUT['colour']}, both")


def heldout_scenes(concept: str, n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [heldout_scene(rng, concept) for _ in range(n)]


def write_dataset(out: str | Path, concept: str, n: int = 40, seed: int = 0, resolution: int = GRID,
                  replay: int = 0) -> Path:
    """A fine-tuning folder teaching a held-out concept: NNNN.png + NNNN.txt (its caption), metadata.jsonl
    (file_name, text: the Hugging Face imagefolder form) and attributes.jsonl (each image's full Scene record).

    ``replay`` adds that many scenes of what the model already knows (replay-NNNN.png, drawn from the seeded world
    with another stream than pre-training's): rehearsal, so that learning the new concept does not overwrite the old
    ones (with crosses alone, full fine-tuning drew crosses for every shape)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(max(n, replay) - 1)))
    named = [(f"{i:0{width}d}.png", s) for i, s in enumerate(heldout_scenes(concept, n, seed))]
    if replay:
        named += [(f"replay-{i:0{width}d}.png", s) for i, s in enumerate(sample_scenes(replay, seed + REPLAY_SEED))]
    with open(out / "metadata.jsonl", "w") as meta, open(out / "attributes.jsonl", "w") as attrs:
        for name, scene in named:
            render(scene, resolution).save(out / name)
            (out / name).with_suffix(".txt").write_text(scene.caption() + "\n")
            meta.write(json.dumps({"file_name": name, "text": scene.caption()}) + "\n")
            attrs.write(json.dumps({"file_name": name, **scene.to_json()}) + "\n")
    return out


def colour_distance(a: str, b: str) -> float:
    return math.dist(COLOURS[a], COLOURS[b])
