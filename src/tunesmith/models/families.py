"""The text-to-image families tunesmith fine-tunes, told apart from a pipeline folder's files before any weight loads.

    family  pipeline                     denoiser                        text encoders (in encode order)      sampler
    sd      StableDiffusionPipeline, IF  UNet2DConditionModel            text_encoder (CLIP; IF's: any)       DDPM family
    sdxl    StableDiffusionXLPipeline    UNet2DConditionModel with       text_encoder (CLIP) +                DDPM family
                                         text_time added embeddings      text_encoder_2 (CLIP with projection)
    sd3     StableDiffusion3Pipeline     SD3Transformer2DModel           text_encoder, text_encoder_2 (CLIP   FlowMatchEuler
                                                                         with projection) + text_encoder_3   (flow matching)
                                                                         (T5, optional, never trained)
    flux    FluxPipeline                 FluxTransformer2DModel (latents text_encoder (CLIP: pooled only) +      FlowMatchEuler
                                         packed 2x2, guidance embedded)  text_encoder_2 (T5, never trained)  (flow matching)

``check_pipeline_folder`` reads model_index.json and the component configs and names what is missing (a component's
entry or folder, the VAE of a latent model, SD3's tokenizer_3 without its text_encoder_3) or why a folder is of a
family tunesmith does not train (Flux, Sana, the prior of a two-stage model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

PIPELINE_INDEX = "model_index.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED = ("Stable Diffusion 1.x/2.x and IF-layout pixel models (a UNet2DConditionModel, one text encoder), SDXL "
             "(two CLIP text encoders, micro-conditioning), SD3 (SD3Transformer2DModel) and Flux "
             "(FluxTransformer2DModel), the last two by flow matching")
TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # the pipeline component that denoises: unet or transformer
    text_encoders: tuple[str, ...]  # components, in the order the pipeline's encode_prompt uses them
    required: tuple[str, ...]  # components a folder must have (a pixel-space UNet may lack vae)
    trainable_text: tuple[str, ...]  # the text encoders train_text_encoder trains (those diffusers loads LoRA into)
    flow: bool = False  # flow matching (FlowMatchEulerDiscreteScheduler) instead of a DDPM-family noise schedule
    packed: bool = False  # the denoiser takes 2x2 patches of latents packed into channels (Flux): 4x the VAE's


FAMILIES = {
    "sd": Family("sd", "unet", ("text_encoder",), ("unet", "text_encoder", "tokenizer", "scheduler"),
                 ("text_encoder",)),
    "sdxl": Family("sdxl", "unet", ("text_encoder", "text_encoder_2"),
                   ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
                   ("text_encoder", "text_encoder_2")),
    "sd3": Family("sd3", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                  ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
                  ("text_encoder", "text_encoder_2"), flow=True),
    "flux": Family("flux", "transformer", ("text_encoder", "text_encoder_2"),
                   ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
                   ("text_encoder",), flow=True, packed=True),
}


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from the components it has."""
    if getattr(pipe, "transformer", None) is not None:
        return FAMILIES[TRANSFORMERS[type(pipe.transformer).__name__]]
    if getattr(pipe, "text_encoder_2", None) is not None:
        return FAMILIES["sdxl"]
    return FAMILIES["sd"]


