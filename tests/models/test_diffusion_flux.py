"""Flux, a second flow-matching transformer family, through the run machinery, on a tiny random pipeline of exactly its
classes built here (sd_helpers.tiny_flux: FluxPipeline, FluxTransformer2DModel with guidance embedded, CLIPTextModel,
T5EncoderModel with tokenizers made in the test, AutoencoderKL with Flux's shift and scale, FLUX.1-dev's
FlowMatchEulerDiscreteScheduler; 32x32 images, 16x16 latents packed 2x2): the caption embeddings equal the pipeline's
encode_prompt, the transformer is called on packed latents as the pipeline calls it, the loss falls and its first steps
are the recorded ones, a LoRA run (transformer and CLIP) resumes bit for bit, changes adapter tensors only and exports
(diffusers LoRA file, merged folder) drawing the run's images; an incomplete Flux folder is refused naming what is
missing."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import RESOLUTION, check_lora_run, check_resume_bit_exact, events, fit_one_batch, sd_cfg, tiny_flux

from tunesmith.images import synth
from tunesmith.models import ModelError
from tunesmith.models.diffusion import LORA_FILE, check_pipeline_folder, load_diffusion_model, load_tuned_pipeline
from tunesmith.train import train

TEXT = ["objective.denoise.train_text_encoder=true"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"root": root, "pipe": tiny_flux(root / "flux"),
            "data": synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=RESOLUTION)}


@pytest.fixture(scope="module")
def lora_run(world):
    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "run", *TEXT), quiet=True)
    assert res.status == "completed"
    return res


def test_captions_and_the_transformer_call_are_the_pipelines(world):
    """T5's sequence and CLIP's pooled output equal encode_prompt's; on latents packed by the pipeline's own
    prepare_latents, our call (pack, position ids, timestep / 1000, guidance 3.5, unpack) is the pipeline's."""
    from tunesmith.models.diffusion import FLUX_GUIDANCE

    net = load_diffusion_model(world["pipe"])
    pipe = net.pipeline
    assert net.family.name == "flux" and net.family.packed and net.resolution() == RESOLUTION
    captions = ["two small red crosses on a blue background", ""]
    with torch.no_grad():
        ours = net.encode_text(net.tokenize(captions))
        embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device="cpu")
        assert ours["embeds"].shape == (2, 512, 32) and ours["pooled"].shape == (2, 32)
        assert torch.equal(ours["embeds"], embeds) and torch.equal(ours["pooled"], pooled)
        packed, img_ids = pipe.prepare_latents(2, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu",
                                               torch.Generator().manual_seed(0))
        t = torch.tensor([700.0, 80.0])
        want = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), FLUX_GUIDANCE),
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=img_ids).sample
        latents = pipe._unpack_latents(packed, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)
        got = net(latents, t, ours)
    assert got.shape == (2, 4, 16, 16)
    assert torch.equal(pipe._pack_latents(got, 2, 4, 16, 16), want)


def test_the_loss_goes_down_on_a_fixed_batch(world):
    from tunesmith.config import DenoiseConfig, MethodConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.models.diffusion import adapt_diffusion
    from tunesmith.objectives.denoise import Denoise, ImageItem, embed_captions, encode_latents

    net, _ = adapt_diffusion(load_diffusion_model(world["pipe"]),
                             MethodConfig.model_validate({"name": "lora", "lora": {"r": 8, "alpha": 8}}))
    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:4]
    obj = Denoise(DenoiseConfig(caption_dropout=0.0))
    obj.resolution, obj.latent, obj.latent_shape, obj.num_timesteps, obj.flow = RESOLUTION, True, (4, 16, 16), 1000, True
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    losses = fit_one_batch(obj, net, batch)
    assert all(np.isfinite(losses)) and max(losses[-3:]) < 0.85 * losses[0], losses


# the LoRA run's first 3 step losses (per image), recorded on the 2-core Xeon this was written on; float32 throughout,
# so another CPU's kernels move them by far less than the tolerance
GOLDEN = [1.600628, 1.538201, 1.505552]


