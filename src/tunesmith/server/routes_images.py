"""OpenAI's Images API, generations: ``POST /v1/images/generations`` with a base text-to-image model (the built-in
alias, or one registered with ``--model NAME=PATH``) or a fine-tuned one (``ft:...``, as its job reports it, or one of
its checkpoints, ``ft:...:ckpt-step-N`` as checkpoints.list reports them).

    request   model (required here), prompt, n (1-10), size ("WxH" at the model's own resolution, or "auto"),
              response_format ("b64_json"; "url" is refused: this server keeps no image store to link to),
              quality "auto"/"standard", background "auto"/"opaque", output_format "png", moderation "auto",
              user (ignored); anything else asking for more is refused, never silently dropped
              tunesmith extensions: seed (image i from seed + i, as `tunesmith generate`), steps, guidance_scale
    response  {"created", "data": [{"b64_json": PNG, "revised_prompt": null}, ...], "size", "output_format": "png",
               "quality": "standard", "background": "opaque"}

Without ``seed`` each image has a fresh random seed, as the hosted API's images differ call to call. Sampler steps and
guidance default to the run's own (objective.denoise.inference_steps / guidance_scale: what its evaluation grids used),
for a base model to the config defaults. Errors are OpenAI's shape: an unknown model 404 model_not_found, a language
model, a size the model does not draw or n out of range 400 invalid_value (n: integer_below_min_value /
integer_above_max_value, as the hosted API says).
"""

from __future__ import annotations

import base64
import functools
import io
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import user_errors
from .http import ApiError, principal
from .inference import created
from .settings import Settings
from .store import Store

MAX_N = 10  # the hosted API's range for n (dall-e-2)
MAX_PROMPT = 4000  # characters (dall-e-3's limit; the model's tokenizer truncates far sooner)


@functools.lru_cache(maxsize=256)
def _image_folder(ref: str) -> Path | None:
    from ..models.diffusion import text_to_image_folder

    try:
        return text_to_image_folder(ref)
    except user_errors():  # a run without its delivered model (deleted, unfinished): not an image model to serve
        return None


def is_image_model(ref) -> bool:
    """Whether a base model reference names a text-to-image model (the answer is cached: base models are fixed)."""
    return _image_folder(str(ref)) is not None


@dataclass(frozen=True)
class ImageRef:
    """A text-to-image model for the model pool: a pipeline folder, or a delivered LoRA folder on its base; with
    ``checkpoint``, the run's model at that checkpoint instead."""
    folder: str
    checkpoint: str | None = None


def load_image_model(ref: ImageRef):
    """(pipeline, the denoise settings its run drew with: steps and guidance)."""
    from ..evaluate.image_cli import run_settings
    from ..models.diffusion import load_tuned_pipeline

    settings = run_settings(Path(ref.folder))[0]
    if ref.checkpoint is not None:
        return load_image_checkpoint(Path(ref.folder).parent, Path(ref.checkpoint)), settings
    return load_tuned_pipeline(ref.folder), settings


def load_image_checkpoint(run: Path, checkpoint: Path):
    """The run's model at a checkpoint, built as training built it: the base pipeline adapted by the run's method
    (its LoRA adapters, or the parts full fine-tuning trains), then every trainable parameter from the checkpoint's
    ``trainable.safetensors``, each of which must find its parameter with the same shape (or nothing is served)."""
    import torch
    from safetensors.torch import load_file

    from ..config import load_config
    from ..models import ModelError
    from ..models.diffusion import adapt_diffusion, load_diffusion_model
    from ..models.resolver import ensure_local

    cfg = load_config(run / "config.resolved.yaml")
    model, _ = adapt_diffusion(load_diffusion_model(ensure_local(cfg.model.name)), cfg.method,
                               cfg.objective.denoise.train_text_encoder)
    tensors = load_file(str(checkpoint / "trainable.safetensors"))
    params = dict(model.named_parameters())
    bad = [n for n, t in tensors.items() if n not in params or params[n].shape != t.shape]
    if bad:
        raise ModelError(f"checkpoint {checkpoint.name} does not fit the run's model ({len(bad)} of {len(tensors)} "
                         f"tensors, e.g. {bad[0]})")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return model.pipeline


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is refused (unknown_parameter), as the hosted API does
    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    stream: bool | None = None
    partial_images: int | None = None
    user: str | None = None
    # tunesmith extensions
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0, le=100)


# field -> values that ask for nothing more than this server does (None always does)
NEUTRAL = {"quality": ("auto", "standard"), "style": (), "background": ("auto", "opaque"), "moderation": ("auto",),
           "output_format": ("png",), "output_compression": (100,), "stream": (False,), "partial_images": (0,)}


