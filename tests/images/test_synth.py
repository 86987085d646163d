"""The synthetic world: seeded scenes, captions that parse back, held-out concepts really held out, dataset folders."""

import json

import numpy as np
import pytest

from tunesmith.images import synth


def test_same_seed_same_scenes_and_pixels():
    a, b = synth.sample_scenes(50, seed=3), synth.sample_scenes(50, seed=3)
    assert a == b
    assert np.array_equal(synth.render_batch(a), synth.render_batch(b))
    assert a != synth.sample_scenes(50, seed=4)


def test_captions_parse_back_into_their_attributes():
    scenes = synth.sample_scenes(500, seed=0, shapes=synth.SHAPES, colours=tuple(synth.COLOURS),
                                 backgrounds=tuple(synth.COLOURS))
    for s in scenes:
        assert synth.parse_caption(s.caption()) == s.attributes()
        assert set(s.caption().split()) <= set(synth.VOCABULARY)
    assert synth.parse_caption("two small red circles on a blue background") == {
        "shape": "circle", "colour": "red", "size": "small", "count": 2, "background": "blue"}
    assert synth.parse_caption("a large purple cross at the top on a white background")["position"] == "top"
    with pytest.raises(ValueError, match="not a caption"):
        synth.parse_caption("a photo of a dog")


def test_pretraining_scenes_never_show_or_name_the_held_out_concepts():
    scenes = synth.sample_scenes(2000, seed=1)
    words = {w for s in scenes for w in s.caption().split()}
    assert {"cross", "crosses", "purple"}.isdisjoint(words)
    assert {s.shape for s in scenes} == set(synth.TRAIN_SHAPES)
    assert {s.colour for s in scenes} | {s.background for s in scenes} == set(synth.TRAIN_COLOURS)
    # every other attribute value is covered
    assert {s.count for s in scenes} == {1, 2, 3} and {s.size for s in scenes} == {"small", "large"}
    assert {s.position for s in scenes} == {None, *synth.POSITIONS}
    assert all(s.background != s.colour for s in scenes)


def test_objects_fit_and_keep_apart():
    for s in synth.sample_scenes(1000, seed=2, size="large", count=3) + synth.sample_scenes(1000, seed=2):
        for i, o in enumerate(s.objects):
            lo, hi = synth.SIZES[s.size]
            assert lo <= o.side <= hi
            assert 1 <= o.cx - o.side / 2 and o.cx + o.side / 2 <= synth.GRID - 1
            assert 1 <= o.cy - o.side / 2 and o.cy + o.side / 2 <= synth.GRID - 1
            for p in s.objects[:i]:
                assert (abs(o.cx - p.cx) >= (o.side + p.side) / 2 + synth.GAP
                        or abs(o.cy - p.cy) >= (o.side + p.side) / 2 + synth.GAP)


def test_render_uses_the_palette_and_antialiases():
    scene = synth.sample_scene(np.random.default_rng(0), shape="circle", colour="red", background="blue",
                               size="large", count=1, position="middle")
    img = np.asarray(synth.render(scene))
    assert img.shape == (32, 32, 3)
    assert tuple(img[0, 0]) == synth.COLOURS["blue"] and tuple(img[16, 16]) == synth.COLOURS["red"]
    # anti-aliased: some edge pixels are neither colour
    flat = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(flat) > 2
    assert synth.render(scene, 64).size == (64, 64)


def test_fixed_attributes_are_checked():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="background must differ"):
        synth.sample_scene(rng, colour="red", background="red")
    with pytest.raises(ValueError, match="single objects"):
        synth.sample_scene(rng, count=2, position="left")
    with pytest.raises(ValueError, match="unknown held-out concept"):
        synth.heldout_scene(rng, "star")


@pytest.mark.parametrize("concept", ["cross", "purple", "both"])
def test_write_dataset_writes_txt_captions_and_metadata_jsonl(tmp_path, concept):
    from PIL import Image

    out = synth.write_dataset(tmp_path / "data", concept, n=12, seed=5)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 12
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    attrs = [json.loads(line) for line in (out / "attributes.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == [p.name for p in pngs] == [a["file_name"] for a in attrs]
    for png, m, a in zip(pngs, meta, attrs):
        assert png.with_suffix(".txt").read_text().strip() == m["text"]
        assert synth.parse_caption(m["text"]) == synth.Scene(**{**{k: a[k] for k in (
            "shape", "colour", "size", "count", "background", "position")}, "objects": ()}).attributes()
        with Image.open(png) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        parsed = synth.parse_caption(m["text"])
        if concept in ("cross", "both"):
            assert parsed["shape"] == "cross"
        if concept in ("purple", "both"):
            assert parsed["colour"] == "purple"
    # the same seed writes the same files
    again = synth.write_dataset(tmp_path / "again", concept, n=12, seed=5)
    assert (again / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in pngs)


def test_write_dataset_replay_adds_known_scenes_apart_from_the_concept(tmp_path):
    out = synth.write_dataset(tmp_path / "data", "cross", n=6, seed=5, replay=9)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    new = [m for m in meta if not m["file_name"].startswith("replay-")]
    old = [m for m in meta if m["file_name"].startswith("replay-")]
    assert len(new) == 6 and len(old) == 9 and len(list(out.glob("*.png"))) == 15
    assert all(synth.parse_caption(m["text"])["shape"] == "cross" for m in new)
    # the replay scenes are the trained world only: never the held-out shape or colour
    for m in old:
        parsed = synth.parse_caption(m["text"])
        assert parsed["shape"] != synth.HELD_OUT["shape"] and parsed["colour"] != synth.HELD_OUT["colour"]
    # without replay the concept's files are the same: adding rehearsal does not change them
    alone = synth.write_dataset(tmp_path / "alone", "cross", n=6, seed=5)
    assert [m["text"] for m in new] == [json.loads(x)["text"] for x in (alone / "metadata.jsonl").read_text().splitlines()]
