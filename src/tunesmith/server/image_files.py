"""Captioned images uploaded as one `fine-tune` file: checked at upload, stored unpacked beside the upload.

What an upload may be:

| upload                        | inside                                                                          |
|-------------------------------|---------------------------------------------------------------------------------|
| ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` | images with same-named ``.txt`` captions, or a ``metadata.jsonl`` / ``.csv`` |
|                               | naming each image (``file_name``) and its caption (``text``): the layouts       |
|                               | ``tunesmith train`` reads from a folder (data/images.py)                        |
| ``.jsonl``                    | a row per image: ``image`` (base64, or a ``data:image/...;base64,`` URL) or     |
|                               | ``b64_json`` (plain base64), and ``text`` / ``caption`` / ``prompt``           |

An archive is never extracted by the archive library: each member is checked, then written by hand under a fresh
folder (``O_EXCL | O_NOFOLLOW``), so that nothing outside it can be reached. Refused, with a code per kind, before a
byte is written where possible: absolute names and ``..`` (E050), links, devices, FIFOs and sparse members (E051),
more bytes unpacked than ``UNPACK_FACTOR`` times the upload limit, counted as they are written rather than as the
headers declare (E052), more than ``MAX_MEMBERS`` members (E053), an archive Python cannot read (E054). Every image
is then opened by Pillow restricted to PNG, JPEG, WebP, BMP and GIF (a file named .png that is really an EPS would
otherwise reach Ghostscript: E055), and refused when it has more pixels than Pillow's own decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``, read from the header before any pixel is decoded: E052); then data/images.py decodes
every pixel and checks captions exactly as ``tunesmith check`` does.

The unpacked folder is ``DATA/files/<file id>.images/`` (built under a hidden name, renamed into place when every
check passed), and an image job trains on that folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import stat
import tarfile
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

from ..data import Issue
from ..data.images import CAPTION_COLUMNS, IMAGE_SUFFIXES, METADATA_FILES

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
FOLDER_SUFFIX = ".images"
FORMAT = "images"  # the files row's format for every image upload
MAX_MEMBERS = 20000  # archive members (files and folders), checked before any is read
UNPACK_FACTOR = 4  # bytes unpacked from an archive: at most this many times the upload limit (tunesmith serve --max-file-mb)
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what Pillow may open: no EPS (Ghostscript), no plugins beyond
B64_COLUMNS = ("image", "b64_json")  # a .jsonl row's base64 image
KEPT = IMAGE_SUFFIXES + (".txt",) + tuple(Path(m).suffix for m in METADATA_FILES)  # members written; the rest skipped
CHUNK = 1 << 20


def upload_suffix(filename: str) -> str:
    """The upload's extension as stored: ``.tar.gz`` whole, else the last suffix, lower-cased."""
    name = filename.lower()
    return ".tar.gz" if name.endswith(".tar.gz") else Path(name).suffix


def folder_for(stored: Path) -> Path:
    """DATA/files/<file id>.images for the stored upload DATA/files/<file id><ext>."""
    return stored.with_name(stored.name.split(".", 1)[0] + FOLDER_SUFFIX)


def is_image_rows(path: Path) -> bool:
    """Whether a .jsonl upload holds base64 images: its first record has an ``image`` or ``b64_json`` field (no text
    format has one)."""
    if path.suffix.lower() != ".jsonl":
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except (ValueError, RecursionError):  # the text readers report it, with its code (E003)
                    return False
                return isinstance(first, dict) and any(c in first for c in B64_COLUMNS)
    return False


class _Refused(Exception):
    def __init__(self, issue: Issue):
        super().__init__(issue.message)
        self.issue = issue


def check_image_upload(stored: Path, filename: str, max_file_bytes: int) -> tuple[int, list[Issue]]:
    """Unpack and check an image upload (an archive, or a .jsonl of base64 images) into ``folder_for(stored)``.

    Returns (images, issues); issues name the client's file (and the member, ``upload.zip/cats/1.png``) and a
    code. With issues, no folder is left behind."""
    final = folder_for(stored)
    work = final.with_name("." + final.name + ".part")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        lines: dict | None = None  # base64 rows: image name / metadata line -> the upload's line
        if upload_suffix(stored.name) in ARCHIVES:
            issues = _unpack(stored, filename, work, UNPACK_FACTOR * max_file_bytes)
            root = _data_root(work)
        else:
            issues, lines = _decode_rows(stored, filename, work)
            root = work
        records = []
        if not issues:
            issues = _check_headers(root)
        if not issues:
            from ..data.images import read_image_rows

            records, _, issues = read_image_rows(root)
        issues = [_client_issue(i, root, filename, lines) for i in issues]
        if issues:
            return 0, issues
        shutil.rmtree(final, ignore_errors=True)
        root.rename(final)
        return len(records), []
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- archives


