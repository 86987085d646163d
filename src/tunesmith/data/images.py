"""Captioned images for text-to-image fine-tuning: read, checked before a model loads, turned into tensors.

| layout                      | what tunesmith reads                                                              |
|-----------------------------|-----------------------------------------------------------------------------------|
| folder of images + .txt     | ``cat.png`` captioned by ``cat.txt`` next to it (subfolders too)                  |
| folder with metadata.jsonl  | rows ``{"file_name": "cat.png", "text": "..."}`` (Hugging Face imagefolder);      |
|                             | also ``metadata.csv`` / ``metadata.parquet``                                      |
| a .jsonl/.json/.csv/.parquet | rows naming an image (``file_name``, ``image``, ``image_path`` or ``path``,     |
|                             | relative to the file's folder) and a caption (``text``, ``caption`` or ``prompt``) |

Any other column of a row is kept in ``ImageRecord.extra``. Every image is opened, verified and decoded (a
truncated file is caught), its EXIF orientation applied and its mode converted to RGB the way ``load_rgb`` does
for training, so ``tunesmith check`` sees exactly what the model will. Every issue of every file is gathered
before anything raises, with file, line (row layouts) and code, as for text data; conversions, EXIF rotations and
duplicates are warnings that name the files.

``image_tensor`` follows diffusers' ``train_text_to_image.py``: resize the short side to the resolution (bilinear by
default, as there), center or random crop, optional random horizontal flip, then ``x / 127.5 - 1``.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .errors import DataError, Issue
from .example import Origin
from .formats import not_an_object
from .loading import holdout_split
from .readers import EXTENSIONS, read_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path")
CAPTION_COLUMNS = ("text", "caption", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
MODE_POLICIES = ("convert", "refuse")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "lanczos": Image.Resampling.LANCZOS}
LISTED_FILES = 5  # files named per warning in its one-line form (ImageWarning.files has them all)

# What each conversion does, said once per kind with the files it touched.
CONVERSIONS = {
    "palette": "palette images (P, PA) converted to RGB, transparent pixels composited on white",
    "alpha": "images with an alpha channel (RGBA, LA) composited on white and converted to RGB",
    "greyscale": "greyscale images (L, 1) converted to RGB (the grey value in each channel)",
    "16-bit": "16-bit images (I;16, I) scaled to 8 bits (v * 255 / 65535) and converted to RGB",
    "cmyk": "CMYK images converted to RGB",
    "other": "images in other modes converted to RGB by Pillow",
}


@dataclass(frozen=True)
class ImageRecord:
    """One captioned training image. ``origin`` is the metadata row (row layouts) or line 1 of the caption file."""

    path: Path
    caption: str
    origin: Origin
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    mode: str | None = None  # the mode stored in the file, before conversion to RGB
    sha256: str | None = None  # content_hash(path): key for latent / embedding caches


@dataclass(frozen=True)
class ImageWarning:
    """Something done to the data, or worth a look, that does not stop training: what, and to which files."""

    kind: str  # a CONVERSIONS key, "exif", "duplicate", "repeated", "leak", "unlisted", "ignored", "orphan-caption"
    message: str
    files: tuple[str, ...]

    def format(self, limit: int = LISTED_FILES) -> str:
        shown = ", ".join(self.files[:limit]) + (f" and {len(self.files) - limit} more" if len(self.files) > limit else "")
        return f"{self.message}: {len(self.files)} file{'s' if len(self.files) != 1 else ''} ({shown})"


@dataclass
class ImageSplits:
    train: list[ImageRecord]
    valid: list[ImageRecord]
    layout: str | None = None
    warnings: list[ImageWarning] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


class _Unreadable(Exception):
    pass


# --- decoding: one path from file to RGB, shared by the checks and the tensors --------------------------------

def _mode_kind(mode: str, info: dict) -> str | None:
    """Which conversion a mode needs (None: already RGB)."""
    if mode == "RGB":
        return "alpha" if "transparency" in info else None
    if mode in ("P", "PA"):
        return "palette"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return "alpha"
    if mode in ("L", "1"):
        return "alpha" if "transparency" in info else "greyscale"
    if mode == "I" or mode.startswith("I;16"):
        return "16-bit"
    return "cmyk" if mode == "CMYK" else "other"


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _to_rgb(im: Image.Image, kind: str | None) -> Image.Image:
    if kind is None:
        return im if im.mode == "RGB" else im.convert("RGB")
    if kind in ("palette", "alpha"):
        return _on_white(im)
    if kind == "16-bit":
        v = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)  # (H, W); mode I may hold any int32
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _decode(path: Path) -> tuple[Image.Image, str, str | None, bool]:
    """(RGB image, stored mode, conversion kind, EXIF orientation applied); _Unreadable if Pillow cannot decode it.

    ``verify`` catches broken PNG chunks; ``load`` decodes every pixel, which is what catches a truncated file.
    A GIF gives its first frame.
    """
    try:
        with Image.open(path) as probe:
            probe.verify()
        with Image.open(path) as im:
            im.load()
            mode, kind = im.mode, _mode_kind(im.mode, im.info)
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            upright = ImageOps.exif_transpose(im)  # a copy, detached from the file
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... for broken files
        raise _Unreadable(f"{type(e).__name__}: {e}") from e
    return _to_rgb(upright, kind), mode, kind, orientation not in (None, 1)


def _hash(rgb: Image.Image) -> str:
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:{rgb.mode}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _unreadable_error(path: Path, why: str) -> DataError:
    return DataError([Issue("E037", f"cannot read the image ({why})", str(path))])


def load_rgb(path: str | Path) -> Image.Image:
    """The image as training sees it: first frame, EXIF orientation applied, converted to 8-bit RGB."""
    try:
        return _decode(Path(path))[0]
    except _Unreadable as e:
        raise _unreadable_error(Path(path), str(e)) from None


def content_hash(path: str | Path) -> str:
    """sha256 of the decoded RGB pixels and size: equal for equal pixels whatever the file format or metadata."""
    return _hash(load_rgb(path))


# --- tensors ---------------------------------------------------------------------------------------------------

def image_tensor(record: ImageRecord | str | Path, resolution: int, *, center_crop: bool = True, flip: bool = False,
                 rng: torch.Generator | None = None, interpolation: str = "bilinear") -> torch.Tensor:
    """(3, resolution, resolution) float32 in [-1, 1], as diffusers' train_text_to_image.py prepares pixel values.

    The short side is resized to ``resolution`` (the long side to ``int(resolution * long / short)``, as
    torchvision's ``Resize(int)``), then a center crop, or a random crop whose offsets come from ``rng``; with
    ``flip`` the image is mirrored with probability 1/2, drawn from ``rng`` after the crop. The same ``rng`` state
    gives the same tensor.
    """
    return image_crop(record, (resolution, resolution), center_crop=center_crop, flip=flip, rng=rng,
                      interpolation=interpolation)[0]


def image_crop(record: ImageRecord | str | Path, target: tuple[int, int], *, center_crop: bool = True,
               flip: bool = False, rng: torch.Generator | None = None,
               interpolation: str = "bilinear"):
    """``image_tensor`` at a ``target`` (height, width) of any shape (an aspect-ratio bucket): (3, H, W) and the
    ``buckets.Crop`` that says where it was cut (SDXL's original size and crop corner). The image is resized to cover
    the target keeping its aspect ratio and cropped by the remainder only."""
    from .buckets import cover_crop

    if (flip or not center_crop) and rng is None:
        raise ValueError("a random crop or flip needs rng (a seeded torch.Generator) so that it can be repeated")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    im = load_rgb(record.path if isinstance(record, ImageRecord) else record)
    th, tw = target
    crop = cover_crop(im.size, target, center=center_crop, rng=rng)
    size = (crop.resized[1], crop.resized[0])
    if size != im.size:
        im = im.resize(size, INTERPOLATIONS[interpolation])
    im = im.crop((crop.left, crop.top, crop.left + tw, crop.top + th))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    x = (x.float() / 255.0 - 0.5) / 0.5
    if flip and float(torch.rand((1,), generator=rng)) < 0.5:
        x = x.flip(-1)
        crop = replace(crop, flipped=True)
    return x, crop


# --- layouts: each gives entries (image path, caption or None, origin, extra, where to report) -----------------

@dataclass
class _Entry:
    image: Path
    caption: str | None
    origin: Origin
    extra: dict[str, Any]
    report: Callable[..., Issue]  # report(code, message, field=None) -> Issue at the row or at the image file
    image_field: str | None = None  # the row's columns (None in a folder of .txt captions)
    caption_field: str | None = None


def _at_file(path: Path) -> Callable[..., Issue]:
    return lambda code, message, fld=None: Issue(code, message, str(path), None, fld)


def _at_row(origin: Origin) -> Callable[..., Issue]:
    return lambda code, message, fld=None: Issue(code, message, origin.path, origin.line, fld, origin.unit)


def _folder_entries(folder: Path, warnings: list[ImageWarning]) -> tuple[list[_Entry], list[Issue]]:
    files = sorted((p for p in folder.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.with_suffix("") for p in images}
    orphans = [str(p) for p in files if p.suffix.lower() == ".txt" and p.with_suffix("") not in stems]
    ignored = [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES + (".txt",)]
    if orphans:
        warnings.append(ImageWarning("orphan-caption", "caption files with no image of the same name (ignored)",
                                     tuple(orphans)))
    if ignored:
        warnings.append(ImageWarning("ignored", f"files that are not images ({', '.join(IMAGE_SUFFIXES)}) nor "
                                                ".txt captions (ignored)", tuple(ignored)))
    if not images:
        return [], [Issue("E042", f"no images in the folder (looked for {', '.join(IMAGE_SUFFIXES)}, with "
                                  f"same-named .txt captions, or a {' / '.join(METADATA_FILES)})", str(folder))]
    entries, issues = [], []
    for img in images:
        txt = img.with_suffix(".txt")
        caption = None
        if txt.is_file():
            try:
                caption = txt.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8").strip()
            except UnicodeDecodeError as e:
                issues.append(Issue("E002", f"caption is not UTF-8 (byte at offset {e.start}); re-save it as UTF-8",
                                    str(txt)))
                caption = ""
        entries.append(_Entry(img, caption, Origin(str(txt), 1), {}, _at_file(img)))
    return entries, issues


def _row_entries(table: Path) -> tuple[list[_Entry], list[Issue]]:
    raw = read_file(table)
    issues = list(raw.issues)
    base = table.parent
    if raw.columns is not None and raw.records:  # CSV / Parquet: a missing column is one issue for the file
        lacking = [what for what, cols in (("an image column", IMAGE_COLUMNS), ("a caption column", CAPTION_COLUMNS))
                   if not any(c in raw.columns for c in cols)]
        if lacking:
            code = "E019" if table.suffix.lower() == ".parquet" else "E018"
            return [], issues + [Issue(code, f"columns {raw.columns} lack {' and '.join(lacking)}: name the image "
                                             f"{' / '.join(IMAGE_COLUMNS)} and the caption "
                                             f"{' / '.join(CAPTION_COLUMNS)}", str(table))]
    entries = []
    for rec, origin in raw.records:
        report = _at_row(origin)
        if not isinstance(rec, dict):
            issues.append(not_an_object(rec, origin))
            continue
        img_col = next((c for c in IMAGE_COLUMNS if c in rec), None)
        cap_col = next((c for c in CAPTION_COLUMNS if c in rec), None)
        image, caption = rec.get(img_col), rec.get(cap_col)
        if img_col is None:
            issues.append(report("E006", f"no image: a row needs one of {', '.join(IMAGE_COLUMNS)}"))
        elif isinstance(image, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
            issues.append(report("E007", "images stored inside the file are not supported: save them as files and "
                                         "name them in this column", img_col))
        elif not isinstance(image, str) or not image.strip():
            issues.append(report("E007", f"the image must be a file path (a non-empty string), got {image!r}",
                                 img_col))
        if caption is not None and not isinstance(caption, str):
            issues.append(report("E007", f"the caption must be a string, got {type(caption).__name__}", cap_col))
            caption = ""
        if img_col is None or not isinstance(image, str) or not image.strip():
            if not (isinstance(caption, str) and caption.strip()):
                issues.append(report("E038", f"no caption: set {' / '.join(CAPTION_COLUMNS)}", cap_col))
            continue
        extra = {k: v for k, v in rec.items() if k not in (img_col, cap_col)}
        entries.append(_Entry(base / image.strip(), caption.strip() if caption else caption, origin, extra, report,
                              img_col, cap_col))
    return entries, issues


def _entries(source: str | Path, warnings: list[ImageWarning]) -> tuple[str | None, list[_Entry], list[Issue]]:
    src = Path(source)
    if src.is_dir():
        meta = next((src / m for m in METADATA_FILES if (src / m).is_file()), None)
        if meta is None:
            return "folder", *_folder_entries(src, warnings)
        entries, issues = _row_entries(meta)
        listed = {e.image for e in entries}
        unlisted = [str(p) for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p not in listed
                    and not any(part.startswith(".") for part in p.relative_to(src).parts)]
        if unlisted:
            warnings.append(ImageWarning("unlisted", f"images in the folder that {meta.name} does not list (ignored)",
                                         tuple(unlisted)))
        return meta.name, entries, issues
    if src.suffix.lower() in EXTENSIONS:
        return src.suffix.lower().lstrip("."), *_row_entries(src)
    if src.exists():
        return None, [], [Issue("E017", f"unsupported source {src.suffix or '(no extension)'!r}: give a folder of "
                                        f"images or a {', '.join(EXTENSIONS)} file of rows", str(src))]
    return None, [], [Issue("E016", "folder or file not found (paths in a config file are relative to the config file)",
                            str(src))]


# --- checks ----------------------------------------------------------------------------------------------------

def _check(entry: _Entry, resolution: int | None, modes: str,
           notes: dict[str, list[str]]) -> tuple[ImageRecord | None, list[Issue]]:
    """The record if every check passes, else None and every issue; conversions and rotations noted by kind."""
    issues, where, img, fld = [], entry.report, entry.image, entry.image_field
    if not entry.caption and fld is None:
        txt = img.with_suffix(".txt").name
        issues.append(where("E038", f"no caption for {img.name}: " + (f"{txt} is empty" if entry.caption == ""
                                                                       else f"write it to {txt}")))
    elif not entry.caption:
        issues.append(where("E038", f"no caption for {img.name}: set {' / '.join(CAPTION_COLUMNS)}",
                            entry.caption_field))
    if img.suffix.lower() not in IMAGE_SUFFIXES:
        return None, issues + [where("E017", f"{img}: unsupported image type; use {', '.join(IMAGE_SUFFIXES)}", fld)]
    if not img.is_file():
        return None, issues + [where("E039", f"image not found: {img}" + (" (paths are relative to the metadata "
                                                                          "file's folder)" if fld else ""), fld)]
    try:
        rgb, mode, kind, rotated = _decode(img)
    except _Unreadable as e:
        return None, issues + [where("E037", f"cannot read {img.name}: unreadable or truncated image ({e})", fld)]
    if resolution is not None and min(rgb.size) < resolution:
        issues.append(where("E040", f"{img.name} is {rgb.width}x{rgb.height}, smaller than the resolution "
                                    f"{resolution}: its short side must be at least {resolution}", fld))
    if kind is not None and modes == "refuse":
        issues.append(where("E041", f"{img.name} has mode {mode} ({kind}): refused because image modes are set to "
                                    "refuse; convert it to 8-bit RGB, or let tunesmith convert it", fld))
    if issues:
        return None, issues
    if kind is not None:
        notes[kind].append(str(img))
    if rotated:
        notes["exif"].append(str(img))
    return ImageRecord(img, entry.caption, entry.origin, entry.extra, rgb.size, mode, _hash(rgb)), []


def _duplicates(records: list[ImageRecord]) -> list[ImageWarning]:
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_hash[r.sha256].append(r)
    groups = [g for g in by_hash.values() if len(g) > 1]
    differ = [str(r.path) for g in groups if len({r.caption for r in g}) > 1 for r in g]
    same = [str(r.path) for g in groups if len({r.caption for r in g}) == 1 for r in g]
    out = []
    if differ:
        out.append(ImageWarning("duplicate", "the same image (equal pixels) with different captions", tuple(differ)))
    if same:
        out.append(ImageWarning("repeated", "the same image (equal pixels) with the same caption, trained as often "
                                            "as it is listed", tuple(same)))
    return out


def read_image_rows(source: str | Path, *, resolution: int | None = None, modes: str = "convert",
                    caption: str | None = None) -> tuple[list[ImageRecord], list[ImageWarning], list[Issue]]:
    """(records, warnings, issues) of one source: a folder (captions in .txt or a metadata file) or a rows file.

    Every image is decoded; ``resolution`` refuses images whose short side is smaller (E040); ``modes``
    "convert" turns palette / alpha / greyscale / 16-bit / CMYK images into RGB (a warning per kind),
    "refuse" reports them (E041). ``caption`` (DreamBooth's instance prompt) captions every image that has no caption
    of its own. Records are those that passed every check.
    """
    if modes not in MODE_POLICIES:
        raise ValueError(f"modes {modes!r}: use one of {', '.join(MODE_POLICIES)}")
    records, warnings = [], []
    _, entries, issues = _entries(source, warnings)
    notes: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        if caption and not entry.caption:
            entry.caption = caption
        record, found = _check(entry, resolution, modes, notes)
        issues += found
        if record is not None:
            records.append(record)
    warnings += [ImageWarning(kind, CONVERSIONS[kind], tuple(notes[kind])) for kind in CONVERSIONS if notes[kind]]
    if notes["exif"]:
        warnings.append(ImageWarning("exif", "EXIF orientation applied (the image turned upright)", tuple(notes["exif"])))
    return records, warnings + _duplicates(records), issues


def image_layout(source: str | Path) -> str | None:
    """How ``source`` is read: "folder" (.txt captions), a metadata file's name, or a rows file's extension."""
    return _entries(source, [])[0]


# --- splits ----------------------------------------------------------------------------------------------------

def collect_image_splits(cfg, seed: int, resolution: int | None, *, modes: str = "convert",
                         caption: str | None = None) -> ImageSplits:
    """Training and validation images (data.valid, else data.valid_fraction held out of data.train), every issue;
    ``caption``: the caption of images that have none (DreamBooth's instance prompt)."""
    if not cfg.train:
        return ImageSplits([], [], None, [], [Issue("E016", "no training images: set data.train (or pass --data "
                                                            "FOLDER)")])
    train, warnings, issues = read_image_rows(cfg.train, resolution=resolution, modes=modes, caption=caption)
    layout = image_layout(cfg.train)
    if cfg.valid:
        valid, more_warnings, more = read_image_rows(cfg.valid, resolution=resolution, modes=modes, caption=caption)
        warnings, issues = warnings + more_warnings, issues + more
        in_train = {r.sha256 for r in train}
        leaked = [str(r.path) for r in valid if r.sha256 in in_train]
        if leaked:
            warnings.append(ImageWarning("leak", "validation images also in the training data (equal pixels): their "
                                                 "loss measures memorisation", tuple(leaked)))
    else:
        train, valid = holdout_split(train, cfg.valid_fraction, seed)
    if not issues and len(train) < cfg.min_examples:
        issues.append(Issue("E015", f"{len(train)} training images; data.min_examples is {cfg.min_examples}: add "
                                    "images or lower data.min_examples", str(cfg.train)))
    return ImageSplits(train, valid, layout, warnings, issues)


def load_image_splits(cfg, seed: int, resolution: int | None, *, modes: str = "convert",
                      caption: str | None = None) -> ImageSplits:
    """``collect_image_splits``, raising DataError with every issue."""
    splits = collect_image_splits(cfg, seed, resolution, modes=modes, caption=caption)
    if splits.issues:
        raise DataError(splits.issues)
    return splits


# --- what `tunesmith check` prints ---------------------------------------------------------------------------

def _spread(values: list[int]) -> tuple[int, int, int] | None:
    return (min(values), statistics.median_low(values), max(values)) if values else None


@dataclass
class ImageSplitSummary:
    name: str
    images: int
    width: tuple[int, int, int] | None  # min / median / max, after EXIF orientation
    height: tuple[int, int, int] | None
    caption_words: tuple[int, int, int] | None
    caption_chars: tuple[int, int, int] | None

    @classmethod
    def of(cls, name: str, records: list[ImageRecord]) -> "ImageSplitSummary":
        return cls(name, len(records), _spread([r.size[0] for r in records]), _spread([r.size[1] for r in records]),
                   _spread([len(r.caption.split()) for r in records]), _spread([len(r.caption) for r in records]))


@dataclass
class ImageSummary:
    ok: bool
    layout: str | None
    splits: list[ImageSplitSummary]
    modes: dict[str, int]  # the modes stored in the files, before conversion
    warnings: list[ImageWarning]
    issues: list[Issue]
    rows: list[dict[str, Any]]  # the first training images: file, size, mode, caption

    def lines(self) -> list[str]:
        fmt = lambda s: "/".join(map(str, s)) if s else "-"  # noqa: E731
        out = [f"layout: {self.layout or '-'}", "split   images  width(min/med/max)  height(min/med/max)  caption words  "
                                                "caption chars"]
        out += [f"{s.name:<7} {s.images:>6}  {fmt(s.width):>18}  {fmt(s.height):>19}  {fmt(s.caption_words):>13}  "
                f"{fmt(s.caption_chars):>13}" for s in self.splits]
        out.append("modes: " + (", ".join(f"{m} x{n}" for m, n in sorted(self.modes.items())) or "-"))
        out += [f"warning: {w.format()}" for w in self.warnings]
        out += [f"  {r['file']} ({r['size']}, {r['mode']}): {r['caption']}" for r in self.rows]
        out += ["  " + i.format() for i in self.issues]
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, "layout": self.layout, "modes": self.modes, "rows": self.rows,
                "splits": [vars(s) for s in self.splits],
                "warnings": [{"kind": w.kind, "message": w.message, "files": list(w.files)} for w in self.warnings],
                "issues": [i.to_dict() for i in self.issues]}


def summarize_images(splits: ImageSplits, rows: int = 3) -> ImageSummary:
    """Counts, sizes, modes, caption lengths, warnings, issues and the first ``rows`` training images."""
    records = splits.train + splits.valid
    first = [{"file": str(r.path), "size": f"{r.size[0]}x{r.size[1]}", "mode": r.mode, "caption": r.caption}
             for r in splits.train[:rows]]
    return ImageSummary(not splits.issues, splits.layout,
                        [ImageSplitSummary.of("train", splits.train), ImageSplitSummary.of("valid", splits.valid)],
                        dict(Counter(r.mode for r in records)), list(splits.warnings), list(splits.issues), first)
