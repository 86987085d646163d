"""Aspect-ratio buckets (data/buckets.py, objective denoise's ``buckets``): the bucket list, which bucket each image
size goes to, the cover-resize and crop (and the crop corner reported as what was cut), epoch orders of single-bucket
micro-batches that depend on the seed and epoch alone, and runs on tiny pipelines (pixel and latent) whose batches
hold one shape each, with cached latents per bucket and a resume equal to the uninterrupted run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tunesmith.config import load_config
from tunesmith.data.buckets import bucket_order, cover_crop, epoch_examples, make_buckets, nearest_bucket
from tunesmith.data.images import image_crop, image_tensor
from tunesmith.images import model as M
from tunesmith.images import synth
from tunesmith.train import train

TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)
# (width, height) of the training images: wide, tall, square and in between
SIZES = [(64, 32), (64, 32), (60, 36), (32, 64), (36, 60), (32, 64), (40, 40), (48, 48), (44, 32), (32, 44)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the buckets


def test_the_bucket_list():
    assert make_buckets(32, 4) == [(40, 24), (36, 28), (32, 32), (28, 36), (24, 40)]
    for resolution, step, aspect in ((512, 64, 2.0), (1024, 64, 4.0), (32, 1, 2.0), (16, 2, 2.0)):
        buckets = make_buckets(resolution, step, aspect)
        assert ((resolution // step) * step,) * 2 in buckets
        for h, w in buckets:
            assert h % step == 0 and w % step == 0 and h * w <= resolution ** 2
            assert max(h, w) / min(h, w) <= aspect
            assert (w, h) in buckets  # every shape in both orientations
    assert (384, 640) in make_buckets(512, 64) and (256, 1024) in make_buckets(512, 64, 4.0)
    with pytest.raises(ValueError, match="bucket step"):
        make_buckets(16, 32)


def test_each_image_size_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = make_buckets(32, 4)  # tall (40, 24) ... square ... wide (24, 40), as (height, width)
    assign = {size: buckets[nearest_bucket(size, buckets)] for size in
              [(64, 32), (32, 64), (50, 50), (45, 35), (35, 45), (1000, 100), (33, 32), (400, 300)]}
    assert assign == {(64, 32): (24, 40), (32, 64): (40, 24), (50, 50): (32, 32), (45, 35): (28, 36),
                      (35, 45): (36, 28), (1000, 100): (24, 40), (33, 32): (32, 32), (400, 300): (28, 36)}


def test_cover_then_crop_by_the_remainder_only(tmp_path):
    crop = cover_crop((64, 32), (24, 40))  # a 2:1 image into a 40x24 bucket: height binds, 48x24, 4 px off each side
    assert (crop.original, crop.resized, crop.top, crop.left) == ((32, 64), (24, 48), 0, 4)
    crop = cover_crop((30, 60), (40, 24))
    assert crop.resized == (48, 24) and (crop.top, crop.left) == (4, 0)
    # a square target is Resize(short side) + CenterCrop, as image_tensor always did
    assert cover_crop((50, 80), (32, 32)).resized == (int(32 * 80 / 50), 32)


def _image(path: Path, size, seed=0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


@pytest.mark.parametrize("center, flip", [(True, False), (False, False), (False, True)])
def test_the_crop_reported_is_the_crop_made(tmp_path, center, flip):
    path = _image(tmp_path / "a.png", (70, 40))
    target = (24, 40)
    for seed in range(6):
        rng = torch.Generator().manual_seed(seed)
        x, crop = image_crop(path, target, center_crop=center, flip=flip, rng=rng)
        assert x.shape == (3, 24, 40) and crop.original == (40, 70)
        resized = Image.open(path).convert("RGB").resize((crop.resized[1], crop.resized[0]), Image.BILINEAR)
        top, left = crop.top_left(40)
        if crop.flipped:  # the reported corner is where the pixels sit in the flipped image (diffusers' SDXL script)
            resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
        want = np.asarray(resized.crop((left, top, left + 40, top + 24)), dtype=np.float32) / 127.5 - 1
        assert np.allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-6)
    assert torch.equal(image_tensor(path, 24), image_crop(path, (24, 24))[0])


def test_epoch_orders_are_single_bucket_micro_batches_from_the_seed_and_epoch_alone():
    buckets = [0, 1, 1, 2, 0, 1, 1, 1, 2, 0, 0, 3]
    micro = 3
    order = bucket_order(buckets, micro, seed=5, epoch=0, shuffle=True)
    assert len(order) == epoch_examples(buckets, micro) == 6 + 6 + 3 + 3  # buckets of 4, 5, 2, 1 images
    assert set(order) == set(range(len(buckets)))  # no image left out of an epoch
    groups = [order[k:k + micro] for k in range(0, len(order), micro)]
    assert all(len({buckets[i] for i in g}) == 1 for g in groups)
    assert order == bucket_order(buckets, micro, seed=5, epoch=0, shuffle=True)
    assert order != bucket_order(buckets, micro, seed=5, epoch=1, shuffle=True)
    assert order != bucket_order(buckets, micro, seed=6, epoch=0, shuffle=True)
    assert bucket_order(buckets, micro, 5, 0, shuffle=False)[:6] == [0, 4, 9, 10, 0, 4]


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    pipe = root / "pipe"
    M.build_pipeline(TINY, seed=0).save_pretrained(pipe, safe_serialization=True)
    data = root / "data"
    data.mkdir()
    for i, (scene, size) in enumerate(zip(synth.sample_scenes(len(SIZES), 0), SIZES)):
        synth.render(scene, 32).resize(size, Image.BILINEAR).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(scene.caption())
    return {"root": root, "pipe": pipe, "data": data}


def _cfg(world, out, *extra, pipe=None):
    return load_config(None, [
        f"model.name={pipe or world['pipe']}", f"data.train={world['data']}", f"output_dir={out}",
        "objective.name=denoise", "method.name=lora", "method.lora.r=4", "method.lora.dropout=0.0",
        "train.batch_size=2", "train.max_steps=6", "train.lr=1e-3", "train.warmup_steps=0", "eval.every_steps=3",
        "eval.samples=1", "eval.compare_base=false", "data.valid_fraction=0.2", "checkpoint.every_steps=3",
        "objective.denoise.inference_steps=2", "objective.denoise.buckets=true", *extra])


def _events(run, kind):
    return [e for e in map(json.loads, open(Path(run) / "metrics.jsonl")) if e["kind"] == kind]


@pytest.fixture(scope="module")
def shapes_seen(world):
    """Every training micro-batch's image shape, crop corners and original sizes, as the loss saw them."""
    from tunesmith.objectives.denoise import Denoise

    seen = []
    real = Denoise.loss

    def spy(self, model, batch, compute):
        seen.append((tuple(batch["pixels"].shape), batch["original_size"].tolist(), batch["crop_top_left"].tolist(),
                     torch.is_grad_enabled()))
        return real(self, model, batch, compute)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Denoise, "loss", spy)
        res = train(_cfg(world, world["root"] / "run", "objective.denoise.random_crop=true"), quiet=True)
    assert res.status == "completed"
    return res, seen


