"""SDXL through the run machinery, on a tiny random pipeline of exactly its classes built here (sd_helpers.tiny_sdxl:
StableDiffusionXLPipeline, a UNet2DConditionModel with text_time added embeddings, CLIPTextModel +
CLIPTextModelWithProjection, AutoencoderKL, EulerDiscreteScheduler; 32x32 images, 16x16 latents): the caption
embeddings and pooled embeddings equal the pipeline's encode_prompt, the size/crop time ids follow the batch, the loss
falls and its first steps are the recorded ones, a LoRA run (denoiser and both text encoders) resumes bit for bit,
changes adapter tensors only, and every export (merged folder; diffusers, kohya and ComfyUI LoRA files) draws the run's
images; full and freeze runs train; an incomplete SDXL folder is refused naming what is missing."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import RESOLUTION, check_lora_run, check_resume_bit_exact, events, fit_one_batch, sd_cfg, tiny_sdxl

from tunesmith.images import synth
from tunesmith.models import ModelError
from tunesmith.models.diffusion import LORA_FILE, check_pipeline_folder, load_diffusion_model, load_tuned_pipeline
from tunesmith.train import train

TEXT = ["objective.denoise.train_text_encoder=true"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"root": root, "pipe": tiny_sdxl(root / "sdxl"),
            "data": synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=RESOLUTION)}


@pytest.fixture(scope="module")
def lora_run(world):
    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / "run", *TEXT), quiet=True)
    assert res.status == "completed"
    return res


def test_captions_and_pooled_embeddings_are_the_pipelines_own(world):
    net = load_diffusion_model(world["pipe"])
    assert net.family.name == "sdxl" and set(net.text_encoders()) == {"text_encoder", "text_encoder_2"}
    captions = ["two small red crosses on a blue background", ""]
    with torch.no_grad():
        ours = net.encode_text(net.tokenize(captions))
        embeds, _, pooled, _ = net.pipeline.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
    assert ours["embeds"].shape == (2, 77, 32) and ours["pooled"].shape == (2, 16)
    assert torch.equal(ours["embeds"], embeds) and torch.equal(ours["pooled"], pooled)
    # the cache keeps both, and reads them back equal
    from tunesmith.objectives.denoise import embed_captions

    cached = embed_captions(net, captions, "cpu", lambda e: None)
    again = embed_captions(net, captions, "cpu", lambda e: None)
    for i, c in enumerate(captions):
        assert cached[c].keys() == {"embeds", "pooled"} and torch.equal(again[c]["pooled"], pooled[i])


def test_time_ids_are_the_pipelines_micro_conditioning(world):
    """(original h, w, crop top, left, target h, w): the pipeline's _get_add_time_ids for the defaults, and the
    batch's original_size / crop_top_left where the data gives them (aspect-ratio buckets)."""
    net = load_diffusion_model(world["pipe"])
    want = net.pipeline._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                          text_encoder_projection_dim=16)
    assert torch.equal(net.time_ids(2, 32, 32), want.expand(2, 6))
    got = net.time_ids(2, 32, 24, torch.tensor([[64, 48], [40, 30]]), torch.tensor([[3, 0], [0, 5]]))
    assert got.tolist() == [[64, 48, 3, 0, 32, 24], [40, 30, 0, 5, 32, 24]]
    # and they reach the UNet: another crop changes its prediction
    from tunesmith.config import DenoiseConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.objectives.denoise import ImageItem
    from tunesmith.train.steps import Compute

    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:2]
    obj = _objective(net, records, DenoiseConfig(caption_dropout=0.0))
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    with torch.no_grad():
        plain, _ = obj.loss(net, batch, Compute())
        cropped, _ = obj.loss(net, batch | {"crop_top_left": torch.tensor([[8, 8], [8, 8]])}, Compute())
        same, _ = obj.loss(net, batch | {"original_size": torch.tensor([[32, 32]] * 2)}, Compute())
    assert float(plain) != float(cropped) and float(plain) == float(same)


def _objective(net, records, settings):
    from tunesmith.objectives.denoise import Denoise, embed_captions, encode_latents

    obj = Denoise(settings)
    obj.resolution, obj.latent, obj.latent_shape, obj.num_timesteps = RESOLUTION, True, (4, 16, 16), 1000
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    return obj


def test_the_loss_goes_down_on_a_fixed_batch(world):
    from tunesmith.config import DenoiseConfig, MethodConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.models.diffusion import adapt_diffusion
    from tunesmith.objectives.denoise import ImageItem

    net, _ = adapt_diffusion(load_diffusion_model(world["pipe"]),
                             MethodConfig.model_validate({"name": "lora", "lora": {"r": 8, "alpha": 8}}))
    records = read_image_rows(world["data"], resolution=RESOLUTION)[0][:4]
    obj = _objective(net, records, DenoiseConfig(caption_dropout=0.0, snr_gamma=None))
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    losses = fit_one_batch(obj, net, batch)
    # LoRA on a UNet whose cross-attention is one block of two: it falls, slower than SD 1.x's tiny UNet
    assert all(np.isfinite(losses)) and max(losses[-3:]) < 0.9 * losses[0], losses


