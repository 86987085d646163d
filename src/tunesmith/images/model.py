"""The built-in image model: a pixel-space text-to-image diffusion pipeline made only of standard classes.

    caption ─► T5Tokenizer (word-level Unigram over the synth's vocabulary + letters) ─► CLIPTextModel (B, 77, D)
                                                                                              │ cross-attention
    noise (B, 3, 32, 32) ─► UNet2DConditionModel (v-prediction) ─► scheduler step ─► … ─► image (B, 3, 32, 32)

It is saved as a diffusers `IFPipeline` folder: DeepFloyd IF's stage-1 pipeline is diffusers' own pixel-space
text-to-image pipeline (tokenizer, text encoder, UNet2DConditionModel, any scheduler, no VAE), so
`DiffusionPipeline.from_pretrained(folder)` loads it with no custom code (diffusers logs that IF's annotation expects a
T5EncoderModel; the pipeline only calls text_encoder(ids, attention_mask=mask)[0], which CLIPTextModel answers, so
tunesmith's loaders drop that one warning), and fine-tuning it is the code path that fine-tunes any
UNet2DConditionModel pipeline: with no VAE the "latents" are the pixels scaled to [-1, 1]. The loss follows the
scheduler's `prediction_type` (v-prediction here, as Stable Diffusion 2; epsilon for 1.x).

IF always pads prompts to 77 tokens and lets the UNet attend to every position (the encoder's attention mask hides
padding from the encoder only); `encode_captions` does exactly that, with gradients, so training sees the same
embeddings as sampling (tests/images/test_model.py checks it against the pipeline's own `encode_prompt`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, IFPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Tokenizer

from . import synth

MAX_LENGTH = 77  # IFPipeline.encode_prompt pads and truncates to 77 tokens


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the built-in model. The defaults are a smaller, three-level one (pretrain's defaults, quick to
    experiment with); the shipped model is channels (16, 32, 64, 64, 64) with pooled_text (its unet/config.json)."""

    resolution: int = synth.GRID
    channels: tuple[int, ...] = (16, 32, 64)  # UNet block widths at 32x32, 16x16, 8x8
    layers_per_block: int = 1
    heads: int = 4  # attention heads in the UNet's transformer blocks
    text_dim: int = 128  # the CLIP text encoder's hidden size = the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 256
    # Global text conditioning, as DeepFloyd IF's own UNet has it: the caption's attention-pooled embedding added to
    # the time embedding (addition_embed_type="text"), which reaches every ResNet block, and (scale_shift) that
    # embedding applied as a scale and shift after each ResNet's norm (resnet_time_scale_shift="scale_shift").
    # Issue 25: a UNet given the position as a class label (the same entry point) learned to place objects within
    # 400-900 steps; given it as caption words it had not after 400-600 steps, with or without this pooled path,
    # until the text encoder was pre-trained to make the words readable from its pooled output and then frozen
    # (pretrain's --text-pretrain-steps, --text-lr-scale 0). The shipped model uses pooled_text, not scale_shift.
    pooled_text: bool = False
    scale_shift: bool = False


def build_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer whose Unigram vocabulary is the synth's words (one token each, the held-out words included:
    their embeddings stay untrained until fine-tuning) plus letters and digits, so any other word still tokenizes
    (spelled out) instead of becoming <unk>."""
    words = [("▁" + w, -1.0) for w in synth.VOCABULARY]
    chars = [("▁", -5.0)] + [(c, -10.0) for c in string.ascii_lowercase + string.digits + "-'"]
    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2
    return T5Tokenizer(vocab=special + words + chars, extra_ids=0, model_max_length=MAX_LENGTH)


def build_text_encoder(shape: ModelShape, vocab_size: int) -> CLIPTextModel:
    """Stable Diffusion's text encoder class, small. Its learned absolute position embeddings are what let the UNet
    tell "red circle on a blue background" from "blue circle on a red background": cross-attention is blind to
    token order, so order must be in each token's embedding. A T5 encoder (relative positions only) trained here
    for 3,000 steps still gave a colour word the same embedding in both roles (cosine 0.9995) and the model swapped
    shape and background colours half the time."""
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=shape.text_dim, intermediate_size=shape.text_ff,
                            num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                            max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=shape.text_dim,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)  # the T5 tokenizer's <pad>, </s>
    return CLIPTextModel(config)


def build_unet(shape: ModelShape) -> UNet2DConditionModel:
    """IF's layout: 3 channels in, 6 out (IFPipeline splits the output in two halves). The second half is IF's
    learned variance: unused here (the scheduler config has no learned variance, so the pipeline drops it before the
    scheduler sees it), zero-initialised and never in the loss, so it stays exactly 0 (which a "learned_range"
    DDPM scheduler would read as the mean of the posterior's two log-variance bounds)."""
    n = len(shape.channels)
    unet = UNet2DConditionModel(
        sample_size=shape.resolution, in_channels=3, out_channels=6,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=shape.channels, layers_per_block=shape.layers_per_block,
        cross_attention_dim=shape.text_dim, attention_head_dim=shape.heads,  # (diffusers' name for the head count)
        norm_num_groups=min(32, min(shape.channels) // 2),
        resnet_time_scale_shift="scale_shift" if shape.scale_shift else "default",
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": shape.heads} if shape.pooled_text else {}))
    with torch.no_grad():
        unet.conv_out.weight[3:].zero_()
        unet.conv_out.bias[3:].zero_()
    return unet


def train_scheduler_config() -> dict:
    """The noise schedule: cosine (suits low resolutions, where a linear schedule destroys the image too early) with
    v-prediction (Salimans & Ho 2022; Stable Diffusion 2's objective). Under a cosine schedule almost no signal is
    left at the last timesteps, where epsilon's image estimate (x - sigma * eps) / alpha divides by a tiny alpha and
    blows up; v's (alpha * x - sigma * v) does not. No learned variance in the config, so IFPipeline drops the
    UNet's variance half itself and any diffusers scheduler can sample (see build_unet)."""
    return {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


def build_sampler(config: dict) -> DPMSolverMultistepScheduler:
    """The pipeline's scheduler: DPM-Solver++ (2nd order) on the training schedule, few steps, the predicted image
    clipped to [-1, 1] at each step (IF's thresholding at its floor of 1: a plain clip)."""
    return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2,
                                       thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=0.995,
                                       final_sigmas_type="zero")


def build_pipeline(shape: ModelShape = ModelShape(), seed: int = 0) -> IFPipeline:
    """A freshly initialised (random) pipeline, seeded."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(shape, len(tokenizer))
    unet = build_unet(shape)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                      scheduler=build_sampler(train_scheduler_config()), safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_scheduler(pipe) -> DDPMScheduler:
    """The training scheduler for a pipeline: DDPM on the pipeline scheduler's own config (as diffusers'
    training examples do), so prediction_type and the beta schedule follow the model."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77) input ids and attention mask, as IFPipeline.encode_prompt makes them (lower-cased, stripped)."""
    enc = tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=MAX_LENGTH,
                    truncation=True, add_special_tokens=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """(B, 77, D) prompt embeddings, with gradients when the encoder trains; equal to IFPipeline.encode_prompt's."""
    ids, mask = tokenize(tokenizer, captions)
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device), attention_mask=mask.to(device))[0]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