def _unpack(archive: Path, filename: str, dest: Path, limit: int) -> list[Issue]:
    try:
        if upload_suffix(archive.name) == ".zip":
            _unzip(archive, filename, dest, limit)
        else:
            _untar(archive, filename, dest, limit)
    except _Refused as e:
        return [e.issue]
    except Exception as e:  # noqa: BLE001  untrusted bytes: BadZipFile, TarError, zlib.error, an encrypted member ...
        return [Issue("E054", f"cannot read the archive ({type(e).__name__}: {e}); send a .zip, .tar or .tar.gz",
                      filename)]
    return []


def _member_path(name: str, filename: str) -> PurePosixPath | None:
    """The member's relative path, None for one to skip (folders' own entries, hidden files, macOS resource forks);
    _Refused for an absolute name or one that climbs out with ``..``."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts:
        raise _Refused(Issue("E050", f"unsafe member name {name!r}: an absolute path or one with '..' would be "
                                     "written outside the folder the archive is unpacked in", filename))
    parts = [p for p in parts if p not in ("", ".")]
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts) or "\x00" in name:
        return None
    return PurePosixPath(*parts)


def _counted_copy(src, dest: Path, rel: PurePosixPath, budget: list[int], filename: str) -> None:
    """Copy a member's bytes, counting what is really unpacked (never trusting its header's size)."""
    target = dest.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise _Refused(Issue("E050", f"the archive holds {rel.as_posix()} twice", filename)) from None
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _Refused(_bomb(filename, budget[1]))
            out.write(chunk)


def _bomb(filename: str, limit: int) -> Issue:
    return Issue("E052", f"the archive unpacks to more than {limit} bytes ({UNPACK_FACTOR} times the upload limit): "
                         "a decompression bomb, or a dataset to send in parts", filename)


def _too_many(filename: str) -> Issue:
    return Issue("E053", f"the archive has more than {MAX_MEMBERS} members", filename)


def _unzip(archive: Path, filename: str, dest: Path, limit: int) -> None:
    with open(archive, "rb") as f:  # the count the end record declares, before zipfile builds an object per entry
        end = zipfile._EndRecData(f)  # (private, unchanged since Python 2: what ZipFile itself reads first)
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise _Refused(_too_many(filename))
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _Refused(_too_many(filename))
        if sum(i.file_size for i in infos) > limit:  # what the headers declare: refused before reading any
            raise _Refused(_bomb(filename, limit))
        budget = [limit, limit]
        for info in infos:
            rel = _member_path(info.filename, filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: the zip tool stored no file type (permissions at most)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise _Refused(Issue("E051", f"{info.filename!r} is a link or special file: archives may hold only "
                                             "files and folders", filename))
            if rel is None or info.is_dir() or rel.suffix.lower() not in KEPT:
                continue
            with z.open(info) as src:
                _counted_copy(src, dest, rel, budget, filename)


def _untar(archive: Path, filename: str, dest: Path, limit: int) -> None:
    budget = [limit, limit]
    declared, count = 0, 0
    with tarfile.open(archive, "r:*") as t:
        for m in t:  # one member at a time: a compressed stream is not unpacked ahead of the checks
            count += 1
            if count > MAX_MEMBERS:
                raise _Refused(_too_many(filename))
            rel = _member_path(m.name, filename)
            if m.issym() or m.islnk() or m.issparse() or not (m.isreg() or m.isdir()):
                raise _Refused(Issue("E051", f"{m.name!r} is a link or special file: archives may hold only files and "
                                             "folders", filename))
            declared += m.size
            if declared > limit:
                raise _Refused(_bomb(filename, limit))
            if rel is None or m.isdir() or rel.suffix.lower() not in KEPT:
                continue
            src = t.extractfile(m)
            _counted_copy(src, dest, rel, budget, filename)


def _data_root(folder: Path) -> Path:
    """The folder the data is in: an archive of one folder (a zip of ``mydata/``) is read from inside it."""
    while True:
        children = list(folder.iterdir())
        if len(children) != 1 or not children[0].is_dir():
            return folder
        folder = children[0]


# ---------------------------------------------------------------- base64 rows


def _decode_rows(path: Path, filename: str, dest: Path) -> tuple[list[Issue], dict[str, int]]:
    """Each row's image written to DEST/<line>.<format> and a metadata.jsonl naming them; (issues, image -> line)."""
    from ..data.readers import read_file

    raw = read_file(path)
    issues = [replace(i, path=filename) for i in raw.issues]
    lines, meta = {}, []
    for rec, origin in raw.records:
        at = lambda code, msg, fld=None: Issue(code, msg, filename, origin.line, fld)  # noqa: E731
        if not isinstance(rec, dict):
            issues.append(at("E004", "the row is not a JSON object"))
            continue
        col = next((c for c in B64_COLUMNS if c in rec), None)
        cap = next((c for c in CAPTION_COLUMNS if c in rec), None)
        value = rec.get(col)
        if col is None:
            issues.append(at("E006", f"no image: a row needs {' or '.join(B64_COLUMNS)} (base64)"))
            continue
        if not isinstance(value, str) or not value:
            issues.append(at("E007", "the image must be a base64 string", col))
            continue
        if value.startswith("data:"):
            head, _, value = value.partition(",")
            if not head.startswith("data:image/") or not head.endswith(";base64"):
                issues.append(at("E056", f"a data URL must be data:image/...;base64,... (got {head[:40]!r})", col))
                continue
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            issues.append(at("E056", f"the image is not valid base64 ({e})", col))
            continue
        fmt = _format_of(data)
        name = f"{origin.line:06d}.{(fmt or 'bin').lower().replace('jpeg', 'jpg')}"
        (dest / name).write_bytes(data)
        lines[name] = lines[len(meta) + 1] = origin.line
        row = {k: v for k, v in rec.items() if k not in (col, cap)}
        meta.append(json.dumps(row | {"file_name": name, "text": rec.get(cap)}, ensure_ascii=False))
    (dest / "metadata.jsonl").write_text("".join(m + "\n" for m in meta), encoding="utf-8")
    return issues, lines


