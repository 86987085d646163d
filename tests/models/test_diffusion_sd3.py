"""SD3, a flow-matching transformer family, through the run machinery, on a tiny random pipeline of exactly its classes
built here (sd_helpers.tiny_sd3: StableDiffusion3Pipeline, SD3Transformer2DModel, two CLIPTextModelWithProjection and a
T5EncoderModel with tokenizers made in the test, AutoencoderKL with SD3's shift and scale, FlowMatchEulerDiscreteScheduler;
32x32 images, 16x16 latents): the caption embeddings equal the pipeline's encode_prompt, the loss is diffusers' SD3
flow-matching loss (checked against its formula written out here), falls on a fixed batch and its first steps are the
recorded ones; a LoRA run (transformer and both CLIP encoders) evaluates at fixed timesteps, resumes bit for bit,
changes adapter tensors only, and exports (diffusers LoRA file, merged folder, ComfyUI LoRA file) drawing the run's
images; the kohya layout is refused with the reason; an incomplete SD3 folder is refused naming what is missing."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import RESOLUTION, check_lora_run, check_resume_bit_exact, events, fit_one_batch, sd_cfg, tiny_sd3

from tunesmith.images import synth
from tunesmith.models import ModelError
from tunesmith.models.diffusion import LORA_FILE, check_pipeline_folder, load_diffusion_model, load_tuned_pipeline
from tunesmith.train import train

TEXT = ["objective.denoise.train_text_encoder=true"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"root": root, "pipe": tiny_sd3(root / "sd3"),
            "data": synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=RESOLUTION)}


@pytest.fixture(scope="module")
def lora_run(world):
    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "run", *TEXT), quiet=True)
    assert res.status == "completed"
    return res


def test_caption_embeddings_are_the_pipelines_own(world):
    net = load_diffusion_model(world["pipe"])
    assert net.family.name == "sd3" and net.family.flow and type(net.denoiser).__name__ == "SD3Transformer2DModel"
    assert set(net.text_encoders()) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    captions = ["two small red crosses on a blue background", ""]
    with torch.no_grad():
        ours = net.encode_text(net.tokenize(captions))
        embeds, _, pooled, _ = net.pipeline.encode_prompt(captions, None, None, device="cpu",
                                                          do_classifier_free_guidance=False)
    assert ours["embeds"].shape == (2, 77 + 256, 32) and ours["pooled"].shape == (2, 32)
    assert torch.equal(ours["embeds"], embeds) and torch.equal(ours["pooled"], pooled)


def _objective(net, records, settings):
    from tunesmith.objectives.denoise import Denoise, embed_captions, encode_latents

    obj = Denoise(settings)
    obj.resolution, obj.latent, obj.latent_shape, obj.num_timesteps = RESOLUTION, True, (4, 16, 16), 1000
    obj.flow = True
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    return obj


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_the_loss_is_diffusers_flow_matching_loss(world, scheme):
    """x_t = (1 - sigma) x0 + sigma n at the scheduler's sigma for the drawn timestep; the transformer sees that
    timestep; the target n - x0; weights compute_loss_weighting_for_sd3 (cosmap: 2 / (pi (1 - 2s + 2s^2))); x0 the
    VAE's sample shifted by shift_factor and scaled by scaling_factor. Timesteps drawn from the scheme's density with
    each image's own generator (a logit-normal draw is sigmoid of a normal one)."""
    import math

    from tunesmith.config import DenoiseConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.objectives.denoise import ImageItem
    from tunesmith.train.steps import Compute

    net = load_diffusion_model(world["pipe"])
    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:3]
    obj = _objective(net, records, DenoiseConfig(caption_dropout=0.0, weighting_scheme=scheme))
    batch = obj.collate([ImageItem(r, i, step=5) for i, r in enumerate(records)], None, "padded")
    with torch.no_grad():
        loss, stats = obj.loss(net, batch, Compute())
        vae = net.vae.config
        x0 = ((batch["latent_mean"] + batch["latent_std"] * batch["vae_eps"]) - vae.shift_factor) * vae.scaling_factor
        sched = net.noise_scheduler  # diffusers' script: timesteps[indices], then get_sigmas looks each one up
        timesteps = sched.timesteps[batch["timesteps"]]
        sigma = sched.sigmas[[int((sched.timesteps == t).nonzero()[0]) for t in timesteps]].view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * batch["noise"]
        pred = net.transformer(hidden_states=noisy, timestep=timesteps,
                               encoder_hidden_states=batch["embeds"], pooled_projections=batch["pooled"]).sample
        w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)) if scheme == "cosmap" else torch.ones_like(sigma)
        want = (w * (pred - (batch["noise"] - x0)) ** 2).reshape(3, -1).mean(1).sum()
    assert torch.allclose(loss, want, rtol=1e-5)
    assert stats["mse"] == pytest.approx(float(((pred - (batch["noise"] - x0)) ** 2).reshape(3, -1).mean(1).sum()),
                                         rel=1e-5)
    # the draw: each image's timestep from its own stream, logit-normal by default
    assert len(set(batch["timesteps"].tolist())) == 3 and all(0 <= t < 1000 for t in batch["timesteps"].tolist())