# ---------------------------------------------------------------- a run: train, evaluate, resume, export

# the LoRA run's first 3 step losses (per image), recorded on the 2-core Xeon this was written on; float32 throughout,
# so another CPU's kernels move them by far less than the tolerance
GOLDEN = [1.171107, 1.098464, 1.124747]


def test_a_lora_run_trains_evaluates_and_matches_its_golden_losses(world, lora_run):
    check_lora_run(lora_run.output_dir, GOLDEN, "sdxl")


def test_lora_changes_adapter_tensors_only(world, lora_run):
    saved = load_file(lora_run.output_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())
    tuned = load_tuned_pipeline(lora_run.output_dir / "best")
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine = {k.replace(".base_layer", ""): v for k, v in getattr(tuned, part).state_dict().items() if "lora_" not in k}
        theirs = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, lora_run):
    check_resume_bit_exact(world, lora_run, *TEXT)


def test_every_export_draws_the_runs_images(world, lora_run, tmp_path):
    """--format adapter --style all: the diffusers file (load_lora_weights), kohya's SDXL layout (LDM UNet names,
    lora_te1_/lora_te2_; diffusers' SGM block mapper and kohya converter) and ComfyUI's, each drawing the run's pixels
    exactly; --format diffusers: the merged StableDiffusionXLPipeline folder within a level or two."""
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images
    from tunesmith.export import export_model
    from tunesmith.export import lora_formats as lf

    res = export_model(lora_run.output_dir, "adapter", tmp_path / "all", style="all")
    assert len(res.checks) == 3 and all(c.ok and "max |Δpixel| 0 of 255" in c.detail for c in res.checks), \
        [str(c) for c in res.checks]
    kohya = load_file(tmp_path / "all" / lf.FILES["kohya"])
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in kohya
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in kohya)
    comfy = load_file(tmp_path / "all" / lf.FILES["comfyui"])
    assert "diffusion_model.output_blocks.0.1.transformer_blocks.1.attn1.to_q.lora_up.weight" in comfy

    kw = dict(steps=3, guidance=4.0)
    prompts = ["two small red crosses on a blue background"] * 2
    run_images = generate_images(load_tuned_pipeline(lora_run.output_dir / "best"), prompts, [1, 2], **kw)
    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    assert not np.array_equal(generate_images(base, prompts, [1, 2], **kw), run_images)
    res = export_model(lora_run.output_dir, "diffusers", tmp_path / "merged")
    assert all(c.ok for c in res.checks) and len(res.checks) == 2
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "StableDiffusionXLPipeline"
    assert np.abs(generate_images(merged, prompts, [1, 2], **kw).astype(int) - run_images).max() <= 4


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_runs_deliver_a_pipeline(world, method):
    from diffusers import DiffusionPipeline

    extra = ["method.freeze.train_patterns=['^unet\\.up_blocks\\.']"] if method == "freeze" else []
    res = train(sd_cfg(world["pipe"], world["data"], world["root"] / method, f"method.name={method}",
                       "train.max_steps=2", "train.lr=1e-3", *extra), quiet=True)
    tuned = DiffusionPipeline.from_pretrained(str(res.output_dir / "best"))
    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed and (method == "full" or all(k.startswith("up_blocks.") for k in changed))
    for part in ("vae", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(v, getattr(base, part).state_dict()[k])
                   for k, v in getattr(tuned, part).state_dict().items()), part


# ---------------------------------------------------------------- incomplete folders


