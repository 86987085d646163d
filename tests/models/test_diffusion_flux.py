"""Flux, a second flow-matching transformer family, through the run machinery, on a tiny random pipeline of exactly its
classes built here (sd_helpers.tiny_flux: FluxPipeline, FluxTransformer2DModel with guidance embedded, CLIPTextModel,
T5EncoderModel with tokenizers made in the test, AutoencoderKL with Flux's shift and scale, FLUX.1-dev's
FlowMatchEulerDiscreteScheduler; 32x32 images, 16x16 latents packed 2x2): the caption embeddings equal the pipeline's
encode_prompt, the transformer is called on packed latents as the pipeline calls it, the loss falls and its first steps
are the recorded ones, a LoRA run (transformer and CLIP) resumes bit for bit, changes adapter tensors only and exports
(diffusers LoRA file, merged folder, kohya and ComfyUI LoRA files) drawing the run's images; kohya's fused q/k/v and
linear1 LoRA is exactly the separate ones', also at FLUX.1's sizes through diffusers' converter; an incomplete Flux
folder is refused naming what is missing."""

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
    # the default targets put LoRA on the single blocks' q/k/v, kohya's linear1, which diffusers' converter splits at
    # FLUX.1's sizes only: this tiny transformer's kohya file cannot be read back, so it is refused, nothing written
    with pytest.raises(ExportError, match="linear1 at FLUX.1's sizes .* has 224"):
        export_model(lora_run.output_dir, "adapter", tmp_path / "k", style="kohya")
    assert not (tmp_path / "k").exists()
    res = export_model(lora_run.output_dir, "adapter", tmp_path / "all", style="all")  # kohya left out, said why
    assert {c.name for c in res.checks if c.info} == {"--style kohya"}
    assert not (tmp_path / "all" / "lora_kohya.safetensors").exists() and all(c.ok for c in res.checks)
    assert "lora_kohya.safetensors" not in (tmp_path / "all" / "tunesmith.json").read_text()
    res = export_model(lora_run.output_dir, "adapter", tmp_path / "c", style="comfyui")
    assert len(res.checks) == 1 and res.checks[0].ok and "max |Δpixel| 0 of 255" in res.checks[0].detail


# double-block LoRA only (diffusers' kohya Flux converter reads single blocks' linear1 at FLUX.1's sizes alone)
DOUBLE = ["method.lora.target_modules=[transformer_blocks.0.attn.to_q, transformer_blocks.0.attn.to_k, "
          "transformer_blocks.0.attn.to_v, transformer_blocks.0.attn.to_out.0, transformer_blocks.0.attn.add_k_proj, "
          "transformer_blocks.0.attn.to_add_out, transformer_blocks.0.ff.net.2, "
          "single_transformer_blocks.0.proj_out, single_transformer_blocks.0.norm.linear]"]