def test_the_loss_goes_down_on_a_fixed_batch(world):
    from tunesmith.config import DenoiseConfig, MethodConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.models.diffusion import adapt_diffusion
    from tunesmith.objectives.denoise import ImageItem

    net, counts = adapt_diffusion(load_diffusion_model(world["pipe"]),
                                  MethodConfig.model_validate({"name": "lora", "lora": {"r": 8, "alpha": 8}}))
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in net.named_parameters() if p.requires_grad}
    assert lora == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:4]
    obj = _objective(net, records, DenoiseConfig(caption_dropout=0.0))
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    losses = fit_one_batch(obj, net, batch)
    assert all(np.isfinite(losses)) and max(losses[-3:]) < 0.85 * losses[0], losses


# ---------------------------------------------------------------- a run: train, evaluate, resume, export

# the LoRA run's first 3 step losses (per image), recorded on the 2-core Xeon this was written on; float32 throughout,
# so another CPU's kernels move them by far less than the tolerance
GOLDEN = [4.265375, 4.436477, 4.577222]


def test_a_lora_run_trains_evaluates_and_matches_its_golden_losses(world, lora_run):
    check_lora_run(lora_run.output_dir, GOLDEN, "sd3")


def test_lora_changes_adapter_tensors_only(world, lora_run):
    saved = load_file(lora_run.output_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert {k.split(".")[0] for k in saved} == {"transformer", "text_encoder", "text_encoder_2"}  # T5 stays frozen
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())
    tuned = load_tuned_pipeline(lora_run.output_dir / "best")
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    for part in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        mine = {k.replace(".base_layer", ""): v for k, v in getattr(tuned, part).state_dict().items() if "lora_" not in k}
        theirs = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, lora_run):
    check_resume_bit_exact(world, lora_run, *TEXT)