def check_pipeline_folder(path) -> dict:
    """The folder's model_index.json, once checked from the files alone (no weights read): the family is one tunesmith
    trains, every component the family needs is listed and has its folder (and a config), a latent denoiser has its
    VAE with as many channels, and the scheduler is one the family's loss knows. Raises ModelError naming what is
    wrong."""
    path = Path(path)
    try:
        index = json.loads((path / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable diffusers pipeline folder ({PIPELINE_INDEX}: {e})") from None
    cls = index.get("_class_name", "?")
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    present = {k for k, v in listed.items() if v[0] is not None and v[1] is not None}
    family = _family(path, cls, listed, present)
    missing = [n for n in family.required if n not in present and not (n == "vae" and family.name == "sd")]
    if missing:
        raise ModelError(f"{path}: {PIPELINE_INDEX} ({cls}, the {family.name} family) lists no {', '.join(missing)}; "
                         f"a {family.name} pipeline needs {', '.join(family.required)}")
    absent = [f"{n}/ ({listed[n][1]})" for n in sorted(present) if not (path / n).is_dir()]
    if absent:
        raise ModelError(f"{path}: {PIPELINE_INDEX} ({cls}) lists components whose folders are missing: "
                         f"{', '.join(absent)}; copy the whole pipeline folder")
    if family.name == "sd3" and ("text_encoder_3" in present) != ("tokenizer_3" in present):
        have, lack = ("text_encoder_3", "tokenizer_3") if "text_encoder_3" in present else ("tokenizer_3",
                                                                                             "text_encoder_3")
        raise ModelError(f"{path}: {cls} lists {have} but no {lack}: SD3's T5 needs both (or neither: the pipeline "
                         "then conditions on the two CLIP encoders alone)")
    denoiser = _read_config(path / family.denoiser / "config.json", family.denoiser)
    if family.denoiser == "unet":
        _check_unet(path, family, denoiser)
    channels = int(denoiser.get("in_channels", 4)) // (4 if family.packed else 1)
    if channels != 3 and "vae" not in present:
        raise ModelError(f"{path}: the UNet takes {channels}-channel latents but {PIPELINE_INDEX} ({cls}) has no vae "
                         "to encode images into them (a latent model needs its AutoencoderKL in vae/)")
    if "vae" in present:
        vae = _read_config(path / "vae" / "config.json", "vae")
        if int(vae.get("latent_channels", channels)) != channels:
            raise ModelError(f"{path}: the VAE makes {vae.get('latent_channels')}-channel latents and the "
                             f"{family.denoiser} takes {channels}: they are not one model's parts")
    _check_scheduler(path, family)
    return index


def _family(path: Path, cls: str, listed: dict, present: set) -> Family:
    if "prior" in listed:
        raise ModelError(f"{path}: {cls} has a prior denoiser (a two-stage model); tunesmith fine-tunes {SUPPORTED}")
    if "transformer" in listed:
        kind = listed["transformer"][1]
        if (path / "transformer" / "config.json").is_file():
            kind = _read_config(path / "transformer" / "config.json", "transformer").get("_class_name", kind)
        if kind not in TRANSFORMERS:
            raise ModelError(f"{path}: {cls} has a {kind} transformer denoiser; tunesmith fine-tunes {SUPPORTED} "
                             "(Sana and other transformer families are not supported yet)")
        return FAMILIES[TRANSFORMERS[kind]]
    if {"text_encoder_2", "tokenizer_2"} & set(listed) or cls.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl"]
    return FAMILIES["sd"]


def _check_unet(path: Path, family: Family, unet: dict) -> None:
    if unet.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise ModelError(f"{path}: the denoiser is a {unet.get('_class_name')}; tunesmith fine-tunes {SUPPORTED}")
    added = unet.get("addition_embed_type")
    if family.name == "sdxl" and added != "text_time":
        raise ModelError(f"{path}: an SDXL pipeline whose UNet has addition_embed_type {added!r}: SDXL's UNet "
                         "conditions on the pooled caption and the size/crop time ids ('text_time')")
    if family.name == "sd" and added in ("text_time", "text_image"):
        raise ModelError(f"{path}: the UNet conditions on added embeddings ({added}: SDXL's micro-conditioning) but "
                         f"the folder has one text encoder; an SDXL pipeline also needs text_encoder_2 and tokenizer_2")


def _check_scheduler(path: Path, family: Family) -> None:
    sched = path / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return
    config = _read_config(sched, "scheduler")
    if family.flow:
        if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ModelError(f"{path}: the scheduler is a {config.get('_class_name')}, and tunesmith trains the "
                             f"{family.name} family by flow matching, which needs its FlowMatchEulerDiscreteScheduler")
        return
    if config.get("_class_name", "").startswith("FlowMatch"):
        raise ModelError(f"{path}: a UNet pipeline with a {config['_class_name']}: flow matching is trained for the "
                         "SD3 and Flux transformers only; a UNet pipeline needs a DDPM-family scheduler")
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelError(f"{path}: the scheduler's prediction_type {kind!r} is not one tunesmith trains "
                         f"({', '.join(PREDICTION_TYPES)})")


def _read_config(file: Path, what: str) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        raise ModelError(f"{file.parent.parent}: {what}/ has no {file.name}") from None
    except ValueError as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