def _copy(world, name):
    dst = world["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world["pipe"], dst)
    return dst


def test_an_incomplete_sdxl_folder_names_what_is_missing(world, tmp_path):
    check_pipeline_folder(world["pipe"])
    gone = _copy(world, "no-te2")
    shutil.rmtree(gone / "text_encoder_2")
    with pytest.raises(ModelError, match=r"folders are missing: text_encoder_2/ \(CLIPTextModelWithProjection\)"):
        check_pipeline_folder(gone)
    unlisted = _copy(world, "te2-null")
    index = json.loads((unlisted / "model_index.json").read_text())
    (unlisted / "model_index.json").write_text(json.dumps(index | {"tokenizer_2": [None, None]}))
    with pytest.raises(ModelError, match="sdxl family.* lists no tokenizer_2"):
        check_pipeline_folder(unlisted)
    plain = _copy(world, "no-time-ids")
    cfg = json.loads((plain / "unet" / "config.json").read_text())
    (plain / "unet" / "config.json").write_text(json.dumps(cfg | {"addition_embed_type": None}))
    with pytest.raises(ModelError, match="addition_embed_type None.*'text_time'"):
        check_pipeline_folder(plain)
    with pytest.raises(ModelError, match="text_encoder_2/"):
        train(sd_cfg(gone, world["data"], tmp_path / "run"), quiet=True)


def test_gradient_checkpointing_gives_the_same_gradients(world):
    """train.gradient_checkpointing: the UNet and both trained text encoders recompute activations in backward; the
    loss and every adapter's gradient are the same (float rounding aside)."""
    from sd_helpers import grads_with_and_without_checkpointing

    [(plain, g0), (ckpt, g1)], net = grads_with_and_without_checkpointing(world["pipe"], world["data"])
    assert net.unet.is_gradient_checkpointing
    assert net.text_encoder.is_gradient_checkpointing and net.text_encoder_2.is_gradient_checkpointing
    assert plain == pytest.approx(ckpt, rel=1e-6) and g0.keys() == g1.keys()
    assert {k.split(".")[0] for k in g0} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7) for k in g0)


def _bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _bitsandbytes(), reason="bitsandbytes is not importable here")
def test_an_8bit_optimizer_run_resumes_bit_for_bit(world):
    """bitsandbytes' AdamW8bit (it runs on CPUs too): its state, nested under bitsandbytes' own key, goes into the
    checkpoint and comes back so that a resumed run is the uninterrupted one (this tiny model's LoRA tensors are under
    bitsandbytes' 4,096-element threshold, so their moments stay 32-bit: the uint8 ones are tested below)."""
    adam8 = ["train.optimizer=adamw_8bit", *TEXT]
    own = {**world, "root": world["root"] / "adam8"}
    own["root"].mkdir()
    res = train(sd_cfg(world["pipe"], world["data"], own["root"] / "run", *adam8), quiet=True)
    assert res.status == "completed" and all(np.isfinite(s["loss"]) for s in events(res.output_dir, "train"))
    state = load_file(res.output_dir / "checkpoints" / "step-000004" / "optimizer.safetensors")
    assert state and all("__bnb_optimizer_quant_state__/" in k for k in state)  # bitsandbytes' state was the one saved
    check_resume_bit_exact(own, res, *adam8)


@pytest.mark.skipif(not _bitsandbytes(), reason="bitsandbytes is not importable here")
def test_8bit_moments_go_through_a_checkpoint_and_come_back_exactly():
    """A tensor of >= 4,096 elements (bitsandbytes' min_8bit_size) gets uint8 moments; split for the checkpoint and
    joined again, a fresh optimizer takes the next step exactly as the saved one does."""
    from tunesmith.config import TrainConfig
    from tunesmith.train.checkpoint import join_optimizer_state, split_optimizer_state
    from tunesmith.train.optim import build_optimizer

    def model_and_optimizer():
        torch.manual_seed(0)
        m = torch.nn.Linear(128, 64)
        return m, build_optimizer(m, TrainConfig(optimizer="adamw_8bit", lr=1e-2))

    def step(m, opt):
        m(torch.ones(4, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    m, opt = model_and_optimizer()
    step(m, opt)
    tensors, meta = split_optimizer_state(opt.state_dict())
    assert any(t.dtype == torch.uint8 for k, t in tensors.items() if k.endswith(("/state1", "/state2")))
    m2, opt2 = model_and_optimizer()
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(join_optimizer_state(tensors, json.loads(json.dumps(meta)), opt2.state_dict()["param_groups"]))
    step(m, opt)
    step(m2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_an_8bit_optimizer_without_bitsandbytes_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed: importing it fails
    from tunesmith.config import TrainConfig
    from tunesmith.train.optim import build_optimizer

    with pytest.raises(ValueError, match="train.optimizer: adamw_8bit needs bitsandbytes.*train.optimizer: adamw"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="adamw_8bit"))
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), TrainConfig()), torch.optim.AdamW)


def test_mixed_precision_follows_the_autocast_path(world):
    """bf16 autocast (model.dtype bf16-mixed): the same loss within bf16's rounding (measured: 2e-4 relative for
    SDXL, 8e-5 for SD3)."""
    from sd_helpers import losses_fp32_and_bf16

    fp32, bf16 = losses_fp32_and_bf16(world["pipe"], world["data"])
    assert np.isfinite(bf16) and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.01)


def test_the_cli_exports_every_style(lora_run, tmp_path):
    """`tunesmith export RUN --format adapter --style all` on an SDXL run: each file loaded back and checked."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "tunesmith")
    proc = subprocess.run([exe, "export", str(lora_run.output_dir), "--format", "adapter", "--style", "all", "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "lora_comfyui.safetensors"):
        assert f"ok   {name}" in proc.stdout and (tmp_path / "cli" / name).is_file()