def test_exports_draw_the_runs_images(world, lora_run, tmp_path):
    """--format adapter (the diffusers file, load_lora_weights on the base: the very pixels), --style comfyui (diffusers'
    names, the scale alpha/r in lora_B: ComfyUI's "regular diffusers sd3 lora format"; the very pixels) and --format
    diffusers (the merged StableDiffusion3Pipeline folder: within a level or two); kohya refused, nothing written, and
    left out of --style all with the reason."""
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images
    from tunesmith.export import ExportError, export_model

    res = export_model(lora_run.output_dir, "adapter", tmp_path / "lora")
    assert len(res.checks) == 1 and all(c.ok and "max |Δpixel| 0 of 255" in c.detail for c in res.checks)
    kw = dict(steps=3, guidance=4.0)
    prompts = ["two small red crosses on a blue background"] * 2
    run_images = generate_images(load_tuned_pipeline(lora_run.output_dir / "best"), prompts, [1, 2], **kw)
    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    assert not np.array_equal(generate_images(plain, prompts, [1, 2], **kw), run_images)
    plain.load_lora_weights(str(tmp_path / "lora"))
    assert np.array_equal(generate_images(plain, prompts, [1, 2], **kw), run_images)

    res = export_model(lora_run.output_dir, "diffusers", tmp_path / "merged")
    assert all(c.ok for c in res.checks) and len(res.checks) == 2
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "StableDiffusion3Pipeline"
    assert np.abs(generate_images(merged, prompts, [1, 2], **kw).astype(int) - run_images).max() <= 4

    from tunesmith.export import lora_formats as lf

    res = export_model(lora_run.output_dir, "adapter", tmp_path / "c", style="comfyui")
    assert len(res.checks) == 1 and res.checks[0].ok and "max |Δpixel| 0 of 255" in res.checks[0].detail
    comfy = load_file(tmp_path / "c" / lf.FILES["comfyui"])
    theirs = load_file(tmp_path / "lora" / lf.FILES["diffusers"])
    q = "transformer.transformer_blocks.0.attn.to_q.lora_"
    assert torch.equal(comfy[q + "A.weight"], theirs[q + "A.weight"])
    assert torch.equal(comfy[q + "B.weight"], theirs[q + "B.weight"] * 2.0)  # alpha 8 / r 4
    assert torch.equal(comfy["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"],
                       theirs["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] * 2.0)
    assert len(comfy) == len(theirs) and not any(k.endswith(".alpha") for k in comfy)
    # sd-scripts' SD3 layout: diffusers has no converter that reads it back; named alone it is refused, nothing
    # written; under --style all the layouts that do round-trip are written and kohya's reason is an info line
    with pytest.raises(ExportError, match="kohya for an SD3 LoRA.*no converter.*--style diffusers or comfyui"):
        export_model(lora_run.output_dir, "adapter", tmp_path / "kohya", style="kohya")
    assert not (tmp_path / "kohya").exists()
    res = export_model(lora_run.output_dir, "adapter", tmp_path / "all", style="all")
    assert sorted(f.name for f in (tmp_path / "all").glob("*.safetensors")) == sorted(
        [lf.FILES["diffusers"], lf.FILES["comfyui"]])
    assert [c.ok for c in res.checks if not c.info] == [True, True]
    (skipped,) = [c for c in res.checks if c.info]
    assert skipped.name == "--style kohya" and "not written: --style kohya for an SD3 LoRA" in skipped.detail


def test_a_full_run_delivers_a_pipeline(world):
    from diffusers import DiffusionPipeline

    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "full", "method.name=full", "train.max_steps=2",
                       "train.lr=1e-3", "eval.every_steps=2"), quiet=True)
    tuned = DiffusionPipeline.from_pretrained(str(res.output_dir / "best"))
    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    assert type(tuned.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert any(not torch.equal(v, base.transformer.state_dict()[k]) for k, v in tuned.transformer.state_dict().items())
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert all(torch.equal(v, getattr(base, part).state_dict()[k])
                   for k, v in getattr(tuned, part).state_dict().items()), part


# ---------------------------------------------------------------- incomplete folders


def _copy(world, name):
    dst = world["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world["pipe"], dst)
    return dst


def _set(folder, file, **changes):
    doc = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps(doc | changes))


def test_an_incomplete_sd3_folder_names_what_is_missing(world, tmp_path):
    check_pipeline_folder(world["pipe"])
    gone = _copy(world, "no-transformer")
    shutil.rmtree(gone / "transformer")
    with pytest.raises(ModelError, match=r"folders are missing: transformer/ \(SD3Transformer2DModel\)"):
        check_pipeline_folder(gone)
    no_clip = _copy(world, "no-te2")
    _set(no_clip, "model_index.json", text_encoder_2=[None, None])
    with pytest.raises(ModelError, match="sd3 family.* lists no text_encoder_2"):
        check_pipeline_folder(no_clip)
    half_t5 = _copy(world, "half-t5")
    _set(half_t5, "model_index.json", text_encoder_3=[None, None])
    with pytest.raises(ModelError, match="lists tokenizer_3 but no text_encoder_3"):
        check_pipeline_folder(half_t5)
    ddpm = _copy(world, "ddpm")
    _set(ddpm, "scheduler/scheduler_config.json", _class_name="DDPMScheduler")
    with pytest.raises(ModelError, match="scheduler is a DDPMScheduler.*sd3 family.*FlowMatchEulerDiscreteScheduler"):
        check_pipeline_folder(ddpm)
    no_t5 = _copy(world, "no-t5")  # SD3 without T5 is a pipeline diffusers runs: accepted
    _set(no_t5, "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    check_pipeline_folder(no_t5)
    with pytest.raises(ModelError, match="transformer/"):
        train(sd_cfg(gone, world["data"], tmp_path / "run"), quiet=True)


def test_gradient_checkpointing_gives_the_same_gradients(world):
    """train.gradient_checkpointing: the transformer and both trained CLIP encoders recompute activations in backward
    (T5, frozen, is left alone); the loss and every adapter's gradient are the same (float rounding aside)."""
    from sd_helpers import grads_with_and_without_checkpointing

    [(plain, g0), (ckpt, g1)], net = grads_with_and_without_checkpointing(world["pipe"], world["data"])
    assert net.transformer.is_gradient_checkpointing
    assert net.text_encoder.is_gradient_checkpointing and net.text_encoder_2.is_gradient_checkpointing
    assert not net.text_encoder_3.is_gradient_checkpointing
    # train mode for what trains; frozen T5 (dropout 0.1 here, as SD3's) in eval mode, so the loss is not random
    assert net.transformer.training and net.text_encoder.training and not net.text_encoder_3.training
    assert plain == pytest.approx(ckpt, rel=1e-6) and g0.keys() == g1.keys()
    assert {k.split(".")[0] for k in g0} == {"transformer", "text_encoder", "text_encoder_2"}
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7) for k in g0)


def test_mixed_precision_follows_the_autocast_path(world):
    """bf16 autocast (model.dtype bf16-mixed): the same loss within bf16's rounding (measured: 2e-4 relative for
    SDXL, 8e-5 for SD3)."""
    from sd_helpers import losses_fp32_and_bf16

    fp32, bf16 = losses_fp32_and_bf16(world["pipe"], world["data"])
    assert np.isfinite(bf16) and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.01)


def test_without_t5_the_sequence_is_clips_and_zeros_as_the_pipelines(world):
    """A folder whose model_index.json lists no T5 (text_encoder_3 and tokenizer_3 null: how SD3 runs on less memory)
    loads and encodes captions as its pipeline does: the CLIP states padded, then 256 zero rows."""
    no_t5 = _copy(world, "no-t5-encode")
    _set(no_t5, "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    net = load_diffusion_model(no_t5)
    assert "text_encoder_3" not in net.text_encoders()
    with torch.no_grad():
        ours = net.encode_text(net.tokenize(["two small red crosses on a blue background"]))
        embeds, _, pooled, _ = net.pipeline.encode_prompt(["two small red crosses on a blue background"], None, None,
                                                          device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours["embeds"], embeds) and torch.equal(ours["pooled"], pooled)
    assert ours["embeds"].shape == (1, 77 + 256, 32) and not ours["embeds"][:, 77:].any()
