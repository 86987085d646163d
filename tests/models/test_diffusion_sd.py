"""Stable Diffusion 1.x/2.x through the run machinery, on tiny random pipelines of exactly its classes built here
(sd_helpers.tiny_sd: StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer, a
DDPM, DDIM or PNDM scheduler; 32x32 images, 16x16 latents): latents scaled by the VAE's scaling_factor and cached, the
loss going down on a fixed batch for epsilon and v-prediction, a LoRA run that evaluates (validation loss, image
grids), resumes bit for bit, changes adapter tensors only and exports (LoRA file and merged pipeline) drawing the run's
images; incomplete folders and unsupported families refused with what is missing."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import RESOLUTION, check_resume_bit_exact, events, sd_cfg, tiny_sd

from tunesmith.images import synth
from tunesmith.models import ModelError
from tunesmith.models.diffusion import (LORA_FILE, adapt_diffusion, check_pipeline_folder, load_diffusion_model,
                                        load_tuned_pipeline)
from tunesmith.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {"root": root, "pipe": tiny_sd(root / "sd15"),
            "data": synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=RESOLUTION)}


@pytest.fixture(scope="module")
def lora_run(world):
    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "run"), quiet=True)
    assert res.status == "completed"
    return res


# ---------------------------------------------------------------- the latent space and the loss


def test_the_model_is_latent_and_scales_by_the_vaes_factor(world):
    net = load_diffusion_model(world["pipe"])
    assert net.latent and net.resolution() == RESOLUTION and net.vae.config.scaling_factor == pytest.approx(0.18215)
    assert type(net.tokenizer).__name__ == "CLIPTokenizer" and type(net.text_encoder).__name__ == "CLIPTextModel"
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    with torch.no_grad():
        want = net.vae.encode(pixels).latent_dist.mean * 0.18215
        from tunesmith.objectives.denoise import scaled_latents

        dist = net.vae.encode(pixels).latent_dist
        got = scaled_latents(net.vae, dist.mean, dist.std, torch.zeros_like(dist.mean))
    assert got.shape == (2, 4, RESOLUTION // 2, RESOLUTION // 2) and torch.allclose(got, want)
    # the caption embeddings are the pipeline's own encode_prompt's
    with torch.no_grad():
        ours = net.encode_text(net.tokenize(["two small red crosses on a blue background"]))["embeds"]
        theirs, _ = net.pipeline.encode_prompt(["two small red crosses on a blue background"], "cpu", 1, False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scheduler,prediction_type", [("DDPMScheduler", "epsilon"), ("DDIMScheduler", "v_prediction"),
                                                       ("PNDMScheduler", "epsilon"), ("PNDMScheduler", "v_prediction")])
def test_the_loss_goes_down_on_a_fixed_batch(world, scheduler, prediction_type):
    """LoRA on the UNet, Adam at 3e-2, 12 steps on one fixed batch (fixed noise, timesteps and latents): the loss
    falls well below where it started, for each scheduler and prediction type (the target follows the scheduler's
    prediction_type: v = sqrt(abar) n - sqrt(1 - abar) x0 for v-prediction)."""
    from tunesmith.config import DenoiseConfig, MethodConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.objectives.denoise import Denoise, ImageItem, embed_captions, encode_latents
    from tunesmith.train.steps import Compute

    pipe = tiny_sd(world["root"] / f"sd-{scheduler}-{prediction_type}", scheduler, prediction_type,
                   linear_projection=prediction_type == "v_prediction")  # SD 2.x: linear projections, v-prediction
    net = load_diffusion_model(pipe)
    assert type(net.pipeline.scheduler).__name__ == scheduler
    assert net.noise_scheduler.config.prediction_type == prediction_type
    net, counts = adapt_diffusion(net, MethodConfig.model_validate({"name": "lora", "lora": {"r": 8, "alpha": 8}}))
    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:4]
    obj = Denoise(DenoiseConfig(caption_dropout=0.0, snr_gamma=None))
    obj.resolution, obj.latent, obj.latent_shape, obj.num_timesteps = RESOLUTION, True, (4, 16, 16), 1000
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(12):
        loss, _ = obj.loss(net, batch, Compute())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.85 * losses[0], losses


# ---------------------------------------------------------------- a run: train, evaluate, resume, export


def test_a_lora_run_trains_and_evaluates(world, lora_run):
    out = lora_run.output_dir
    steps = events(out, "train")
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(np.isfinite(e["val_loss"]) for e in evals)
    assert all((out / e["samples"][0]["image"]).is_file() for e in evals)
    messages = " ".join(e["text"] for e in events(out, "message"))
    assert "latent space" in messages and "images encoded by the VAE" in messages
    assert 'id="image-grids"' in (out / "report.html").read_text()


def test_lora_changes_adapter_tensors_only(world, lora_run):
    """The checkpoints hold adapter tensors alone; the tuned pipeline's own weights are the base's, bit for bit, and
    its adapters moved (B is no longer what PEFT's gaussian init left: zero)."""
    saved = load_file(lora_run.output_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())
    tuned = load_tuned_pipeline(lora_run.output_dir / "best")
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    for part in ("unet", "text_encoder", "vae"):
        mine = {k.replace(".base_layer", ""): v for k, v in getattr(tuned, part).state_dict().items() if "lora_" not in k}
        theirs = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, lora_run):
    check_resume_bit_exact(world, lora_run)