def test_a_lora_run_trains_evaluates_and_matches_its_golden_losses(world, lora_run):
    check_lora_run(lora_run.output_dir, GOLDEN, "flux", grids=False)


def test_lora_changes_adapter_tensors_only(world, lora_run):
    saved = load_file(lora_run.output_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert {k.split(".")[0] for k in saved} == {"transformer", "text_encoder"}  # T5 stays frozen
    tuned = load_tuned_pipeline(lora_run.output_dir / "best")
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        mine = {k.replace(".base_layer", ""): v for k, v in getattr(tuned, part).state_dict().items() if "lora_" not in k}
        theirs = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, lora_run):
    check_resume_bit_exact(world, lora_run, *TEXT)


def test_exports_draw_the_runs_images(world, lora_run, tmp_path):
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images
    from tunesmith.export import ExportError, export_model

    res = export_model(lora_run.output_dir, "adapter", tmp_path / "lora")
    assert len(res.checks) == 1 and all(c.ok and "max |Δpixel| 0 of 255" in c.detail for c in res.checks)
    kw = dict(steps=3, guidance=3.5)
    prompts = ["two small red crosses on a blue background"] * 2
    run_images = generate_images(load_tuned_pipeline(lora_run.output_dir / "best"), prompts, [1, 2], **kw)
    assert run_images.shape == (2, RESOLUTION, RESOLUTION, 3)
    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    assert not np.array_equal(generate_images(plain, prompts, [1, 2], **kw), run_images)
    plain.load_lora_weights(str(tmp_path / "lora"))
    assert np.array_equal(generate_images(plain, prompts, [1, 2], **kw), run_images)
    res = export_model(lora_run.output_dir, "diffusers", tmp_path / "merged")
    assert all(c.ok for c in res.checks) and len(res.checks) == 2
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))).__name__ == "FluxPipeline"
    with pytest.raises(ExportError, match="Flux.*--style diffusers"):
        export_model(lora_run.output_dir, "adapter", tmp_path / "k", style="kohya")
    assert not (tmp_path / "k").exists()


def _copy(world, name):
    dst = world["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world["pipe"], dst)
    return dst


def test_an_incomplete_flux_folder_names_what_is_missing(world):
    check_pipeline_folder(world["pipe"])
    no_t5 = _copy(world, "no-t5")
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps(index | {"text_encoder_2": [None, None]}))
    with pytest.raises(ModelError, match="flux family.* lists no text_encoder_2"):
        check_pipeline_folder(no_t5)
    wrong_vae = _copy(world, "wrong-vae")
    cfg = json.loads((wrong_vae / "vae" / "config.json").read_text())
    (wrong_vae / "vae" / "config.json").write_text(json.dumps(cfg | {"latent_channels": 16}))
    with pytest.raises(ModelError, match="16-channel latents and the transformer takes 4"):
        check_pipeline_folder(wrong_vae)


def test_gradient_checkpointing_and_mixed_precision(world):
    """train.gradient_checkpointing: the transformer and CLIP recompute activations in backward (T5, frozen, stays in
    eval mode and is left alone), the same loss and gradients; bf16 autocast gives the fp32 loss within 1%."""
    from sd_helpers import grads_with_and_without_checkpointing, losses_fp32_and_bf16

    [(plain, g0), (ckpt, g1)], net = grads_with_and_without_checkpointing(world["pipe"], world["data"])
    assert net.transformer.is_gradient_checkpointing and net.text_encoder.is_gradient_checkpointing
    assert not net.text_encoder_2.is_gradient_checkpointing and not net.text_encoder_2.training
    assert plain == pytest.approx(ckpt, rel=1e-6) and {k.split(".")[0] for k in g0} == {"transformer", "text_encoder"}
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7) for k in g0)
    fp32, bf16 = losses_fp32_and_bf16(world["pipe"], world["data"])
    assert np.isfinite(bf16) and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.01)