def test_a_run_trains_each_micro_batch_at_one_bucket(world, shapes_seen):
    res, everything = shapes_seen
    seen = [s[:3] for s in everything if s[3]]  # training passes
    evals = [s[:3] for s in everything if not s[3]]  # validation passes, 2 evaluations
    buckets = make_buckets(16, 2)  # the tiny UNet's two blocks: a factor of 2, no VAE
    assert len(seen) == 6 and evals
    for shape, original, corners in evals:  # each validation batch one bucket, the centre crop of each image
        assert shape[2:] in buckets and all(tuple(c) == (cover_crop((ow, oh), shape[2:]).top,
                                                          cover_crop((ow, oh), shape[2:]).left)
                                            for (oh, ow), c in zip(original, corners))
    for shape, original, corners in seen:
        b, _, h, w = shape
        assert b == 2 and (h, w) in buckets
        for (oh, ow), (top, left) in zip(original, corners):
            assert (ow, oh) in SIZES
            crop = cover_crop((ow, oh), (h, w))
            assert 0 <= top <= crop.resized[0] - h and 0 <= left <= crop.resized[1] - w
    assert len({s[0][2:] for s in seen}) > 1  # not all one shape: the wide and tall images kept theirs
    logged = " ".join(e["text"] for e in _events(res.output_dir, "message"))
    assert "aspect-ratio buckets of about 16x16 pixels, sides multiples of 2" in logged
    assert len(_events(res.output_dir, "eval")) == 2


