"""A tiny random Stable Diffusion 1.x/2.x pipeline of exactly its classes, built in the test (no download):
StableDiffusionPipeline(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, a DDPM/DDIM/PNDM scheduler),
32x32 images -> 16x16 latents of 4 channels, tiny widths so that a run takes seconds."""

import json
import string
from pathlib import Path

import torch

from tunesmith.images import synth

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
RESOLUTION = 32


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer (byte-pair merges) whose words are the synth world's, spelled letter by letter otherwise."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + "-'")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in synth.VOCABULARY:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            if cur not in vocab:
                vocab.append(cur)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sd(folder: Path, scheduler: str = "DDIMScheduler", prediction_type: str = "epsilon",
            linear_projection: bool = False) -> Path:
    """SD 1.x's layout (conv proj_in/proj_out) or, with ``linear_projection``, SD 2.x's; seeded."""
    if folder.exists():
        return folder
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=0.18215)
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
                                use_linear_projection=linear_projection)
    kw = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              prediction_type=prediction_type, steps_offset=1)
    if scheduler == "DDIMScheduler":
        kw |= dict(clip_sample=False, set_alpha_to_one=False)
    elif scheduler == "PNDMScheduler":
        kw |= dict(skip_prk_steps=True, set_alpha_to_one=False)
    else:
        kw |= dict(clip_sample=False)
    sched = getattr(diffusers, scheduler)(**kw)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


def sd_cfg(pipe, data, out, *extra):
    from tunesmith.config import load_config

    return load_config(None, [
        f"model.name={pipe}", f"data.train={data}", f"output_dir={out}", "objective.name=denoise",
        "method.name=lora", "method.lora.r=4", "method.lora.alpha=8", "method.lora.dropout=0.0", "train.batch_size=4",
        "train.max_steps=4", "train.lr=5e-3", "train.warmup_steps=0", "eval.every_steps=2", "eval.samples=2",
        "eval.compare_examples=2", "data.valid_fraction=0.2", "checkpoint.every_steps=2",
        "objective.denoise.inference_steps=2", "eval.compare_base=false",
        "objective.denoise.caption_dropout=0.1",  # opt-in since issue 25's demo; the goldens drop captions
        *extra])


def events(run, kind):
    return [e for e in map(json.loads, open(Path(run) / "metrics.jsonl")) if e["kind"] == kind]


def tiny_sdxl(folder: Path) -> Path:
    """StableDiffusionXLPipeline of exactly SDXL's classes, as diffusers' own SDXL pipeline tests build it: a UNet
    with text_time added embeddings (pooled caption + 6 size/crop time ids), CLIPTextModel + CLIPTextModelWithProjection
    (penultimate states concatenated: 16 + 16 = the UNet's cross-attention width), an AutoencoderKL (SDXL's
    scaling_factor 0.13025) and an EulerDiscreteScheduler; 32x32 images, 16x16 latents; seeded."""
    if folder.exists():
        return folder
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, projection_dim=16, pad_token_id=1, bos_token_id=0, eos_token_id=1)
    text = CLIPTextModel(CLIPTextConfig(**cfg))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32,
                                norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="epsilon", steps_offset=1,
                                   timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok,
                              unet=unet, scheduler=sched).save_pretrained(folder, safe_serialization=True)
    return folder


def t5_tokenizer(folder: Path):
    """A T5Tokenizer (a Unigram model, as T5's sentencepiece one) whose pieces are the synth world's words, with single
    characters for anything else."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + "-'"
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
              + [("\u2581" + w, -1.0) for w in synth.VOCABULARY] + [(c, -5.0) for c in chars])
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.save_pretrained(folder)
    return tok


def tiny_sd3(folder: Path, with_t5: bool = True) -> Path:
    """StableDiffusion3Pipeline of exactly SD3's classes, as diffusers' own SD3 pipeline tests build it (no download:
    the tokenizers are made here): SD3Transformer2DModel (patch 2, two joint blocks), two CLIPTextModelWithProjection
    (penultimate states 16 + 16 wide, padded to T5's 32; pooled 16 + 16 = the transformer's pooled_projection_dim),
    T5EncoderModel (d_model 32 = joint_attention_dim), an AutoencoderKL with SD3's shift and scaling factors and a
    FlowMatchEulerDiscreteScheduler (shift 3.0, SD3's); 32x32 images, 16x16 latents; seeded."""
    if folder.exists():
        return folder
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, projection_dim=16, pad_token_id=1, bos_token_id=0, eos_token_id=1)
    text, text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    t5_tok = t5_tokenizer(folder.parent / f"{folder.name}-t5-src") if with_t5 else None
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)) if with_t5 else None
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=32, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=text, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok,
                             text_encoder_3=t5, tokenizer_3=t5_tok).save_pretrained(folder, safe_serialization=True)
    return folder