def test_exports_load_back_and_draw_the_runs_images(world, lora_run, tmp_path):
    """--format adapter: diffusers' load_lora_weights on the base draws the run's pixels exactly; --format diffusers:
    the merged pipeline folder, loaded by diffusers alone, within a level or two (the merge sums W + BA once)."""
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images
    from tunesmith.export import export_model

    kw = dict(steps=3, guidance=4.0)
    prompts = ["two small red crosses on a blue background"] * 2
    run_images = generate_images(load_tuned_pipeline(lora_run.output_dir / "best"), prompts, [1, 2], **kw)
    base_images = generate_images(DiffusionPipeline.from_pretrained(str(world["pipe"])), prompts, [1, 2], **kw)
    assert not np.array_equal(run_images, base_images)

    res = export_model(lora_run.output_dir, "adapter", tmp_path / "lora")
    assert all(c.ok for c in res.checks) and res.checks
    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    plain.load_lora_weights(str(tmp_path / "lora"))
    assert np.array_equal(generate_images(plain, prompts, [1, 2], **kw), run_images)

    res = export_model(lora_run.output_dir, "diffusers", tmp_path / "merged")
    assert all(c.ok for c in res.checks) and res.checks
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "StableDiffusionPipeline" and type(merged.vae).__name__ == "AutoencoderKL"
    assert np.abs(generate_images(merged, prompts, [1, 2], **kw).astype(int) - run_images).max() <= 4


@pytest.mark.parametrize("scheduler,prediction_type", [("PNDMScheduler", "v_prediction")])
def test_full_fine_tuning_of_sd2_v_prediction_delivers_a_pipeline(world, scheduler, prediction_type):
    from diffusers import DiffusionPipeline

    pipe = tiny_sd(world["root"] / f"sd-{scheduler}-{prediction_type}", scheduler, prediction_type,
                   linear_projection=True)
    res = train(sd_cfg(pipe, world["data"], world["root"] / "full", "method.name=full", "train.max_steps=2",
                       "train.lr=1e-3"), quiet=True)
    tuned = DiffusionPipeline.from_pretrained(str(res.output_dir / "best"))
    base = DiffusionPipeline.from_pretrained(str(pipe))
    assert type(tuned.scheduler).__name__ == scheduler and tuned.scheduler.config.prediction_type == prediction_type
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in tuned.unet.state_dict().items())
    for part in ("vae", "text_encoder"):  # never trained (the text encoder is frozen by default)
        assert all(torch.equal(v, getattr(base, part).state_dict()[k])
                   for k, v in getattr(tuned, part).state_dict().items()), part


# ---------------------------------------------------------------- incomplete folders, other families


def _copy(world, name):
    dst = world["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world["pipe"], dst)
    return dst


def _set_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_an_incomplete_folder_names_what_is_missing(world, tmp_path):
    no_vae = _copy(world, "no-vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(ModelError, match=r"folders are missing: vae/ \(AutoencoderKL\)"):
        check_pipeline_folder(no_vae)
    unlisted = _copy(world, "vae-null")
    _set_index(unlisted, vae=[None, None])
    with pytest.raises(ModelError, match="4-channel latents but .* has no vae"):
        check_pipeline_folder(unlisted)
    no_te = _copy(world, "no-text-encoder")
    _set_index(no_te, text_encoder=[None, None])
    with pytest.raises(ModelError, match="lists no text_encoder"):
        check_pipeline_folder(no_te)
    # training says it before the data is read or a model loaded
    with pytest.raises(ModelError, match="vae/"):
        train(sd_cfg(no_vae, world["data"], tmp_path / "run"), quiet=True)


def test_unsupported_families_are_named(world):
    sdxl = _copy(world, "sdxl-like")  # SD 1.x's folder that says it is SDXL: SDXL's parts are missing
    _set_index(sdxl, _class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
               tokenizer_2=["transformers", "CLIPTokenizer"])
    with pytest.raises(ModelError, match=r"folders are missing: text_encoder_2/ \(CLIPTextModelWithProjection\), "
                                         r"tokenizer_2/"):
        check_pipeline_folder(sdxl)
    sana = _copy(world, "sana-like")
    _set_index(sana, _class_name="SanaPipeline", transformer=["diffusers", "SanaTransformer2DModel"], unet=[None, None])
    with pytest.raises(ModelError, match="SanaPipeline has a SanaTransformer2DModel transformer denoiser.*Sana"):
        check_pipeline_folder(sana)
    odd = _copy(world, "x0")
    cfg = json.loads((odd / "scheduler" / "scheduler_config.json").read_text())
    (odd / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg | {"prediction_type": "flow"}))
    with pytest.raises(ModelError, match="prediction_type 'flow'"):
        check_pipeline_folder(odd)
