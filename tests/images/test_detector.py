"""The detector on drawn shapes: every shape, colour, size, count and background (held-out ones included), positions,
noise, other resolutions; and the scoring of images against captions."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tunesmith.images import detector, synth


def _drawn(seed=0, **fixed):
    scene = synth.sample_scene(np.random.default_rng(seed), shapes=synth.SHAPES, colours=tuple(synth.COLOURS),
                               backgrounds=tuple(synth.COLOURS), **fixed)
    return scene, synth.render(scene)


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_every_shape_colour_and_background(shape):
    for i, (colour, background) in enumerate(itertools.permutations(synth.COLOURS, 2)):
        for size in synth.SIZES:
            scene, img = _drawn(seed=i, shape=shape, colour=colour, background=background, size=size)
            assert detector.detect(img).attributes() | {"position": None} == scene.attributes() | {
                "position": None}, scene.caption()


@pytest.mark.parametrize("count,size", list(itertools.product((1, 2, 3), ("small", "large"))))
def test_counts_and_sizes(count, size):
    for seed in range(40):
        scene, img = _drawn(seed=seed, count=count, size=size, shape=synth.SHAPES[seed % 4])
        reading = detector.detect(img)
        assert (reading.count, reading.size, reading.shape) == (count, size, scene.shape), scene.caption()


@pytest.mark.parametrize("position", synth.POSITIONS)
def test_positions_of_single_objects(position):
    for seed in range(30):
        scene, img = _drawn(seed=seed, count=1, position=position)
        assert detector.detect(img).position == position, scene.caption()


def test_shape_templates_win_by_a_margin():
    """On drawn shapes the right template's IoU is high and clearly above the runner-up's."""
    scenes = synth.sample_scenes(400, seed=9, shapes=synth.SHAPES, colours=tuple(synth.COLOURS),
                                 backgrounds=tuple(synth.COLOURS))
    for scene in scenes:
        for obj in detector.detect(synth.render(scene)).objects:
            best, second = sorted(obj.iou.values())[::-1][:2]
            assert obj.shape == scene.shape and best > 0.8 and best - second > 0.05, (scene.caption(), obj.iou)


def test_other_resolutions_and_array_inputs():
    scenes = synth.sample_scenes(60, seed=4, shapes=synth.SHAPES, colours=tuple(synth.COLOURS),
                                 backgrounds=tuple(synth.COLOURS))
    for s in scenes:
        img64 = synth.render(s, 64)
        assert detector.matches(detector.detect(img64), s.caption()) == {k: True for k in s.attributes()}
        arr = np.asarray(synth.render(s))
        assert detector.detect(arr).attributes() == detector.detect(arr.astype(np.float32) / 255).attributes()
        assert detector.detect(arr.transpose(2, 0, 1).astype(np.float32) / 255).attributes() == \
            detector.detect(arr).attributes()


def test_pixel_noise_does_not_change_the_reading():
    rng = np.random.default_rng(0)
    for s in synth.sample_scenes(100, seed=6):
        noisy = np.asarray(synth.render(s)).astype(np.float32) + rng.normal(0, 12, (32, 32, 3))
        reading = detector.detect(np.clip(noisy, 0, 255).astype(np.uint8))
        assert all(detector.matches(reading, s.caption()).values()), s.caption()


def test_touching_objects_count_as_one_and_blobs_match_no_shape():
    img = Image.new("RGB", (32, 32), synth.COLOURS["white"])
    d = ImageDraw.Draw(img)
    d.rectangle([4, 10, 13, 19], fill=synth.COLOURS["red"])
    d.rectangle([14, 10, 23, 19], fill=synth.COLOURS["red"])  # touches the first one
    assert detector.detect(img).count == 1
    blob = Image.new("RGB", (32, 32), synth.COLOURS["black"])
    ImageDraw.Draw(blob).polygon([(5, 5), (27, 8), (9, 12), (24, 27), (6, 20)], fill=synth.COLOURS["green"])
    assert detector.detect(blob).shape == "unknown"


def test_empty_image_reads_no_objects():
    reading = detector.detect(Image.new("RGB", (32, 32), synth.COLOURS["green"]))
    assert (reading.count, reading.shape, reading.colour, reading.background) == (0, None, None, "green")
    assert detector.matches(reading, "a small red circle on a green background") == {
        "shape": False, "colour": False, "size": False, "count": False, "background": True}


def test_score_counts_per_attribute_and_all_correct():
    scenes = synth.sample_scenes(6, seed=1, count=1, position="left")
    images = [synth.render(s) for s in scenes]
    captions = [s.caption() for s in scenes]
    assert detector.score(images, captions)["all_correct"] == 1.0
    # two wrong captions: one wrong colour, one wrong count (a position is only stated for single objects)
    wrong = list(captions)
    a = synth.parse_caption(wrong[0])
    other = next(c for c in synth.TRAIN_COLOURS if c not in (a["colour"], a["background"]))
    wrong[0] = wrong[0].replace(f" {a['colour']} ", f" {other} ", 1)
    wrong[1] = wrong[1].replace("a ", "two ", 1).replace(" on the left", "", 1)
    wrong[1] = wrong[1].replace(synth.parse_caption(captions[1])["shape"],
                                synth.PLURALS[synth.parse_caption(captions[1])["shape"]], 1)
    result = detector.score(images, wrong)
    assert result["n"] == 6 and result["all_correct"] == pytest.approx(4 / 6)
    assert result["per_attribute"]["colour"] == pytest.approx(5 / 6)
    assert result["per_attribute"]["count"] == pytest.approx(5 / 6)
    assert result["per_attribute"]["position"] == 1.0  # stated by 5 captions, all right
    assert [r["all"] for r in result["rows"]] == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        detector.score(images[:2], captions[:1])
