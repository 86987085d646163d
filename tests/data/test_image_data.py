"""Captioned image data: every layout, every check with its code, file and line, the tensors and the splits."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tunesmith.config import DataConfig
from tunesmith.data import (CODES, DataError, ImageRecord, Origin, content_hash, image_layout, image_tensor,
                            load_image_splits, load_rgb, read_image_rows, summarize_images)

RED, BLUE = (200, 10, 10), (10, 10, 200)


def png(path, size=(40, 40), colour=RED, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def captioned(folder, name, caption="a red square", **kw):
    img = png(folder / name, **kw)
    img.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return img


def gradient(path, size=(64, 32)):
    """Red rises left to right, green top to bottom: any crop or flip shows."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    Image.fromarray(a).save(path)
    return path


def where(issues):
    return [(i.code, Path(i.path).name, i.line, i.field) for i in issues]


def names(files):
    return [Path(f).name for f in files]


def test_the_error_codes_are_in_the_table():
    assert {f"E{n:03d}" for n in range(37, 43)} <= set(CODES)


def test_a_folder_of_images_with_same_named_captions(tmp_path):
    captioned(tmp_path, "b.png", "  a blue square\n", colour=BLUE)
    captioned(tmp_path, "a.jpg", "a red square")
    captioned(tmp_path / "sub", "c.webp", "a red one, in a subfolder")
    records, warnings, issues = read_image_rows(tmp_path)
    assert issues == [] and warnings == []
    assert [(r.path, r.caption) for r in records] == [
        (tmp_path / "a.jpg", "a red square"), (tmp_path / "b.png", "a blue square"),
        (tmp_path / "sub" / "c.webp", "a red one, in a subfolder")]
    assert records[1].origin == Origin(str(tmp_path / "b.txt"), 1)
    assert records[1].size == (40, 40) and records[1].mode == "RGB" and records[1].extra == {}
    assert records[1].sha256 == content_hash(tmp_path / "b.png") and len(records[1].sha256) == 64
    assert image_layout(tmp_path) == "folder"


def test_a_bad_folder_reports_every_issue_with_its_code_and_file(tmp_path):
    captioned(tmp_path, "good.png")
    whole = captioned(tmp_path, "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    png(tmp_path / "uncaptioned.png")
    captioned(tmp_path, "empty.png", caption="  \n")
    captioned(tmp_path, "tiny.png", size=(16, 16))
    captioned(tmp_path, "tiny_and_bare.png", caption="", size=(16, 40))
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "stray.txt").write_text("a caption without an image")
    records, warnings, issues = read_image_rows(tmp_path, resolution=32)
    assert names(r.path for r in records) == ["good.png"]
    assert where(issues) == [
        ("E038", "empty.png", None, None),
        ("E040", "tiny.png", None, None),
        ("E038", "tiny_and_bare.png", None, None), ("E040", "tiny_and_bare.png", None, None),
        ("E037", "truncated.png", None, None),
        ("E038", "uncaptioned.png", None, None)]
    assert "empty.txt is empty" in issues[0].message and "write it to uncaptioned.txt" in issues[-1].message
    assert "16x16, smaller than the resolution 32" in issues[1].message
    assert [(w.kind, names(w.files)) for w in warnings] == [("orphan-caption", ["stray.txt"]),
                                                           ("ignored", ["notes.md"])]
    with pytest.raises(DataError) as err:
        load_image_splits(DataConfig(train=str(tmp_path)), seed=0, resolution=32)
    assert len(err.value.issues) == 6 and err.value.codes() == {"E037", "E038", "E040"}
    assert f"{tmp_path / 'truncated.png'}: E037" in str(err.value)


def test_a_truncated_jpeg_is_caught(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)).save(tmp_path / "t.jpg")
    whole = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "t.txt").write_text("noise")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("noise")
    assert where(read_image_rows(tmp_path)[2]) == [("E037", "garbage.png", None, None), ("E037", "t.jpg", None, None)]


def modes_folder(folder):
    """One image in each mode that needs converting, and an EXIF-rotated JPEG."""
    captioned(folder, "rgb.png")
    captioned(folder, "palette.png", colour=3, mode="P")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black: white once composited
    rgba.save(folder / "alpha.png")
    Image.new("LA", (40, 40), (120, 255)).save(folder / "grey_alpha.png")
    captioned(folder, "grey.png", colour=90, mode="L")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / "deep.png")  # 16-bit greyscale: I;16
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "print.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (60, 40), RED).save(folder / "phone.jpg", exif=exif)
    for name in ("alpha", "grey_alpha", "deep", "print", "phone"):
        (folder / f"{name}.txt").write_text(name)


