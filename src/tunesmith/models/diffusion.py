"""Text-to-image models: a diffusers pipeline folder, loaded, adapted (LoRA, freeze, full) and saved.

The training loop sees one ``nn.Module`` whatever the model kind. For a text-to-image pipeline that is
``DiffusionModel``: the networks training touches as submodules under their pipeline names (the denoiser ``unet`` or
``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, and for a latent model the ``vae``, never
trained), so that the optimizer, DDP, checkpoints and the best-weight snapshots see one set of named parameters; the
pipeline they came from (tokenizers, sampler) is kept beside it to sample images.

Families (families.py): Stable Diffusion 1.x/2.x and the built-in IF-layout model (a UNet2DConditionModel, one text
encoder, epsilon/v/sample prediction), SDXL (two CLIP encoders whose penultimate states are concatenated, the second's
pooled embedding and the size/crop ``time_ids`` as added conditions) and SD3 (an SD3Transformer2DModel conditioned on
two CLIP encoders and T5, trained by flow matching) and Flux (a FluxTransformer2DModel on 2x2-packed latents,
conditioned on T5's sequence and CLIP's pooled embedding, flow matching).

LoRA goes through diffusers' own PEFT integration (``add_adapter``): on a UNet the attention projections and the
feed-forward layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``proj_in``, ``proj_out``, ``ff.net.0.proj``,
``ff.net.2``), on SD3's and Flux's transformers the attention projections of both streams (diffusers' SD3 LoRA
script's set),
optionally on the CLIP text encoders too; the delivered adapter is written in the diffusers LoRA format
(``pytorch_lora_weights.safetensors``) that ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .families import PIPELINE_INDEX, SUPPORTED, check_pipeline_folder, family_of_pipeline  # noqa: F401

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) finds it
TRANSFORMER_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_add_out"]  # diffusers' train_dreambooth_lora_sd3.py default
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_LORA_TARGETS = ["q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "out_proj"]  # T5 and CLIP attention


def is_pipeline(path) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


T5_LENGTH = 256  # SD3's T5 tokens: StableDiffusion3Pipeline's max_sequence_length default, so training conditions as
# sampling does
FLUX_T5_LENGTH = 512  # FluxPipeline's max_sequence_length default
FLUX_GUIDANCE = 3.5  # the guidance a guidance-distilled Flux transformer is trained at (diffusers' Flux scripts' default)


class DiffusionModel(nn.Module):
    """The trainable networks of a text-to-image pipeline as one module; ``pipeline`` (not a submodule) samples.

    Submodules keep the pipeline's component names (``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``,
    ``text_encoder_3``, ``vae``), so that parameter names in checkpoints are the pipeline's own."""

    def __init__(self, pipe):
        super().__init__()
        self.family = family_of_pipeline(pipe)
        setattr(self, self.family.denoiser, getattr(pipe, self.family.denoiser))
        for name in self.family.text_encoders:
            if getattr(pipe, name, None) is not None:
                setattr(self, name, getattr(pipe, name))
        self.vae = getattr(pipe, "vae", None)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        object.__setattr__(self, "pipeline", pipe)  # not registered: its modules are the ones above
        self.tokenizer = pipe.tokenizer
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        # training's own copy of the schedule (as diffusers' scripts): sampling changes the pipeline's timesteps
        kind = FlowMatchEulerDiscreteScheduler if self.family.flow else DDPMScheduler
        self.noise_scheduler = kind.from_config(pipe.scheduler.config)

    def train(self, mode: bool = True):
        """Train mode for the networks that train; a frozen one (SD3's T5 beside trained CLIP encoders, the VAE) stays
        in eval mode, as diffusers' scripts leave it: T5's dropout (0.1 in SD3's) would otherwise make its frozen
        embeddings random at every step."""
        super().train(mode)
        for module in self.children():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    # ---------------------------------------------------------------- what training calls

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.family.denoiser)

    def text_encoders(self) -> dict[str, nn.Module]:
        """The pipeline's text encoders present, by component name, in encode order."""
        return {n: getattr(self, n) for n in self.family.text_encoders if n in self._modules}

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (B, L) per text encoder (``input_ids``, ``input_ids_2``, ``input_ids_3``) and, for the one-encoder
        family, the attention mask, as the pipeline's encode_prompt makes them (IF lower-cases captions)."""
        pipe, captions = self.pipeline, list(captions)
        if self.family.name == "sd":
            if type(pipe).__name__.startswith("IF"):
                captions = [c.lower().strip() for c in captions]
            length = 77 if type(pipe).__name__.startswith("IF") else self.tokenizer.model_max_length
            enc = self.tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt")
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        if self.family.name == "flux":  # CLIP for the pooled embedding, T5 for the sequence
            clip = self.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                                  return_tensors="pt")
            t5 = pipe.tokenizer_2(captions, padding="max_length", max_length=FLUX_T5_LENGTH, truncation=True,
                                  return_tensors="pt")
            return {"input_ids": clip.input_ids, "input_ids_2": t5.input_ids}
        out = {}
        for i, name in enumerate(("tokenizer", "tokenizer_2")):
            tok = getattr(pipe, name)
            length = pipe.tokenizer_max_length if self.family.name == "sd3" else tok.model_max_length
            out["input_ids" + ("_2" if i else "")] = tok(captions, padding="max_length", max_length=length,
                                                          truncation=True, return_tensors="pt").input_ids
        if getattr(pipe, "tokenizer_3", None) is not None and "text_encoder_3" in self._modules:
            out["input_ids_3"] = pipe.tokenizer_3(captions, padding="max_length", max_length=T5_LENGTH, truncation=True,
                                                  add_special_tokens=True, return_tensors="pt").input_ids
        return out

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``embeds`` (B, L, D), and for SDXL and SD3 ``pooled`` (B, P), with gradients when a text encoder trains;
        equal to the pipeline's encode_prompt (tested). SD 1.x/2.x: the encoder's last hidden state (with the mask
        where the pipeline passes one: IF's always, SD's when the encoder's config says use_attention_mask). SDXL:
        the penultimate hidden states of both CLIP encoders side by side, the pooled (projected) output of the second.
        SD3: the same of its two CLIP encoders, padded to T5's width and followed along the sequence by T5's last
        hidden state (zeros without T5), the two pooled outputs side by side. Flux: T5's last hidden state, CLIP's
        pooled output."""
        if self.family.name == "sd":
            mask = tokens.get("attention_mask") if self.masks_captions else None
            return {"embeds": self.text_encoder(tokens["input_ids"], attention_mask=mask)[0]}
        if self.family.name == "flux":
            pooled = self.text_encoder(tokens["input_ids"], output_hidden_states=False).pooler_output
            return {"embeds": self.text_encoder_2(tokens["input_ids_2"], output_hidden_states=False)[0],
                    "pooled": pooled}
        states, pooled = [], []
        for key, enc in (("input_ids", self.text_encoder), ("input_ids_2", self.text_encoder_2)):
            out = enc(tokens[key], output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds (SDXL uses its second encoder's only)
        embeds = torch.cat(states, dim=-1)
        if self.family.name == "sdxl":
            return {"embeds": embeds, "pooled": pooled[1]}
        if "text_encoder_3" in self._modules and "input_ids_3" in tokens:
            t5 = self.text_encoder_3(tokens["input_ids_3"])[0]
        else:
            t5 = embeds.new_zeros(embeds.shape[0], T5_LENGTH, self.transformer.config.joint_attention_dim)
        embeds = torch.nn.functional.pad(embeds, (0, t5.shape[-1] - embeds.shape[-1]))
        return {"embeds": torch.cat([embeds, t5.to(embeds.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    @property
    def masks_captions(self) -> bool:
        return bool(type(self.pipeline).__name__.startswith("IF")
                    or getattr(self.text_encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the denoiser denoises: the VAE's scaled latent sample for a latent model, else the pixels themselves."""
        if self.vae is None:
            return pixels
        x = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None)
        return (x - shift if shift is not None else x) * self.vae.config.scaling_factor

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def time_ids(self, batch: int, height: int, width: int, original_size: torch.Tensor | None = None,
                 crop_top_left: torch.Tensor | None = None) -> torch.Tensor:
        """SDXL's micro-conditioning (B, 6): original size (h, w), crop top-left (y, x), target size (h, w), as the
        pipeline's _get_add_time_ids; without the first two, the target size and (0, 0), what the pipeline samples
        with."""
        target = torch.tensor([[float(height), float(width)]]).expand(batch, 2)
        original = target if original_size is None else original_size.float().cpu()
        crop = torch.zeros(batch, 2) if crop_top_left is None else crop_top_left.float().cpu()
        return torch.cat([original, crop, target], dim=1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction (B, C, H, W) for noisy inputs at ``timesteps``, conditioned on ``cond``: the
        cached caption ``embeds`` (and ``pooled``), or the captions' token ids encoded now; SDXL's ``time_ids``.
        IF's extra learned-variance channels are dropped (never in the loss)."""
        text = {k: cond[k] for k in ("embeds", "pooled") if k in cond} or self.encode_text(cond)
        dtype = self.denoiser.dtype
        embeds = text["embeds"].to(dtype)
        if self.family.name == "flux":
            return self._flux(noisy, timesteps, embeds, text["pooled"].to(dtype))
        if self.family.denoiser == "transformer":
            return self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                    pooled_projections=text["pooled"].to(dtype)).sample
        added = None
        if self.family.name == "sdxl":
            added = {"text_embeds": text["pooled"].to(dtype), "time_ids": cond["time_ids"].to(noisy.device, dtype)}
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        if pred.shape[1] == 2 * noisy.shape[1]:
            pred = pred[:, :noisy.shape[1]]
        return pred

    def _flux(self, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
              pooled: torch.Tensor) -> torch.Tensor:
        """Flux's transformer on (B, C, H, W) latents, as FluxPipeline and diffusers' Flux scripts call it: 2x2 patches
        packed into (B, HW/4, 4C) tokens with their (0, row, col) position ids, the caption's ids all zero, the
        timestep divided by 1000, the distilled guidance (FLUX_GUIDANCE) where the transformer embeds one; the
        prediction unpacked back to (B, C, H, W)."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = (torch.full((b,), FLUX_GUIDANCE, device=noisy.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        out = self.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                               img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    def resolution(self) -> int:
        """The image side the model is made for: the denoiser's sample size (times the VAE's downscaling); a
        denoiser without one (Flux's), the VAE's sample size."""
        if getattr(self.denoiser.config, "sample_size", None) is None:
            return int(self.vae.config.sample_size)
        size = self.denoiser.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale


def lora_components(pipe) -> list[str]:
    """The pipeline's components diffusers loads LoRA weights into (its loader's _lora_loadable_modules) that it has."""
    return [n for n in getattr(pipe, "_lora_loadable_modules", ["unet", "text_encoder"])
            if getattr(pipe, n, None) is not None]


def pipeline_denoiser(pipe) -> nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


# ---------------------------------------------------------------- load, adapt, save


class _BuiltinAnnotationFilter(logging.Filter):
    """Drops the one warning every load of the built-in model logs: IFPipeline's annotation names T5EncoderModel and
    the built-in model's text encoder is a CLIPTextModel, which answers the pipeline's one call the same way
    (images/model.py). Any other type mismatch still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Expected types for text_encoder:") and "T5EncoderModel" in text
                    and text.rstrip(".").endswith("CLIPTextModel'>"))