def test_kohya_and_comfyui_files_draw_the_runs_images(world, tmp_path):
    """--style all on a LoRA run of the transformer's blocks and CLIP: kohya's Flux layout (fused img_attn_qkv with
    to_q/k/v, txt_attn_qkv with only add_k adapted: zero q and v blocks; CLIP under lora_te1_) through diffusers' kohya
    Flux converter, and ComfyUI's (diffusers names, the scale in lora_B), each drawing the run's very pixels."""
    from safetensors import safe_open

    from tunesmith.export import export_model
    from tunesmith.export import lora_formats as lf

    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "double", *TEXT, *DOUBLE, "train.max_steps=2",
                       "checkpoint.every_steps=2"), quiet=True)
    out = export_model(res.output_dir, "adapter", tmp_path / "all", style="all")
    assert len(out.checks) == 3 and all(c.ok and "max |Δpixel| 0 of 255" in c.detail for c in out.checks), out.checks
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images

    kw = dict(steps=2, guidance=3.5)  # the adapter moves pixels, so drawing the run's pixels means it was loaded
    prompts = ["two small red crosses on a blue background"] * 2
    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    assert not np.array_equal(generate_images(load_tuned_pipeline(res.output_dir / "best"), prompts, [1, 2], **kw),
                              generate_images(plain, prompts, [1, 2], **kw))
    kohya = load_file(tmp_path / "all" / lf.FILES["kohya"])
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya
            if k.startswith("lora_unet_")} == {f"lora_unet_{n}" for n in (
        "double_blocks_0_img_attn_qkv", "double_blocks_0_img_attn_proj", "double_blocks_0_txt_attn_qkv",
        "double_blocks_0_txt_attn_proj", "double_blocks_0_img_mlp_2", "single_blocks_0_linear2",
        "single_blocks_0_modulation_lin")}
    qkv = "lora_unet_double_blocks_0_txt_attn_qkv"  # rank 3 x 4, alpha 3 x 8, only the k rows and columns non-zero
    assert kohya[qkv + ".lora_down.weight"].shape == (12, 32) and kohya[qkv + ".lora_up.weight"].shape == (96, 12)
    assert float(kohya[qkv + ".alpha"]) == 24.0 and float(kohya["lora_unet_single_blocks_0_linear2.alpha"]) == 8.0
    up = kohya[qkv + ".lora_up.weight"]
    assert up[32:64, 4:8].abs().sum() > 0 and up[:32].abs().sum() == 0 and up[64:].abs().sum() == 0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    comfy = load_file(tmp_path / "all" / lf.FILES["comfyui"])
    theirs = load_file(tmp_path / "all" / lf.FILES["diffusers"])
    q = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    assert torch.equal(comfy[q], theirs[q] * 2.0) and len(comfy) == len(theirs)  # the scale alpha 8 / r 4 in B
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in comfy
    with safe_open(str(tmp_path / "all" / lf.FILES["kohya"]), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_module"] == "networks.lora_flux"


def test_a_fused_lora_is_exactly_the_separate_ones():
    """fuse_lora: up @ down * alpha / rank gives each part's rows scale * B_i @ A_i and a missing part's rows zero
    (to float rounding; ranks and scales that differ are folded into B); at FLUX.1's sizes diffusers' kohya converter
    (FluxPipeline.lora_state_dict) splits linear1 and img_attn_qkv back into the very A_i and B_i, times its scale."""
    from diffusers import FluxPipeline

    from tunesmith.export.lora_transformers import FLUX1_LINEAR1, fuse_lora

    g = torch.Generator().manual_seed(0)
    parts = {0: (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0),
             2: (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0),
             3: (torch.randn(4, 32, generator=g), torch.randn(128, 4, generator=g), 8.0)}
    sizes = (32, 32, 32, 128)
    down, up, alpha = fuse_lora(parts, sizes, 32)
    assert down.shape == (16, 32) and up.shape == (224, 16) and alpha == 32.0
    update, rows = up @ down * (alpha / down.shape[0]), np.cumsum((0,) + sizes)
    for i in range(4):
        want = parts[i][1] @ parts[i][0] * 2.0 if i in parts else torch.zeros(sizes[i], 32)
        torch.testing.assert_close(update[rows[i]:rows[i + 1]], want, rtol=1e-6, atol=1e-6)
    mixed = {0: (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 8.0), 1: parts[0][:2] + (2.0,)}
    down, up, alpha = fuse_lora(mixed, (32, 32, 32), 32)
    assert down.shape == (10, 32) and alpha == 10.0  # ranks 2 + 4 + 4 (the missing part zero), scales in B
    torch.testing.assert_close((up @ down)[:32], mixed[0][1] @ mixed[0][0] * 4.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((up @ down)[32:64], parts[0][1] @ parts[0][0] * 0.5, rtol=1e-6, atol=1e-6)

    # FLUX.1's widths (3072, MLP 12288), rank 4, alpha 8 (scale 2, the converter multiplies A by it)
    a = [torch.randn(4, 3072, generator=g) for _ in range(4)]
    b = [torch.randn(n, 4, generator=g) for n in FLUX1_LINEAR1]
    state = {}
    for name, n in (("single_blocks_0_linear1", 4), ("double_blocks_0_img_attn_qkv", 3)):
        down, up, alpha = fuse_lora({i: (a[i], b[i], 8.0) for i in range(n - 1)}, FLUX1_LINEAR1[:n], 3072)
        state |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                  f"lora_unet_{name}.alpha": torch.tensor(alpha)}
    back = FluxPipeline.lora_state_dict(state)
    for block, names in (("single_transformer_blocks.0", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
                         ("transformer_blocks.0", ["attn.to_q", "attn.to_k", "attn.to_v"])):
        for i, name in enumerate(names):
            got_a, got_b = (back[f"transformer.{block}.{name}.lora_{x}.weight"] for x in "AB")
            if i == len(names) - 1:  # the part the run did not adapt: zero blocks
                assert not got_a.any() and not got_b.any()
            else:
                assert torch.equal(got_a, a[i] * 2.0) and torch.equal(got_b, b[i])


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


def test_kohya_refuses_what_diffusers_cannot_read_back(world):
    """An outer layer (diffusers' converter drops it), a module with no sd-scripts name (diffusers' fused to_qkv), a T5
    adapter (no reader for it in either layout): refused, naming the module."""
    from tunesmith.export import ExportError
    from tunesmith.export import lora_formats as lf
    from tunesmith.export.lora_transformers import flux_kohya_name

    assert flux_kohya_name("single_transformer_blocks.3.proj_mlp") == ("lora_unet_single_blocks_3_linear1", 3)
    assert flux_kohya_name("transformer_blocks.0.attn.add_v_proj") == ("lora_unet_double_blocks_0_txt_attn_qkv", 2)
    with pytest.raises(ExportError, match="'x_embedder'.*drops the outer layers"):
        flux_kohya_name("x_embedder")
    with pytest.raises(ExportError, match="'transformer_blocks.0.attn.to_qkv'.* no name in kohya's Flux layout"):
        flux_kohya_name("transformer_blocks.0.attn.to_qkv")
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 32),
          "encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 4)}
    for style in ("kohya", "comfyui"):
        with pytest.raises(ExportError, match="T5 encoder \\(text_encoder_2\\)"):
            lf._transformer_style(style, "FluxPipeline", {"transformer": {}, "text_encoder_2": t5}, {}, world["pipe"])


def test_the_comfyui_file_carries_every_layer(world, tmp_path):
    """LoRA on every linear layer of the transformer (the outer ones kohya cannot carry included) and on CLIP, B drawn
    at random: the ComfyUI file (write_style / load_style, as the export writes and checks it) draws the pixels of the
    diffusers file, and its B is the diffusers file's times alpha / r."""
    from diffusers import FluxPipeline

    from tunesmith.config import MethodConfig
    from tunesmith.evaluate.images import generate_images
    from tunesmith.export import lora_formats as lf
    from tunesmith.models.diffusion import adapt_diffusion, save_lora_file

    net = load_diffusion_model(world["pipe"])
    linear = sorted({n for n, m in net.transformer.named_modules() if isinstance(m, torch.nn.Linear)})
    method = {"name": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": linear}}
    net, _ = adapt_diffusion(net, MethodConfig.model_validate(method), train_text_encoder=True)
    g = torch.Generator().manual_seed(0)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora_file(FluxPipeline, tmp_path / "lora", net)
    name = lf.write_style("comfyui", tmp_path / "lora" / LORA_FILE, tmp_path, world["pipe"])
    comfy, theirs = load_file(tmp_path / name), load_file(tmp_path / "lora" / LORA_FILE)
    assert len(comfy) == len(theirs) and len(theirs) == 2 * (len(linear) + 8)  # CLIP: 2 layers x q, k, v, out
    out_b = "transformer.norm_out.linear.lora_B.weight"  # an outer layer, alpha 16 / r 4
    assert torch.equal(comfy[out_b], theirs[out_b] * 4)
    kw = dict(steps=2, guidance=3.5)
    prompts = ["two small red crosses on a blue background"] * 2
    want = FluxPipeline.from_pretrained(str(world["pipe"]))
    want.load_lora_weights(str(tmp_path / "lora"))
    got = FluxPipeline.from_pretrained(str(world["pipe"]))
    lf.load_style(got, "comfyui", tmp_path)
    plain = generate_images(FluxPipeline.from_pretrained(str(world["pipe"])), prompts, [1, 2], **kw)
    want = generate_images(want, prompts, [1, 2], **kw)
    assert not np.array_equal(plain, want) and np.array_equal(generate_images(got, prompts, [1, 2], **kw), want)
