"""Text-to-image models: a diffusers pipeline folder, loaded, adapted (LoRA, freeze, full) and saved.

The training loop sees one ``nn.Module`` whatever the model kind. For a text-to-image pipeline that is
``DiffusionModel``: the networks training touches as submodules (the denoiser ``unet``, the ``text_encoder``, and for
a latent model the ``vae``, never trained), so that the optimizer, DDP, checkpoints and the best-weight snapshots see
one set of named parameters; the pipeline they came from (tokenizer, sampler) is kept beside it to sample images.

LoRA goes through diffusers' own PEFT integration (``unet.add_adapter``), on the attention projections and the
feed-forward layers of the denoiser by default (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``proj_in``,
``proj_out``, ``ff.net.0.proj``, ``ff.net.2``), optionally on the text encoder too; the delivered adapter is written
in the diffusers LoRA format (``pytorch_lora_weights.safetensors``) that ``pipe.load_lora_weights`` reads.
Works for any pipeline whose denoiser is a ``UNet2DConditionModel`` with one text encoder: the built-in model (IF's
pixel-space layout) and Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``: a latent UNet, an ``AutoencoderKL`` whose
``scaling_factor`` scales the latents, a CLIP text encoder, any of diffusers' DDPM-family schedulers, epsilon or
v-prediction). ``check_pipeline_folder`` reads a folder's model_index.json and configs before anything loads and names
what is missing (a component's folder, the VAE of a latent UNet) or why the family is not one tunesmith trains yet
(SDXL's second text encoder, the transformer denoisers of SD3, Flux and Sana).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

PIPELINE_INDEX = "model_index.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) finds it
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_LORA_TARGETS = ["q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "out_proj"]  # T5 and CLIP attention


def is_pipeline(path) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


SUPPORTED = "a UNet2DConditionModel denoiser with one text encoder: Stable Diffusion 1.x/2.x, IF-layout pixel models"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_pipeline_folder(path) -> dict:
    """The folder's model_index.json, once checked from the files alone (no weights read): every component it lists
    has its folder (and a config), the family is one tunesmith trains (SUPPORTED), a latent UNet (in_channels other
    than 3) has its VAE, and the scheduler predicts what the loss knows. Raises ModelError naming what is wrong."""
    path = Path(path)
    try:
        index = json.loads((path / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable diffusers pipeline folder ({PIPELINE_INDEX}: {e})") from None
    cls = index.get("_class_name", "?")
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    present = {k for k, v in listed.items() if v[0] is not None and v[1] is not None}
    if "transformer" in listed or "prior" in listed:
        raise ModelError(f"{path}: {cls} has a {'transformer' if 'transformer' in listed else 'prior'} denoiser; "
                         f"tunesmith fine-tunes {SUPPORTED} (SD3, Flux, Sana and other transformer families are not "
                         "supported yet)")
    if "text_encoder_2" in present or "tokenizer_2" in present:
        raise ModelError(f"{path}: {cls} has two text encoders (SDXL's layout, with pooled embeddings and added time "
                         f"ids); tunesmith fine-tunes {SUPPORTED} (SDXL is not supported yet)")
    missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if n not in present]
    if missing:
        raise ModelError(f"{path}: {PIPELINE_INDEX} ({cls}) lists no {', '.join(missing)}; tunesmith fine-tunes "
                         f"{SUPPORTED}")
    absent = [f"{n}/ ({listed[n][1]})" for n in sorted(present) if not (path / n).is_dir()]
    if absent:
        raise ModelError(f"{path}: {PIPELINE_INDEX} ({cls}) lists components whose folders are missing: "
                         f"{', '.join(absent)}; copy the whole pipeline folder")
    unet = _read_config(path / "unet" / "config.json", "unet")
    if unet.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise ModelError(f"{path}: the denoiser is a {unet.get('_class_name')}; tunesmith fine-tunes {SUPPORTED}")
    if unet.get("addition_embed_type") in ("text_time", "text_image"):
        raise ModelError(f"{path}: the UNet conditions on added embeddings ({unet['addition_embed_type']}: SDXL's "
                         f"micro-conditioning); tunesmith fine-tunes {SUPPORTED}")
    channels = int(unet.get("in_channels", 4))
    if channels != 3 and "vae" not in present:
        raise ModelError(f"{path}: the UNet takes {channels}-channel latents but {PIPELINE_INDEX} ({cls}) has no vae "
                         "to encode images into them (a latent model needs its AutoencoderKL in vae/)")
    if "vae" in present:
        vae = _read_config(path / "vae" / "config.json", "vae")
        if int(vae.get("latent_channels", channels)) != channels:
            raise ModelError(f"{path}: the VAE makes {vae.get('latent_channels')}-channel latents and the UNet takes "
                             f"{channels}: they are not one model's parts")
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        kind = _read_config(sched, "scheduler").get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ModelError(f"{path}: the scheduler's prediction_type {kind!r} is not one tunesmith trains "
                             f"({', '.join(PREDICTION_TYPES)})")
    return index


def _read_config(file: Path, what: str) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        raise ModelError(f"{file.parent.parent}: {what}/ has no {file.name}") from None
    except ValueError as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None


class DiffusionModel(nn.Module):
    """The trainable networks of a text-to-image pipeline as one module; ``pipeline`` (not a submodule) samples."""

    def __init__(self, pipe):
        super().__init__()
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.vae = getattr(pipe, "vae", None)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        object.__setattr__(self, "pipeline", pipe)  # not registered: its modules are the ones above
        self.tokenizer = pipe.tokenizer
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # training noise, as diffusers' scripts

    # ---------------------------------------------------------------- what training calls

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and attention mask, as the pipeline's encode_prompt makes them (IF lower-cases captions)."""
        if type(self.pipeline).__name__.startswith("IF"):
            captions = [c.lower().strip() for c in captions]
        length = 77 if type(self.pipeline).__name__.startswith("IF") else self.tokenizer.model_max_length
        enc = self.tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) caption embeddings, with gradients when the text encoder trains. The mask goes to encoders that
        take one in their pipeline's encode_prompt (IF's always; Stable Diffusion's when the encoder's config says
        use_attention_mask); the denoiser attends to every position, as in sampling."""
        return self.text_encoder(input_ids, attention_mask=attention_mask if self.masks_captions else None)[0]

    @property
    def masks_captions(self) -> bool:
        return bool(type(self.pipeline).__name__.startswith("IF")
                    or getattr(self.text_encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the denoiser denoises: the VAE's scaled latent sample for a latent model, else the pixels themselves."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction (B, C, H, W) for noisy inputs at ``timesteps``, conditioned on cached caption
        ``embeds`` or on captions encoded now. IF's extra learned-variance channels are dropped (never in the loss)."""
        if embeds is None:
            embeds = self.encode_text(input_ids, attention_mask)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds.to(self.unet.dtype)).sample
        if pred.shape[1] == 2 * noisy.shape[1]:
            pred = pred[:, :noisy.shape[1]]
        return pred

    def resolution(self) -> int:
        """The image side the model is made for: the denoiser's sample size (times the VAE's downscaling)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(size)


# ---------------------------------------------------------------- load, adapt, save


def load_pipeline(path, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline in ``path`` (its model_index.json names the class), progress bars off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    path = Path(path)
    if not is_pipeline(path):
        raise ModelError(f"{path} is not a diffusers pipeline folder (no {PIPELINE_INDEX})")
    check_pipeline_folder(path)
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"could not load the diffusers pipeline in {path}: {e}") from None
    missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
    if missing:
        raise ModelError(f"{path}: tunesmith fine-tunes text-to-image pipelines with a UNet denoiser and one text "
                         f"encoder; this {type(pipe).__name__} lacks {', '.join(missing)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusion_model(path, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    return DiffusionModel(load_pipeline(path, dtype))


def adapt_diffusion(model: DiffusionModel, method_cfg, train_text_encoder: bool = False):
    """Make what ``method_cfg`` names trainable; returns (model, ParamCounts). lora: adapters on the denoiser (and
    the text encoder with ``train_text_encoder``); full: the denoiser (and the text encoder); freeze: the parameters
    ``method.freeze.train_patterns`` select (regular expressions over names such as ``unet.up_blocks.2.``)."""
    from .adapt import count_params, freeze_except, select_trainable

    model.requires_grad_(False)
    name = method_cfg.name
    if name == "full":
        model.unet.requires_grad_(True)
        if train_text_encoder:
            model.text_encoder.requires_grad_(True)
    elif name == "freeze":
        if method_cfg.freeze.train_last_layers or method_cfg.freeze.train_layers:
            raise ModelError("method.freeze on a text-to-image model: name what trains with method.freeze."
                             "train_patterns (e.g. ['^unet\\.up_blocks\\.', 'attn2']); train_last_layers and "
                             "train_layers count the blocks of a language model")
        freeze_except(model, select_trainable(model, method_cfg.freeze))
    elif name == "lora":
        _add_lora(model.unet, method_cfg.lora, UNET_LORA_TARGETS, "method.lora.target_modules")
        if train_text_encoder:
            _add_lora(model.text_encoder, method_cfg.lora, TEXT_LORA_TARGETS, None)
    else:
        raise ModelError(f"method.name: got {name!r}; allowed: lora, freeze, full")
    if model.vae is not None:
        model.vae.requires_grad_(False)
    return model, count_params(model)


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
    """The diffusers LoRA file of ``model``'s adapters (denoiser and text encoder), with their configs as metadata,
    as diffusers' own training scripts write it."""
    pipeline_class.save_lora_weights(folder, unet_lora_layers=lora_layers(model.unet),
                                     text_encoder_lora_layers=lora_layers(model.text_encoder),
                                     unet_lora_adapter_metadata=lora_metadata(model.unet),
                                     text_encoder_lora_adapter_metadata=lora_metadata(model.text_encoder),
                                     safe_serialization=True)


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

    pipe = load_pipeline(base_ref, next(model.unet.parameters()).dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_lora_file(type(pipe), tmp, model)
        pipe.load_lora_weights(tmp, adapter_name="tuned")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["tuned"])
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