def test_a_resumed_bucketed_run_is_the_uninterrupted_one_bit_for_bit(world, shapes_seen):
    res, _ = shapes_seen
    out = world["root"] / "resumed"
    shutil.copytree(res.output_dir, out)
    for c in (out / "checkpoints").iterdir():
        if c.name.endswith("6"):
            shutil.rmtree(c)
    again = train(_cfg(world, out, "objective.denoise.random_crop=true"), resume=True, quiet=True)
    assert again.status == "completed"
    want = [s["loss"] for s in _events(res.output_dir, "train")][3:]
    assert [s["loss"] for s in _events(out, "train")][-3:] == want


def test_a_latent_model_caches_latents_per_bucket(world, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(tmp_path / "cache"))  # this run's latents alone

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
    from sd_helpers import tiny_sd

    from tunesmith.models import cache_dir
    from tunesmith.objectives.denoise import LATENT_FOLDER

    sd = tiny_sd(world["root"] / "sd15")
    res = train(_cfg(world, world["root"] / "sd-run", "data.valid_fraction=0", pipe=sd), quiet=True)
    assert res.status == "completed"
    logged = " ".join(e["text"] for e in _events(res.output_dir, "message"))
    assert "sides multiples of 4" in logged  # the VAE's 2 times the UNet's 2
    from safetensors.torch import load_file

    shapes = {tuple(load_file(f)["mean"].shape) for f in (cache_dir() / LATENT_FOLDER).rglob("*.safetensors")}
    buckets = make_buckets(32, 4)
    assert {(4, h // 2, w // 2) for h, w in buckets} >= shapes and len(shapes) > 1


def test_dreambooth_class_images_are_cut_to_their_subjects_bucket(world):
    from tunesmith.objectives.denoise import Denoise

    seen = []
    real = Denoise.loss

    def spy(self, model, batch, compute):
        if "prior" in batch and torch.is_grad_enabled():
            seen.append((tuple(batch["pixels"].shape), batch["prior"].tolist()))
        return real(self, model, batch, compute)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Denoise, "loss", spy)
        res = train(_cfg(world, world["root"] / "db-run", "train.max_steps=3", "data.valid_fraction=0",
                         "objective.denoise.dreambooth.instance_prompt=a sks circle",
                         "objective.denoise.dreambooth.class_prompt=a large red circle on a white background",
                         "objective.denoise.dreambooth.num_class_images=2"), quiet=True)
    assert res.status == "completed" and len(seen) == 3
    assert all(shape[0] == 4 and prior == [0, 0, 1, 1] for shape, prior in seen)  # 2 pairs, one shape
    assert any(shape[2:] != (16, 16) for shape, _ in seen)  # square class images cut to a subject's bucket


def test_with_buckets_an_image_is_checked_against_its_bucket(world, tmp_path, capsys):
    from tunesmith.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for name, size in (("wide.png", (30, 14)), ("tiny.png", (18, 9)), ("ok.png", (40, 40))):
        _image(data / name, size)
        (data / name).with_suffix(".txt").write_text("a large red circle on a white background")
    args = ["check", "--model", str(world["pipe"]), "--data", str(data), "--set", "objective.name=denoise",
            "--set", "data.valid_fraction=0"]
    assert main(args) == 2  # square: both short sides under 16
    out = capsys.readouterr().out
    assert "wide.png is 30x14, smaller than the resolution 16" in out and "tiny.png is 18x9" in out
    assert main(args + ["--set", "objective.denoise.buckets=true"]) == 2
    out = capsys.readouterr().out  # the wide image fills its 20x12 bucket; the tiny one would be enlarged
    assert "wide.png is" not in out and "E040 tiny.png is 18x9, smaller than its aspect-ratio bucket 20x12" in out
    (data / "tiny.png").unlink()
    (data / "tiny.txt").unlink()
    res = train(_cfg(world, tmp_path / "run", f"data.train={data}", "data.valid_fraction=0", "train.max_steps=1"),
                quiet=True)  # and training agrees
    assert res.status == "completed"
