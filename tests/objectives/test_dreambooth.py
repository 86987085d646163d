"""DreamBooth with prior preservation (objective denoise, objective.denoise.dreambooth) on a tiny seeded pipeline of the
built-in model's layout: class images drawn once by the base pipeline and read back from the cache by the next run,
the loss instance + prior_loss_weight x prior, subject images captioned by the instance prompt, a run that reports the
prior loss and resumes bit for bit, and bad settings refused with their code."""

import json
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import ConfigError, DenoiseConfig, load_config
from tunesmith.images import model as M
from tunesmith.images import synth
from tunesmith.models.diffusion import load_diffusion_model
from tunesmith.objectives import dreambooth
from tunesmith.objectives.denoise import Denoise, ImageItem, embed_captions
from tunesmith.train import train

TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)
INSTANCE = "a large sks circle on a white background"
CLASS = "a large red circle on a white background"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    pipe = root / "pipe"
    M.build_pipeline(TINY, seed=0).save_pretrained(pipe, safe_serialization=True)
    data = synth.write_dataset(root / "data", "purple", n=4, seed=0, resolution=16)
    for f in list(data.glob("*.txt")) + [data / "metadata.jsonl"]:  # DreamBooth's folder: images, no captions
        f.unlink()
    return {"root": root, "pipe": pipe, "data": data}


def _settings(**db):
    return DenoiseConfig(inference_steps=2, caption_dropout=0.0, snr_gamma=None,
                         dreambooth={"instance_prompt": INSTANCE, "class_prompt": CLASS, "num_class_images": 3} | db)


def _cfg(world, out, *extra):
    return load_config(None, [
        f"model.name={world['pipe']}", f"data.train={world['data']}", f"output_dir={out}", "objective.name=denoise",
        "method.name=lora", "method.lora.r=4", "method.lora.dropout=0.0", "train.batch_size=2", "train.max_steps=4",
        "train.lr=1e-3", "train.warmup_steps=0", "eval.every_steps=2", "eval.samples=1", "eval.compare_base=false",
        "data.valid_fraction=0", "checkpoint.every_steps=2", "objective.denoise.inference_steps=2",
        f"objective.denoise.dreambooth.instance_prompt={INSTANCE}", f"objective.denoise.dreambooth.class_prompt={CLASS}",
        "objective.denoise.dreambooth.num_class_images=6", *extra])


# ---------------------------------------------------------------- the class images