def test_modes_are_converted_to_rgb_and_each_conversion_is_a_warning(tmp_path):
    modes_folder(tmp_path)
    records, warnings, issues = read_image_rows(tmp_path, resolution=32)
    assert issues == []
    assert [(w.kind, names(w.files)) for w in warnings] == [
        ("palette", ["palette.png"]), ("alpha", ["alpha.png", "grey_alpha.png"]), ("greyscale", ["grey.png"]),
        ("16-bit", ["deep.png"]), ("cmyk", ["print.jpg"]), ("exif", ["phone.jpg"])]
    assert "composited on white" in warnings[1].message and "2 files (" in warnings[1].format()
    by_name = {r.path.name: r for r in records}
    assert {n: r.mode for n, r in by_name.items()} == {
        "alpha.png": "RGBA", "deep.png": "I;16", "grey.png": "L", "grey_alpha.png": "LA", "palette.png": "P",
        "phone.jpg": "RGB", "print.jpg": "CMYK", "rgb.png": "RGB"}
    assert by_name["phone.jpg"].size == (40, 60)  # EXIF orientation applied: portrait
    alpha = load_rgb(tmp_path / "alpha.png")
    assert alpha.mode == "RGB" and alpha.getpixel((0, 0)) == (255, 255, 255) and alpha.getpixel((1, 1)) == (255, 0, 0)
    assert load_rgb(tmp_path / "deep.png").getpixel((5, 5)) == (255, 255, 255)  # 65535 -> 255, not clipped noise
    assert load_rgb(tmp_path / "grey.png").getpixel((5, 5)) == (90, 90, 90)
    assert load_rgb(tmp_path / "print.jpg").getpixel((5, 5))[0] > 200  # CMYK red stays red


def test_strict_modes_refuse_what_would_be_converted(tmp_path):
    modes_folder(tmp_path)
    records, warnings, issues = read_image_rows(tmp_path, resolution=32, modes="refuse")
    assert where(issues) == [(("E041", n, None, None)) for n in
                             ("alpha.png", "deep.png", "grey.png", "grey_alpha.png", "palette.png", "print.jpg")]
    assert "mode I;16 (16-bit)" in issues[1].message
    assert names(r.path for r in records) == ["phone.jpg", "rgb.png"]  # turning upright is not a mode conversion
    assert [w.kind for w in warnings] == ["exif"]
    with pytest.raises(ValueError, match="modes"):
        read_image_rows(tmp_path, modes="maybe")


def test_a_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "anim.txt").write_text("red, then blue")
    records, warnings, _ = read_image_rows(tmp_path)
    assert records[0].mode == "P" and [w.kind for w in warnings] == ["palette"]
    assert load_rgb(tmp_path / "anim.gif").getpixel((3, 3)) == RED