def grads_with_and_without_checkpointing(pipe, data):
    """(loss, grads) of one LoRA batch (adapters on the denoiser and the trainable text encoders, captions encoded in
    the forward pass) before and after TextToImage.speed_up turns train.gradient_checkpointing on."""
    from tunesmith.data.images import read_image_rows
    from tunesmith.models.diffusion import load_diffusion_model
    from tunesmith.objectives.denoise import Denoise, ImageItem, encode_latents
    from tunesmith.train.kinds import TextToImage
    from tunesmith.train.steps import Compute

    cfg = sd_cfg(pipe, data, "unused", "objective.denoise.train_text_encoder=true", "train.gradient_checkpointing=true",
                 "objective.denoise.caption_dropout=0.0")
    kind = TextToImage()
    net, _ = kind.adapt(load_diffusion_model(pipe), cfg)
    net.train()
    records = read_image_rows(data, resolution=RESOLUTION)[0][:2]
    obj = Denoise(cfg.objective.denoise)
    obj.resolution, obj.latent, obj.flow, obj.num_timesteps = RESOLUTION, True, net.family.flow, 1000
    obj.latent_shape, obj.tokenize = (net.vae.config.latent_channels, 16, 16), net.tokenize
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    out = []
    for checkpointing in (False, True):
        if checkpointing:
            kind.speed_up(net, cfg, Compute(), lambda e: None)
        net.zero_grad()
        loss, _ = obj.loss(net, batch, Compute())
        loss.backward()
        out.append((float(loss), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    return out, net


def losses_fp32_and_bf16(pipe, data):
    """The loss of one fixed batch (frozen encoders' cached embeddings, cached latents) with the weights' own fp32 and
    under bf16 autocast, the mixed-precision path training takes (Compute.autocast)."""
    from tunesmith.config import DenoiseConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.models.diffusion import load_diffusion_model
    from tunesmith.objectives.denoise import Denoise, ImageItem, embed_captions, encode_latents
    from tunesmith.train.steps import Compute

    net = load_diffusion_model(pipe)
    records = read_image_rows(data, resolution=RESOLUTION)[0][:4]
    obj = Denoise(DenoiseConfig(caption_dropout=0.0))
    obj.resolution, obj.latent, obj.flow, obj.num_timesteps = RESOLUTION, True, net.family.flow, 1000
    obj.latent_shape = (net.vae.config.latent_channels, 16, 16)
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    obj.latents = encode_latents(net, records, RESOLUTION, "cpu", lambda e: None)
    batch = obj.collate([ImageItem(r, i, step=1) for i, r in enumerate(records)], None, "padded")
    with torch.no_grad():
        return [float(obj.loss(net, batch, Compute(autocast=dtype))[0]) for dtype in (None, torch.bfloat16)]


def tiny_flux(folder: Path) -> Path:
    """FluxPipeline of exactly Flux's classes, as diffusers' own Flux pipeline tests build it (tokenizers made here):
    FluxTransformer2DModel (one double and one single block, guidance embedded as FLUX.1-dev's), CLIPTextModel (its
    pooled output 32 wide = pooled_projection_dim), T5EncoderModel (d_model 32 = joint_attention_dim), an
    AutoencoderKL with Flux's shift and scaling factors (4 latent channels, packed 2x2 into the transformer's 16) and
    FLUX.1-dev's FlowMatchEulerDiscreteScheduler (dynamic shifting); 32x32 images, 16x16 latents; seeded."""
    if folder.exists():
        return folder
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=1))
    t5_tok = t5_tokenizer(folder.parent / f"{folder.name}-t5-src")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=t5_tok).save_pretrained(folder, safe_serialization=True)
    return folder


def fit_one_batch(obj, net, batch, steps: int = 12, lr: float = 3e-2) -> list[float]:
    """The objective's loss on one fixed batch over `steps` Adam steps of the trainable parameters (does it fall?)."""
    import numpy as np

    from tunesmith.train.steps import Compute

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = obj.loss(net, batch, Compute())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)), losses
    return losses


def check_lora_run(out: Path, golden: list[float], family: str, grids: bool = True) -> None:
    """A 4-step LoRA run evaluated at steps 2 and 4: finite losses, its first three equal to the golden ones (float32
    throughout, so another CPU's kernels move them by far less than rtol 1e-4), grids saved, the family named."""
    import numpy as np

    steps = events(out, "train")
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
    np.testing.assert_allclose([s["loss"] for s in steps[:3]], golden, rtol=1e-4)
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(np.isfinite(e["val_loss"]) for e in evals)
    if grids:
        assert all((out / e["samples"][0]["image"]).is_file() for e in evals)
    assert f"{family} family" in " ".join(e["text"] for e in events(out, "message"))


def check_resume_bit_exact(world, lora_run, *extra) -> None:
    """The run stopped after 2 of its 4 steps and resumed gives the uninterrupted run's losses, validation losses and
    delivered LoRA file, bit for bit."""
    from safetensors.torch import load_file

    from tunesmith.models.diffusion import LORA_FILE
    from tunesmith.train import train

    cut = world["root"] / "run-parts"
    polls = []
    stopped = train(sd_cfg(world["pipe"], world["data"], cut, *extra), quiet=True,
                    stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    assert stopped.status == "interrupted" and stopped.steps == 2
    train(sd_cfg(world["pipe"], world["data"], cut, *extra), resume=True, quiet=True)
    assert [e["loss"] for e in events(cut, "train")] == [e["loss"] for e in events(lora_run.output_dir, "train")]
    assert [e["val_loss"] for e in events(cut, "eval")] == [e["val_loss"] for e in events(lora_run.output_dir, "eval")]
    a, b = load_file(cut / "best" / LORA_FILE), load_file(lora_run.output_dir / "best" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