def test_class_images_are_drawn_once_then_read_from_the_cache(world, monkeypatch):
    import tunesmith.evaluate.images as ev

    net = load_diffusion_model(world["pipe"])
    calls = []
    real = ev.generate_images
    monkeypatch.setattr(ev, "generate_images", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    settings = _settings()
    first = dreambooth.class_images(net, net.pipeline, settings, lambda e: None)
    assert calls == [3] and len(first) == 3
    assert all(r.caption == CLASS and r.path.is_file() and r.size == (16, 16) for r in first)
    assert len({r.sha256 for r in first}) == 3  # each image from its own seed

    again = dreambooth.class_images(load_diffusion_model(world["pipe"]), None, settings, lambda e: None)
    assert calls == [3]  # no pipeline call: read back (a None pipeline would fail if it were called)
    assert [(r.path, r.sha256) for r in again] == [(r.path, r.sha256) for r in first]

    # another seed, count or sampler setting is another set of images
    other = dreambooth.class_images(net, net.pipeline, _settings(class_seed=1), lambda e: None)
    assert calls == [3, 3] and other[0].path.parent != first[0].path.parent
    assert {r.sha256 for r in other}.isdisjoint({r.sha256 for r in first})
    assert dreambooth.class_key(net, _settings(num_class_images=4)) != dreambooth.class_key(net, settings)
    assert dreambooth.class_key(net, DenoiseConfig(**(settings.model_dump() | {"inference_steps": 3}))) != \
        dreambooth.class_key(net, settings)


def test_a_half_written_set_is_drawn_again(world):
    net = load_diffusion_model(world["pipe"])
    settings = _settings(class_seed=7)
    first = dreambooth.class_images(net, net.pipeline, settings, lambda e: None)
    (first[0].path.parent / dreambooth.MANIFEST).unlink()  # a crash before the manifest: the set is incomplete
    again = dreambooth.class_images(net, net.pipeline, settings, lambda e: None)
    assert [r.sha256 for r in again] == [r.sha256 for r in first]  # drawn again, the same seeded pixels


def test_the_lora_fingerprint_is_the_base_models(world):
    from tunesmith.config import MethodConfig
    from tunesmith.models.diffusion import adapt_diffusion

    net = load_diffusion_model(world["pipe"])
    before = dreambooth.base_fingerprint(net)
    adapt_diffusion(net, MethodConfig(name="lora", lora={"r": 4}))
    assert dreambooth.base_fingerprint(net) == before


# ---------------------------------------------------------------- the loss


def _objective(world, weight: float):
    from tunesmith.data.images import read_image_rows

    net = load_diffusion_model(world["pipe"])
    settings = _settings(prior_loss_weight=weight)
    obj = Denoise(settings)
    records = read_image_rows(world["data"], resolution=16, caption=INSTANCE)[0]
    obj.class_records = dreambooth.class_images(net, net.pipeline, settings, lambda e: None)
    obj.resolution, obj.latent_shape, obj.num_timesteps = 16, (3, 16, 16), 1000
    obj.embeddings = embed_captions(net, [INSTANCE, CLASS, ""], "cpu", lambda e: None)
    return net, obj, records


def test_the_loss_is_instance_plus_weight_times_prior(world):
    losses = {}
    for w in (0.0, 1.0, 2.5):
        net, obj, records = _objective(world, w)
        assert all(r.caption == INSTANCE for r in records)  # captionless images take the instance prompt
        items = obj.render(records, None, None, None, "train")
        assert len(items) == 4 and [it.prior for it in items] == [0, 1, 2, 0]  # max(4 subjects, 3 class) pairs
        batch = obj.collate([ImageItem(it.record, it.key, 5, prior=it.prior) for it in items[:2]], None, "padded")
        assert batch["pixels"].shape[0] == 4 and batch["prior"].tolist() == [0, 0, 1, 1]
        assert batch["weight"].tolist() == [1.0, 1.0, w, w]
        with torch.no_grad():
            loss, stats = obj.loss(net, batch, _compute())
        losses[w] = (float(loss), stats)
        assert float(loss) == pytest.approx(stats["mse"] + w * stats["prior_mse"], rel=1e-5)
    # the instance half is exactly what training on the subject images alone gives (same draws)
    net, obj, records = _objective(world, 1.0)
    plain = Denoise(DenoiseConfig(inference_steps=2, caption_dropout=0.0, snr_gamma=None,
                                  dreambooth={"instance_prompt": INSTANCE, "prior_preservation": False}))
    plain.resolution, plain.latent_shape, plain.num_timesteps, plain.embeddings = 16, (3, 16, 16), 1000, obj.embeddings
    alone = plain.collate([ImageItem(r, k, 5) for k, r in enumerate(records[:2])], None, "padded")
    with torch.no_grad():
        loss_alone, _ = plain.loss(net, alone, _compute())
    assert float(loss_alone) == pytest.approx(losses[0.0][0], rel=1e-6)
    assert losses[2.5][0] - losses[1.0][0] == pytest.approx(1.5 * losses[1.0][1]["prior_mse"], rel=1e-4)
    assert losses[1.0][1]["prior_mse"] > 0


def _compute():
    from tunesmith.train.steps import Compute

    return Compute(fused=False)


def test_a_pass_with_no_loss_adds_nothing(world):
    net, obj, records = _objective(world, 1.0)
    items = obj.render(records, None, None, None, "train")
    batch = obj.no_loss(obj.collate([ImageItem(it.record, it.key, 0, prior=it.prior) for it in items[:2]], None,
                                    "padded"))
    loss, stats = obj.loss(net, batch, _compute())
    assert float(loss) == 0.0 and stats == {"mse": 0.0, "prior_mse": 0.0}


# ---------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run(world):
    res = train(_cfg(world, world["root"] / "run"), quiet=True)
    assert res.status == "completed"
    return res


def _events(run, kind):
    return [e for e in map(json.loads, open(Path(run) / "metrics.jsonl")) if e["kind"] == kind]


def test_a_run_reports_the_prior_loss_and_reuses_the_class_images(world, run):
    steps = _events(run.output_dir, "train")
    assert len(steps) == 4 and all(s["stats"]["prior_mse"] > 0 and s["stats"]["mse"] > 0 for s in steps)
    logged = [e["text"] for e in _events(run.output_dir, "message")]
    assert any("6 class images drawn by the base model" in t for t in logged)
    assert any("prior preservation on 6 class images" in t and "6 (subject, class) pairs" in t for t in logged)
    again = train(_cfg(world, world["root"] / "run-again"), quiet=True)
    logged = [e["text"] for e in _events(again.output_dir, "message")]
    assert any("6 class images for" in t and "from the cache" in t for t in logged)
    assert not any("drawn by the base model" in t for t in logged)
    # the same class images, so the same run
    assert [s["loss"] for s in _events(again.output_dir, "train")] == [s["loss"] for s in steps]


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, run):
    import shutil

    out = world["root"] / "resumed"
    shutil.copytree(run.output_dir, out)
    for c in (out / "checkpoints").iterdir():
        if c.name.endswith("4"):
            shutil.rmtree(c)
    res = train(_cfg(world, out), resume=True, quiet=True)
    assert res.status == "completed"
    want = [s["loss"] for s in _events(run.output_dir, "train")][2:]
    assert [s["loss"] for s in _events(out, "train")][-2:] == want


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("sets, says", [
    (["objective.denoise.dreambooth.instance_prompt=' '"], "instance_prompt is empty"),
    (["objective.denoise.dreambooth.instance_prompt=a sks dog"], "class_prompt is not set"),
    (["objective.denoise.dreambooth.instance_prompt=a sks dog", "objective.denoise.dreambooth.class_prompt=a dog",
      "objective.denoise.dreambooth.num_class_images=0"], "num_class_images is 0"),
    (["objective.denoise.dreambooth.instance_prompt=a sks dog", "objective.denoise.dreambooth.class_prompt=a dog",
      "objective.denoise.dreambooth.prior_loss_weight=-1"], "prior_loss_weight is -1"),
    (["objective.denoise.dreambooth.instance_prompt=a sks dog",
      "objective.denoise.dreambooth.class_prompt=a sks dog"], "class_prompt equals instance_prompt"),
    (["objective.denoise.dreambooth.class_prompt=a dog"], "instance_prompt is not"),
])
def test_bad_dreambooth_settings_are_refused_with_their_code(world, tmp_path, capsys, sets, says):
    with pytest.raises(ConfigError, match=rf"objective\.denoise\.dreambooth: .*{says}.*\[C010\]"):
        load_config(None, ["objective.name=denoise", *sets])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {world['pipe']}\ndata:\n  train: {world['data']}\nobjective:\n  name: denoise\n")
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), *args]) == 2
    assert "[C010]" in capsys.readouterr().err


