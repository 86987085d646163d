"""Image uploads checked in process (server/image_files.py): archives of captioned images and .jsonl rows of base64
images unpacked beside the upload, and every kind of malicious or broken upload refused with its code, naming the
member or the line, with nothing left on disk. The same checks through the real client: test_server_images.py."""

import base64
import io
import json
import struct
import tarfile
import zipfile
import zlib

import pytest
from PIL import Image

from tunesmith.server import image_files as F


def png(color=(255, 0, 0), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side=100_000) -> bytes:
    """A PNG whose header says side x side pixels (far past Pillow's limit) with almost no data: a pixel bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_zip(path, members: dict, links: dict | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink, as zip -y stores one
            z.writestr(info, target)
    return path


def make_tar(path, members: dict, *, symlink: tuple | None = None, mode="w:gz"):
    with tarfile.open(path, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type, info.linkname = tarfile.SYMTYPE, symlink[1]
            t.addfile(info)
    return path


def captioned(n=3) -> dict:
    out = {}
    for i in range(n):
        out[f"{i}.png"] = png((40 * i, 0, 0))
        out[f"{i}.txt"] = f"a red square number {i}".encode()
    return out


def check(path, limit=1 << 20):
    return F.check_image_upload(path, path.name.split("-", 1)[-1], limit)


def only_children(tmp_path) -> set:
    return {p.name for p in tmp_path.iterdir()}


# ---------------------------------------------------------------- what is accepted


def test_a_zip_of_images_and_txt_captions_is_unpacked_beside_the_upload(tmp_path):
    stored = make_zip(tmp_path / "file-a.zip", captioned(3) | {"notes.md": b"ignored", "__MACOSX/._0.png": b"x"})
    count, issues = check(stored)
    assert (count, issues) == (3, [])
    folder = tmp_path / "file-a.images"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "0.txt", "1.png", "1.txt", "2.png", "2.txt"]
    assert only_children(tmp_path) == {"file-a.zip", "file-a.images"}  # no partial folder left


def test_a_tar_gz_of_one_folder_with_metadata_jsonl_is_read_inside_it(tmp_path):
    meta = "".join(json.dumps({"file_name": f"img/{i}.png", "text": f"caption {i}"}) + "\n" for i in range(4))
    members = {f"mydata/img/{i}.png": png((0, 60 * i, 0)) for i in range(4)} | {"mydata/metadata.jsonl": meta.encode()}
    stored = make_tar(tmp_path / "file-b.tar.gz", members)
    assert check(stored) == (4, [])
    assert (tmp_path / "file-b.images" / "metadata.jsonl").is_file()


def test_jsonl_rows_of_base64_images_data_urls_and_b64_json(tmp_path):
    rows = [{"image": "data:image/png;base64," + base64.b64encode(png()).decode(), "text": "a red square"},
            {"b64_json": base64.b64encode(png((0, 0, 255))).decode(), "caption": "a blue square", "tag": 1}]
    stored = tmp_path / "file-c.jsonl"
    stored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert F.is_image_rows(stored)
    assert check(stored) == (2, [])
    meta = [json.loads(line) for line in (tmp_path / "file-c.images" / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == ["a red square", "a blue square"] and meta[1]["tag"] == 1


def test_text_jsonl_is_not_taken_for_images(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert not F.is_image_rows(f)


# ---------------------------------------------------------------- what is refused, and the code


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "C:/evil.png"])
def test_path_traversal_in_a_zip_is_refused_and_nothing_is_written(tmp_path, name):
    stored = make_zip(tmp_path / "file-d.zip", captioned(1) | {name: png()})
    count, issues = check(stored)
    assert count == 0 and [i.code for i in issues] == ["E050"] and repr(name) in issues[0].message
    assert only_children(tmp_path) == {"file-d.zip"}
    assert not (tmp_path.parent / "evil.png").exists()


def test_absolute_and_dotdot_names_in_a_tar_are_refused(tmp_path):
    stored = make_tar(tmp_path / "file-e.tar", captioned(1) | {"../../x.txt": b"caption"}, mode="w")
    assert [i.code for i in check(stored)[1]] == ["E050"]


def test_links_are_refused_in_tar_and_zip(tmp_path):
    tar = make_tar(tmp_path / "file-f.tar.gz", captioned(1), symlink=("1.png", "/etc/passwd"))
    assert [i.code for i in check(tar)[1]] == ["E051"]
    z = make_zip(tmp_path / "file-g.zip", captioned(1), links={"1.png": "/etc/passwd"})
    assert [i.code for i in check(z)[1]] == ["E051"]
    assert only_children(tmp_path) == {"file-f.tar.gz", "file-g.zip"}


def test_an_archive_that_unpacks_past_the_limit_is_a_bomb(tmp_path):
    """1 MB of zeros compresses to about 1 KB; the limit is 4 x the upload limit (here 64 KB): refused."""
    stored = make_zip(tmp_path / "file-h.zip", captioned(1) | {"zeros.txt": b"\0" * (1 << 20)})
    assert stored.stat().st_size < 10_000
    count, issues = check(stored, limit=16 * 1024)
    assert count == 0 and [i.code for i in issues] == ["E052"] and "65536 bytes" in issues[0].message
    tar = make_tar(tmp_path / "file-i.tar.gz", captioned(1) | {"zeros.txt": b"\0" * (1 << 20)})
    assert [i.code for i in check(tar, limit=16 * 1024)[1]] == ["E052"]


def test_an_image_with_a_bomb_header_is_refused_before_decoding(tmp_path):
    stored = make_zip(tmp_path / "file-k.zip", captioned(1) | {"big.png": bomb_png(), "big.txt": b"huge"})
    count, issues = check(stored)
    assert [(i.code, i.path) for i in issues] == [("E052", "k.zip/big.png")], issues


def test_too_many_members(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "MAX_MEMBERS", 4)
    assert [i.code for i in check(make_zip(tmp_path / "file-l.zip", captioned(3)))[1]] == ["E053"]
    assert [i.code for i in check(make_tar(tmp_path / "file-m.tar.gz", captioned(3)))[1]] == ["E053"]


def test_not_an_archive(tmp_path):
    stored = tmp_path / "file-n.zip"
    stored.write_bytes(b"this is not a zip file at all")
    assert [i.code for i in check(stored)[1]] == ["E054"]
    gz = tmp_path / "file-o.tar.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert [i.code for i in check(gz)[1]] == ["E054"]


def test_an_image_in_a_format_not_allowed_is_refused_whatever_its_name(tmp_path):
    """A TIFF (or an EPS, which Pillow would hand to Ghostscript) named .png: Pillow is never asked to open it as such."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="TIFF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    stored = make_zip(tmp_path / "file-p.zip", captioned(1) | {"t.png": buf.getvalue(), "t.txt": b"a",
                                                              "e.jpg": eps, "e.txt": b"b"})
    issues = check(stored)[1]
    assert sorted((i.code, i.path) for i in issues) == [("E055", "p.zip/e.jpg"), ("E055", "p.zip/t.png")]