def add_image_routes(app: FastAPI, settings: Settings, store: Store) -> None:
    from .routes_chat import CHECKPOINT_RE, _not_found
    from .routes_jobs import checkpoint_dir

    def image_model(name: str | None, request: Request) -> tuple[str, ImageRef]:
        if not name:
            raise ApiError(400, "model is required on this server: name a text-to-image model (GET /v1/models)",
                           param="model", code="missing_required_parameter")
        if name in app.state.base_models:
            folder = _image_folder(str(app.state.base_models[name]))
            what = "a base language model"
        else:  # a fine-tuned model, or one of its checkpoints (ft:...:ckpt-step-N, as checkpoints.list gives it)
            m = CHECKPOINT_RE.match(name)
            job = store.job_by_model(m.group(1) if m else name)
            if job is None or not principal(request).sees(job["project"]):
                raise _not_found(name)
            folder = _image_folder(str(settings.run_dir(job["id"])))
            what = "a fine-tuned language model"
            if m is not None and folder is not None:
                row = next((r for r in store.list_checkpoints(job["id"]) if r["step"] == int(m.group(2))), None)
                if row is None or not checkpoint_dir(settings, row).is_dir():  # unknown, or pruned
                    raise _not_found(name)
                return name, ImageRef(str(folder), str(checkpoint_dir(settings, row)))
        if folder is None:
            raise ApiError(400, f"Invalid value: '{name}'. It is {what}, not a text-to-image model: use it with "
                                "/v1/chat/completions", param="model", code="invalid_value")
        return name, ImageRef(str(folder))

    @app.post("/v1/images/generations")
    def generate(body: ImageRequest, request: Request):
        for field, neutral in NEUTRAL.items():
            value = getattr(body, field)
            if value is not None and value not in neutral:
                raise ApiError(400, f"{field}={value!r} is not supported on this server (tunesmith draws PNG images "
                                    "with a local model); leave it out", param=field, code="unsupported_value")
        if body.response_format not in (None, "b64_json", "url"):
            raise ApiError(400, f"Invalid value: {body.response_format!r}. Supported values are: 'b64_json' and 'url'.",
                           param="response_format", code="invalid_value")
        if body.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported on this server: it keeps no image store to "
                                "link to; use 'b64_json'", param="response_format", code="unsupported_value")
        n = 1 if body.n is None else body.n
        if n < 1 or n > MAX_N:
            low = n < 1
            raise ApiError(400, f"Invalid 'n': integer {'below minimum' if low else 'above maximum'} value. Expected a "
                                f"value {'>= 1' if low else f'<= {MAX_N}'}, but got {n} instead.", param="n",
                           code="integer_below_min_value" if low else "integer_above_max_value")
        if not body.prompt.strip():
            raise ApiError(400, "Invalid 'prompt': empty string. Expected a non-empty prompt.", param="prompt",
                           code="empty_string")
        if len(body.prompt) > MAX_PROMPT:
            raise ApiError(400, f"Invalid 'prompt': string too long. Expected a string with maximum length "
                                f"{MAX_PROMPT}, but got a string with length {len(body.prompt)} instead.",
                           param="prompt", code="string_above_max_length")
        name, ref = image_model(body.model, request)
        try:
            entry = app.state.pool.get(name, ref)
        except user_errors() as e:
            raise ApiError(500, f"model {name!r} could not be loaded: {e}", param="model", type_="server_error",
                           code="model_load_failed") from None
        pipe, run = entry.model, entry.tokenizer  # for an image model: the pipeline, and its run's denoise settings
        side = _resolution(pipe)
        size = f"{side}x{side}"
        if body.size not in (None, "auto", size):
            raise ApiError(400, f"Invalid value: {body.size!r}. Model {name} draws {size} images: use size {size!r} "
                                "or 'auto'", param="size", code="invalid_value")
        start = body.seed if body.seed is not None else secrets.randbelow(2**31 - MAX_N)
        images = _draw(entry, body.prompt, n, start, body.steps or run.inference_steps,
                       run.guidance_scale if body.guidance_scale is None else body.guidance_scale)
        return {"created": created(), "data": [{"b64_json": _png(im), "revised_prompt": None} for im in images],
                "size": size, "output_format": "png", "quality": "standard", "background": "opaque"}


def _resolution(pipe) -> int:
    """The side the pipeline draws at: the denoiser's sample size times the VAE's downscale (pixel models: 1)."""
    side = pipe.unet.config.sample_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    vae = getattr(pipe, "vae", None)
    return int(side * (pipe.vae_scale_factor if vae is not None else 1))


def _draw(entry, prompt: str, n: int, seed: int, steps: int, guidance: float):
    import torch

    from ..evaluate.images import generate_images

    with entry.lock, torch.inference_mode():  # one generation at a time per pipeline
        return generate_images(entry.model, [prompt] * n, [seed + i for i in range(n)], steps=steps, guidance=guidance)


def _png(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