def quiet_builtin_annotation_warning() -> None:
    """Install _BuiltinAnnotationFilter on diffusers' pipeline logger (once)."""
    target = logging.getLogger("diffusers.pipelines.pipeline_utils")
    if not any(isinstance(f, _BuiltinAnnotationFilter) for f in target.filters):
        target.addFilter(_BuiltinAnnotationFilter())


@contextlib.contextmanager
def _no_transformers_progress_bar():
    """transformers' "Loading weights" bar off while a pipeline's text encoders load; as it was afterwards."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()


def load_pipeline(path, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline in ``path`` (its model_index.json names the class), progress bars off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    path = Path(path)
    if not is_pipeline(path):
        raise ModelError(f"{path} is not a diffusers pipeline folder (no {PIPELINE_INDEX})")
    index = check_pipeline_folder(path)
    # a component the index lists as [null, null] (SD3 without T5) is passed as None: diffusers refuses it otherwise
    absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    diffusers_logging.disable_progress_bar()
    quiet_builtin_annotation_warning()
    try:
        with _no_transformers_progress_bar():
            pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, **absent)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"could not load the diffusers pipeline in {path}: {e}") from None
    family = family_of_pipeline(pipe)
    missing = [n for n in family.required if getattr(pipe, n, None) is None and n != "vae"]
    if missing:
        raise ModelError(f"{path}: a {family.name} pipeline needs {', '.join(family.required)}; this "
                         f"{type(pipe).__name__} lacks {', '.join(missing)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusion_model(path, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    return DiffusionModel(load_pipeline(path, dtype))


def adapt_diffusion(model: DiffusionModel, method_cfg, train_text_encoder: bool = False):
    """Make what ``method_cfg`` names trainable; returns (model, ParamCounts). lora: adapters on the denoiser (and
    the text encoders with ``train_text_encoder``); full: the denoiser (and the text encoders); freeze: the parameters
    ``method.freeze.train_patterns`` select (regular expressions over names such as ``unet.up_blocks.2.``). The text
    encoders ``train_text_encoder`` trains are the family's CLIP ones (SD3's T5 stays frozen, as in diffusers' SD3
    scripts: its LoRA loader has no place for T5 adapters)."""
    from .adapt import count_params, freeze_except, select_trainable

    model.requires_grad_(False)
    name = method_cfg.name
    texts = trained_text_encoders(model, train_text_encoder)
    if name == "full":
        model.denoiser.requires_grad_(True)
        for enc in texts.values():
            enc.requires_grad_(True)
    elif name == "freeze":
        if method_cfg.freeze.train_last_layers or method_cfg.freeze.train_layers:
            raise ModelError("method.freeze on a text-to-image model: name what trains with method.freeze."
                             "train_patterns (e.g. ['^unet\\.up_blocks\\.', 'attn2']); train_last_layers and "
                             "train_layers count the blocks of a language model")
        freeze_except(model, select_trainable(model, method_cfg.freeze))
    elif name == "lora":
        targets = UNET_LORA_TARGETS if model.family.denoiser == "unet" else TRANSFORMER_LORA_TARGETS
        _add_lora(model.denoiser, method_cfg.lora, targets, "method.lora.target_modules")
        for enc in texts.values():
            _add_lora(enc, method_cfg.lora, TEXT_LORA_TARGETS, None)
    else:
        raise ModelError(f"method.name: got {name!r}; allowed: lora, freeze, full")
    if model.vae is not None:
        model.vae.requires_grad_(False)
    return model, count_params(model)


def trained_text_encoders(model: DiffusionModel, train_text_encoder: bool) -> dict[str, nn.Module]:
    """The text encoders that train (none unless ``train_text_encoder``), by component name."""
    if not train_text_encoder:
        return {}
    return {n: m for n, m in model.text_encoders().items() if n in model.family.trainable_text}


def _add_lora(module, cfg, default_targets: list[str], field: str | None) -> None:
    from peft import LoraConfig as PeftLoraConfig

    names = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if cfg.target_modules == "all-linear" or field is None:  # the field's default means "the family's usual set"
        targets = [t for t in default_targets if any(n == t or n.endswith("." + t) for n in names)]
    else:
        targets = list(cfg.target_modules)
    if not targets:
        raise ModelError(f"{field or 'LoRA'}: none of {default_targets} is in {type(module).__name__}")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              init_lora_weights="gaussian", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    try:
        module.add_adapter(peft_cfg)
    except ValueError as e:
        shown = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ModelError(f"{field}={cfg.target_modules!r}: {e}. Linear layers here: {', '.join(shown)}") from None


def has_lora(model: DiffusionModel) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_layers(module) -> dict[str, torch.Tensor] | None:
    """A module's LoRA weights in PEFT's naming (``...to_q.lora_A.weight``), which diffusers' loader reads as is; None
    without adapters. Not through diffusers' convert_state_dict_to_diffusers: it renames the attention projections'
    keys to the old ``lora.down``/``lora.up`` form and leaves the feed-forward ones, and a file mixing both loads
    without the attention adapters (tested: the loaded model then differs from the run's)."""
    from peft.utils import get_peft_model_state_dict

    if not any("lora_" in n for n, _ in module.named_parameters()):
        return None
    return get_peft_model_state_dict(module)


def lora_metadata(module) -> dict | None:
    """The module's LoRA config (rank, alpha, targets) for the LoRA file's metadata. Without it diffusers' loader
    infers the config from the tensors and takes alpha = rank, so an adapter trained at alpha != rank would load scaled
    wrong (the images of the loaded model would not be the run's)."""
    config = getattr(module, "peft_config", {}).get("default")
    return config.to_dict() if config is not None else None


def save_lora_file(pipeline_class, folder, model: DiffusionModel) -> None:
    """The diffusers LoRA file of ``model``'s adapters (denoiser and text encoders), with their configs as metadata,
    as diffusers' own training scripts write it: ``<component>_lora_layers`` for each component the pipeline class
    loads LoRA into (unet or transformer, text_encoder, text_encoder_2)."""
    kwargs = {}
    for name in pipeline_class._lora_loadable_modules:
        module = model._modules.get(name)
        layers = lora_layers(module) if module is not None else None
        if layers:
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = lora_metadata(module)
    pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)