def _format_of(data: bytes) -> str | None:
    import io

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                return im.format
    except Exception:  # checked with its line below: _check_headers says why
        return None


# ---------------------------------------------------------------- images, from their headers


def _check_headers(root: Path) -> list[Issue]:
    """Every image file opened by Pillow (its header only) in an allowed format, with no more pixels than Pillow's
    decompression-bomb limit: before data/images.py decodes a single pixel."""
    from PIL import Image

    issues = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or (p.suffix.lower() not in IMAGE_SUFFIXES and p.suffix != ".bin"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p, formats=ALLOWED_FORMATS) as im:
                    w, h = im.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            issues.append(Issue("E052", f"the image has more than {Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
                                        "decompression-bomb limit)", str(p)))
            continue
        except Exception as e:
            issues.append(Issue("E055", f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}): "
                                        f"{type(e).__name__}: {e}", str(p)))
            continue
        if w * h > Image.MAX_IMAGE_PIXELS:
            issues.append(Issue("E052", f"{w}x{h} pixels is more than Pillow's decompression-bomb limit "
                                        f"({Image.MAX_IMAGE_PIXELS})", str(p)))
    return issues


def _client_issue(issue: Issue, root: Path, filename: str, lines: dict | None) -> Issue:
    """An issue as the client sees it: the upload's name, the member inside an archive (``data.zip/cats/1.png``) or
    the line of a base64 row; never a server path."""
    path = Path(issue.path) if issue.path else None
    message = issue.message.replace(str(root) + os.sep, "")
    if path is None or not path.is_relative_to(root):
        return replace(issue, path=filename, message=message)
    if lines is None:
        return replace(issue, path=f"{filename}/{path.relative_to(root).as_posix()}", message=message)
    line = lines.get(issue.line) if path.name == "metadata.jsonl" else lines.get(path.name)
    return replace(issue, path=filename, line=line, unit="line", message=message)