def test_without_prior_preservation_no_class_prompt_is_needed(world):
    cfg = load_config(None, ["objective.name=denoise", "objective.denoise.dreambooth.instance_prompt=a sks dog",
                             "objective.denoise.dreambooth.prior_preservation=false"])
    assert not cfg.objective.denoise.dreambooth.with_prior


def test_check_reads_captionless_subject_images_with_the_instance_prompt(world, capsys):
    args = ["check", "--model", str(world["pipe"]), "--data", str(world["data"]), "--set", "objective.name=denoise"]
    assert main(args) == 2 and "E038" in capsys.readouterr().out  # no captions, no instance prompt
    assert main(args + ["--set", f"objective.denoise.dreambooth.instance_prompt={INSTANCE}", "--set",
                        "objective.denoise.dreambooth.prior_preservation=false"]) == 0
    assert INSTANCE in capsys.readouterr().out


def test_evaluations_draw_the_class_prompt_and_read_it_back(world):
    res = train(_cfg(world, world["root"] / "run-eval", "data.valid_fraction=0.25", "train.max_steps=2",
                     "eval.best_metric=class_accuracy", "objective.denoise.images_per_prompt=2"), quiet=True)
    assert res.status == "completed" and res.best_step == 2
    (ev,) = _events(res.output_dir, "eval")
    assert 0.0 <= ev["stats"]["class_accuracy"] <= 1.0
    assert "caption_accuracy" not in ev["stats"]  # the instance prompt is not the detector's to read
    assert [s["prompt"] for s in ev["samples"]] == [INSTANCE, CLASS] and ev["samples"][1]["control"]


def test_a_latent_model_trains_on_cached_latents_of_its_class_images_too(world, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
    from sd_helpers import tiny_sd

    monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "subject"
    synth.write_dataset(data, "purple", n=3, seed=0, resolution=32)
    sd = tiny_sd(tmp_path / "sd15")
    res = train(_cfg(world, tmp_path / "run", f"model.name={sd}", f"data.train={data}", "train.max_steps=2",
                     "objective.denoise.dreambooth.num_class_images=2"), quiet=True)
    assert res.status == "completed"
    logged = " ".join(e["text"] for e in _events(res.output_dir, "message"))
    assert "2 class images drawn by the base model" in logged and "5 images encoded by the VAE" in logged  # 3 + 2
    steps = _events(res.output_dir, "train")
    assert len(steps) == 2 and all(s["stats"]["prior_mse"] > 0 for s in steps)