def test_broken_images_and_missing_captions_name_the_member(tmp_path):
    stored = make_zip(tmp_path / "file-q.zip", captioned(2) | {"sub/cut.png": png()[:60], "sub/cut.txt": b"x",
                                                              "nocap.png": png()})
    issues = check(stored)[1]
    assert sorted((i.code, i.path) for i in issues) == [("E037", "q.zip/sub/cut.png"), ("E038", "q.zip/nocap.png")]
    assert all(str(tmp_path) not in i.message for i in issues)
    assert only_children(tmp_path) == {"file-q.zip"}


def test_no_images_at_all(tmp_path):
    assert [i.code for i in check(make_zip(tmp_path / "file-r.zip", {"a.txt": b"caption"}))[1]] == ["E042"]


def test_bad_base64_rows_name_their_line(tmp_path):
    good = base64.b64encode(png()).decode()
    rows = [{"image": good, "text": "ok"}, {"image": "not base64!!", "text": "x"},
            {"image": "data:text/html;base64," + good, "text": "y"}, {"image": good},
            {"b64_json": base64.b64encode(b"GIF89a-not-really").decode(), "text": "z"}]
    stored = tmp_path / "file-s.jsonl"
    stored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    issues = check(stored)[1]
    assert sorted((i.code, i.line) for i in issues) == [("E056", 2), ("E056", 3)]  # stops before decoding images
    stored.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[3], rows[4]]))
    issues = check(stored)[1]
    assert sorted((i.code, i.line) for i in issues) == [("E055", 3)]
    stored.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[3]]))
    assert sorted((i.code, i.line, i.path) for i in check(stored)[1]) == [("E038", 2, "s.jsonl")]


def test_an_encrypted_or_corrupt_member_is_an_unreadable_archive(tmp_path):
    stored = make_zip(tmp_path / "file-t.zip", captioned(1))
    raw = bytearray(stored.read_bytes())
    raw[6] |= 0x1  # the first member's flag, in its local header and in the central directory: encrypted
    raw[raw.index(b"PK\x01\x02") + 8] |= 0x1
    bad = tmp_path / "file-u.zip"
    bad.write_bytes(bytes(raw))
    data = bytearray(stored.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("0.png")
    data[start:start + 8] = b"\xff" * 8  # deflate data of the first member broken
    broken = tmp_path / "file-v.zip"
    broken.write_bytes(bytes(data))
    for f in (bad, broken):
        count, issues = check(f)
        assert count == 0 and [i.code for i in issues] == ["E054"], issues
    assert only_children(tmp_path) == {"file-t.zip", "file-u.zip", "file-v.zip"}


def test_orphan_unpacked_folders_are_swept_with_orphan_files(tmp_path):
    """A folder of images whose row is gone, and a partial one (a crash mid-upload), are removed once old; a kept
    file's folder and a fresh partial one stay."""
    import os
    import time
    from types import SimpleNamespace

    from tunesmith.server.routes_files import sweep_orphans

    files = tmp_path / "files"
    for name in ("file-kept.zip", "file-gone.zip"):
        make_zip(files / name if files.exists() else (files.mkdir() or files / name), captioned(1))
        assert check(files / name)[0] == 1
    (files / "file-gone.zip").unlink()
    (files / ".file-crash.images.part").mkdir()
    (files / ".file-fresh.images.part").mkdir()
    old = time.time() - 3600
    for name in ("file-gone.images", ".file-crash.images.part", "file-kept.images"):
        os.utime(files / name, (old, old))
    store = SimpleNamespace(stored_names=lambda: {"file-kept.zip"})
    removed = sweep_orphans(SimpleNamespace(files_dir=files), store)
    assert sorted(removed) == [".file-crash.images.part", "file-gone.images"]
    assert only_children(files) == {"file-kept.zip", "file-kept.images", ".file-fresh.images.part"}