def test_metadata_jsonl_as_huggingface_imagefolder_reads_it(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "imgs" / "b.png", colour=BLUE)
    png(tmp_path / "unlisted.png")
    rows = [{"file_name": "a.png", "text": "a red square", "style": "flat"},
            {"file_name": "imgs/b.png", "caption": "a blue square"},
            {"file_name": "gone.png", "text": "missing on disk"},
            {"file_name": "a.png", "prompt": ""},
            {"text": "no image named"},
            [1, 2]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.txt").write_text("ignored: metadata.jsonl wins")
    records, warnings, issues = read_image_rows(tmp_path)
    meta = str(tmp_path / "metadata.jsonl")
    assert [(r.path, r.caption, r.origin, r.extra) for r in records] == [
        (tmp_path / "a.png", "a red square", Origin(meta, 1), {"style": "flat"}),
        (tmp_path / "imgs" / "b.png", "a blue square", Origin(meta, 2), {})]
    assert [(i.code, i.path, i.line, i.field) for i in issues] == [
        ("E006", meta, 5, None), ("E004", meta, 6, None),
        ("E039", meta, 3, "file_name"), ("E038", meta, 4, "prompt")]
    assert str(tmp_path / "gone.png") in issues[2].message
    assert [(w.kind, names(w.files)) for w in warnings] == [("unlisted", ["unlisted.png"])]
    assert image_layout(tmp_path) == "metadata.jsonl"


def test_a_csv_of_image_paths_relative_to_its_folder(tmp_path):
    png(tmp_path / "pics" / "a.png")
    png(tmp_path / "pics" / "b.bmp", colour=BLUE)
    csv = tmp_path / "train.csv"
    csv.write_text("image,caption,split\npics/a.png,a red square,x\npics/missing.png,lost,y\n"
                   "pics/b.bmp,a blue square,z\npics/notes.tiff,wrong type,w\n")
    records, warnings, issues = read_image_rows(csv)
    assert [(r.path.name, r.caption, r.origin.line, r.extra) for r in records] == [
        ("a.png", "a red square", 2, {"split": "x"}), ("b.bmp", "a blue square", 4, {"split": "z"})]
    assert [(i.code, i.path, i.line, i.field) for i in issues] == [
        ("E039", str(csv), 3, "image"), ("E017", str(csv), 5, "image")]
    assert issues[0].format().startswith(f"{csv}:3: image: E039 image not found")
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,words\npics/a.png,hi\n")
    assert [(i.code, i.line) for i in read_image_rows(bad)[2]] == [("E018", None)]


def test_a_parquet_file_of_image_paths(tmp_path):
    png(tmp_path / "a.png")
    table = tmp_path / "data" / "train.parquet"
    table.parent.mkdir()
    pq.write_table(pa.table({"image_path": ["../a.png", "../nope.png"], "text": ["a red square", "gone"],
                             "score": [0.5, 0.7]}), table)
    records, _, issues = read_image_rows(table)
    assert [(r.path, r.origin, r.extra) for r in records] == [
        (table.parent / "../a.png", Origin(str(table), 0, "record"), {"score": 0.5})]
    assert [(i.code, i.line, i.unit, i.field) for i in issues] == [("E039", 1, "record", "image_path")]
    assert issues[0].where() == f"{table}[1]"
    pq.write_table(pa.table({"name": ["a.png"], "text": ["x"]}), tmp_path / "nocol.parquet")
    assert [i.code for i in read_image_rows(tmp_path / "nocol.parquet")[2]] == ["E019"]


def test_duplicates_are_warnings_not_errors(tmp_path):
    captioned(tmp_path, "a.png", "a red square")
    png(tmp_path / "copy.bmp")  # same pixels, another format
    (tmp_path / "copy.txt").write_text("a crimson block")
    captioned(tmp_path, "b.png", "blue", colour=BLUE)
    captioned(tmp_path, "b2.png", "blue", colour=BLUE)
    records, warnings, issues = read_image_rows(tmp_path)
    assert issues == [] and len(records) == 4
    assert [(w.kind, names(w.files)) for w in warnings] == [("duplicate", ["a.png", "copy.bmp"]),
                                                           ("repeated", ["b.png", "b2.png"])]


def test_sources_that_hold_nothing(tmp_path):
    assert [(i.code, i.path) for i in read_image_rows(tmp_path / "nowhere")[2]] == [("E016", str(tmp_path / "nowhere"))]
    (tmp_path / "empty").mkdir()
    assert [i.code for i in read_image_rows(tmp_path / "empty")[2]] == ["E042"]
    (tmp_path / "x.yaml").write_text("a: 1")
    assert [i.code for i in read_image_rows(tmp_path / "x.yaml")[2]] == ["E017"]
    (tmp_path / "empty.jsonl").write_text("")
    assert [i.code for i in read_image_rows(tmp_path / "empty.jsonl")[2]] == ["E001"]


def test_image_tensor_resizes_the_short_side_then_center_crops(tmp_path):
    solid = image_tensor(png(tmp_path / "red.png", size=(48, 40)), 32)
    assert solid.shape == (3, 32, 32) and solid.dtype == torch.float32
    assert torch.allclose(solid[:, 5, 5], torch.tensor(RED) / 127.5 - 1, atol=1e-6)
    grad = gradient(tmp_path / "g.png", size=(64, 32))
    x = image_tensor(ImageRecord(grad, "g", Origin("m", 1)), 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    full = Image.open(grad).resize((32, 16), Image.Resampling.BILINEAR).crop((8, 0, 24, 16))
    expected = torch.from_numpy(np.asarray(full, np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(x, expected, atol=1e-6)
    upright = image_tensor(tmp_path / "g.png", 16, interpolation="lanczos")
    assert upright.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="rng"):
        image_tensor(grad, 16, flip=True)
    with pytest.raises(ValueError, match="interpolation"):
        image_tensor(grad, 16, interpolation="nearest-ish")


def test_random_crop_and_flip_repeat_for_the_same_rng_state(tmp_path):
    grad = gradient(tmp_path / "g.png", size=(64, 32))

    def draw(seed):
        return image_tensor(grad, 16, center_crop=False, flip=True, rng=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    rng = torch.Generator().manual_seed(7)
    state = rng.get_state()
    first = image_tensor(grad, 16, center_crop=False, flip=True, rng=rng)
    rng.set_state(state)
    assert torch.equal(first, image_tensor(grad, 16, center_crop=False, flip=True, rng=rng))
    outs = [draw(s) for s in range(12)]
    flipped = [bool((o[0, :, -1] < o[0, :, 0]).all()) for o in outs]  # red falls left to right once mirrored
    assert any(flipped) and not all(flipped)
    assert len({round(float(o[0].mean()), 4) for o in outs}) > 2  # the crop moves
    center = image_tensor(grad, 16)
    centred = [image_tensor(grad, 16, flip=True, rng=torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(torch.equal(c, center) or torch.equal(c, center.flip(-1)) for c in centred)
    assert {torch.equal(c, center) for c in centred} == {True, False}


def test_content_hash_keys_on_decoded_pixels(tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "a.bmp")
    assert content_hash(a) == content_hash(b) != content_hash(png(tmp_path / "c.png", colour=BLUE))
    assert content_hash(a) != content_hash(png(tmp_path / "wide.png", size=(80, 20)))
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient(tmp_path / "g.png", size=(30, 20))
    Image.open(tmp_path / "g.png").save(tmp_path / "g_exif.png", exif=exif)
    Image.open(tmp_path / "g.png").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "g_upright.png")
    assert content_hash(tmp_path / "g_exif.png") == content_hash(tmp_path / "g_upright.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError) as err:
        content_hash(tmp_path / "bad.png")
    assert err.value.codes() == {"E037"}


def test_splits_are_seeded_and_a_separate_valid_set_is_checked_for_leaks(tmp_path):
    for i in range(10):
        captioned(tmp_path / "train", f"{i}.png", f"square {i}", colour=(i * 20, 0, 0))
    cfg = DataConfig(train=str(tmp_path / "train"), valid_fraction=0.2)
    one, two = load_image_splits(cfg, 0, 32), load_image_splits(cfg, 0, 32)
    assert [r.path for r in one.valid] == [r.path for r in two.valid] and len(one.valid) == 2
    assert sorted(r.path.name for r in one.train + one.valid) == sorted(f"{i}.png" for i in range(10))
    other = [load_image_splits(cfg, s, 32).valid for s in range(1, 6)]
    assert any([r.path for r in v] != [r.path for r in one.valid] for v in other)
    captioned(tmp_path / "valid", "v.png", "a held-out square", colour=(40, 0, 0))  # the pixels of train/2.png
    split = load_image_splits(DataConfig(train=str(tmp_path / "train"), valid=str(tmp_path / "valid")), 0, 32)
    assert len(split.train) == 10 and [w.kind for w in split.warnings] == ["leak"]
    with pytest.raises(DataError) as err:
        load_image_splits(DataConfig(train=str(tmp_path / "train"), min_examples=20), 0, 32)
    assert err.value.codes() == {"E015"}
    with pytest.raises(DataError) as err:
        load_image_splits(DataConfig(), 0, 32)
    assert err.value.codes() == {"E016"}


def test_the_summary_check_prints(tmp_path):
    captioned(tmp_path, "a.png", "a red square", size=(40, 48))
    captioned(tmp_path, "b.png", "two blue squares on white", size=(64, 40), colour=BLUE)
    captioned(tmp_path, "c.png", "grey", size=(50, 50), colour=90, mode="L")
    splits = load_image_splits(DataConfig(train=str(tmp_path), valid_fraction=0.0), 0, 32)
    s = summarize_images(splits, rows=2)
    assert s.ok and s.layout == "folder"
    assert (s.splits[0].images, s.splits[0].width, s.splits[0].height) == (3, (40, 50, 64), (40, 48, 50))
    assert s.splits[0].caption_words == (1, 3, 5) and s.splits[1].images == 0 and s.splits[1].width is None
    assert s.modes == {"RGB": 2, "L": 1}
    assert [r["file"] for r in s.rows] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    text = "\n".join(s.lines())
    assert "40/50/64" in text and "modes: L x1, RGB x2" in text and "warning: greyscale" in text
    assert json.loads(json.dumps(s.to_dict()))["splits"][0]["images"] == 3