def save_diffusion_model(model: DiffusionModel, path, *, base_ref: str, method: str, merged: bool = False) -> Path:
    """``path`` as a LoRA adapter folder (the diffusers LoRA file + tunesmith.json naming the base pipeline), or, for
    full and freeze (or ``merged``), a whole pipeline folder that ``DiffusionPipeline.from_pretrained`` loads."""
    from .. import __version__
    from .saving import MANIFEST

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe = model.pipeline
    if method == "lora" and not merged:
        save_lora_file(type(pipe), path, model)
        fmt = "diffusers-lora"
    else:
        if has_lora(model):  # a copy with the adapters folded into the weights: the run's model stays as it is
            pipe = merged_pipeline(model, base_ref)
        pipe.save_pretrained(path, safe_serialization=True)
        fmt = "diffusers-pipeline"
    manifest = {"base_model": str(base_ref), "method": method, "format": fmt, "kind": "text-to-image",
                "pipeline": type(model.pipeline).__name__, "tunesmith_version": __version__}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def merged_pipeline(model: DiffusionModel, base_ref: str):
    """A fresh copy of the base pipeline with ``model``'s LoRA weights loaded and fused into it (diffusers'
    fuse_lora), the adapters then unloaded: plain weights, the run's model untouched."""
    import tempfile

    pipe = load_pipeline(base_ref, next(model.denoiser.parameters()).dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_lora_file(type(pipe), tmp, model)
        pipe.load_lora_weights(tmp, adapter_name="tuned")
    pipe.fuse_lora(components=lora_components(pipe), lora_scale=1.0, adapter_names=["tuned"])
    pipe.unload_lora_weights()
    return pipe


def load_tuned_pipeline(folder, dtype: torch.dtype = torch.float32):
    """A delivered model (a run's best/ or an export) as a pipeline: a whole pipeline folder as is; an adapter folder
    on its base (tunesmith.json names it), the LoRA loaded with diffusers' load_lora_weights."""
    from .saving import MANIFEST

    folder = Path(folder)
    if is_pipeline(folder):
        return load_pipeline(folder, dtype)
    manifest = folder / MANIFEST
    if not (folder / LORA_FILE).is_file() or not manifest.is_file():
        raise ModelError(f"{folder} is neither a diffusers pipeline folder nor a text-to-image LoRA folder "
                         f"({LORA_FILE} + {MANIFEST})")
    from .resolver import ensure_local

    base = ensure_local(json.loads(manifest.read_text(encoding="utf-8"))["base_model"])
    pipe = load_pipeline(base, dtype)
    pipe.load_lora_weights(str(folder))
    return pipe


def text_to_image_folder(ref) -> Path | None:
    """The folder of the text-to-image model ``ref`` names (a pipeline folder, or a LoRA folder whose tunesmith.json
    says kind text-to-image), or None when ``ref`` is not one (a language model, a hub id, nothing). ``ref``: the
    built-in image alias, a run folder (its best/ or final/), a delivered model folder or a pipeline folder. How the
    commands (generate, eval, export) choose between the text and the image path before any model loads."""
    from .registry import ALIASES
    from .resolver import ensure_local, run_output
    from .saving import MANIFEST

    alias = ALIASES.get(str(ref))
    if alias is not None:
        return ensure_local(str(ref)) if alias.kind == "text-to-image" else None
    path = Path(str(ref)).expanduser()
    if not path.is_dir():
        return None
    if (path / "config.resolved.yaml").is_file():
        path = run_output(path)
    if is_pipeline(path):
        return path
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return path if manifest.get("kind") == "text-to-image" and (path / LORA_FILE).is_file() else None
