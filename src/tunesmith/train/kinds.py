"""Model kinds: what the training loop does differently for a causal language model and a text-to-image pipeline.

The loop (loop.py) is one function for every kind. What depends on the kind of model is a small value it calls:

    tokenizer     the model folder -> the tokenizer the objective renders with (a pipeline's: its captions')
    load          the model folder -> one nn.Module (a pipeline: models.diffusion.DiffusionModel)
    adapt         lora / freeze / full on it -> (model, parameter counts)
    matmul_shape  the shape at which model.dtype auto measures bf16 against fp32
    speed_up      the kind's own training speed-ups (language models: kernels, packing, NEFTune, compile)
    save          the delivered model folder (best/)

``kind_of(path)`` picks one from the folder: a diffusers pipeline (model_index.json) or a transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import models
from ..events import Message


class CausalLM:
    name = "causal language model"

    def tokenizer(self, path, cfg):
        return models.load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code,
                                     chat_template=cfg.model.chat_template)

    def load(self, path, cfg, dtype, tokenizer):
        return models.load_model(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                 dropout=cfg.model.dropout, tokenizer=tokenizer)

    def adapt(self, model, cfg):
        return models.adapt(model, cfg.method)

    def matmul_shape(self, path, cfg) -> tuple[int, int]:
        return models.matmul_shape(path, cfg.model.trust_remote_code)

    def speed_up(self, model, cfg, compute, emit) -> None:
        """Kernels, gradient checkpointing, NEFTune, packing and compilation, as the config asks."""
        from .kernels import apply_kernels, compile_blocks
        from .packing import enable_packing
        from .steps import add_neftune

        taken = apply_kernels(model, cfg.train.kernels)  # Llama-formula blocks through the kernels, once (kernels/)
        if compute.fused:
            emit(Message("info", "train.kernels: " + (", ".join(f"{n} {k}" for k, n in taken.items() if n) or
                                                      "none of this model's blocks is Llama-formula code")
                         + "; the output layer with the loss"))
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        if cfg.train.neftune_alpha:
            add_neftune(model, cfg.train.neftune_alpha)
        if cfg.train.packing:  # one unpadded row per micro-batch, attention per example (packing.py)
            why = ("NEFTune scales its noise by the padded length" if cfg.train.neftune_alpha else
                   None if enable_packing(model) else "this model's attention cannot keep packed examples apart")
            if why:
                emit(Message("info", f"train.packing is off for this run ({why}): training on padded batches"))
        if cfg.train.compile:  # after packing and kernels: the blocks compile what they will run (kernels/)
            emit(Message("info", f"train.compile: {compile_blocks(model)} blocks compile at the first step"))

    def save(self, model, tokenizer, path, base_ref: str, method: str) -> Path:
        return models.save_model(model, tokenizer, path, base_ref=base_ref, method=method)


class TextToImage:
    name = "text-to-image pipeline"

    def tokenizer(self, path, cfg):
        from transformers import AutoTokenizer

        from ..models.diffusion import check_pipeline_folder

        check_pipeline_folder(path)  # the first look at the folder: what is missing, or an unsupported family
        return AutoTokenizer.from_pretrained(str(Path(path) / "tokenizer"))

    def load(self, path, cfg, dtype, tokenizer):
        from ..models.diffusion import load_diffusion_model

        return load_diffusion_model(path, dtype)

    def adapt(self, model, cfg):
        from ..models.diffusion import adapt_diffusion

        return adapt_diffusion(model, cfg.method, cfg.objective.denoise.train_text_encoder)

    def matmul_shape(self, path, cfg) -> tuple[int, int]:
        """(widest UNet block, 4 x that): its convolutions and attention are matrix products of about that size (a
        transformer denoiser: its attention width)."""
        try:
            if (Path(path) / "transformer").is_dir():
                t = json.loads((Path(path) / "transformer" / "config.json").read_text(encoding="utf-8"))
                return int(t["num_attention_heads"] * t["attention_head_dim"]), 4 * int(t["num_attention_heads"] *
                                                                                         t["attention_head_dim"])
            unet = json.loads((Path(path) / "unet" / "config.json").read_text(encoding="utf-8"))
            width = max(unet.get("block_out_channels") or [320])
        except (OSError, ValueError):
            width = 320
        return int(width), 4 * int(width)

    def speed_up(self, model, cfg, compute, emit) -> None:
        """Gradient checkpointing of the denoiser (and the text encoders that train); the language-model kernels,
        packing, NEFTune and compile do not apply."""
        from ..models.diffusion import trained_text_encoders

        if cfg.train.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
            for enc in trained_text_encoders(model, cfg.objective.denoise.train_text_encoder).values():
                enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ignored = [k for k, on in (("train.packing", cfg.train.packing), ("train.compile", cfg.train.compile),
                                   ("train.neftune_alpha", cfg.train.neftune_alpha)) if on]
        if ignored and [k for k in ignored if k != "train.packing"]:  # packing is on by default: say nothing of it
            emit(Message("info", f"{', '.join(ignored)}: language-model settings, not used for a {self.name}"))

    def save(self, model, tokenizer, path, base_ref: str, method: str) -> Path:
        from ..models.diffusion import save_diffusion_model

        return save_diffusion_model(model, path, base_ref=base_ref, method=method)


def kind_of(path) -> CausalLM | TextToImage:
    from ..models.diffusion import is_pipeline

    return TextToImage() if is_pipeline(path) else CausalLM()


def kind_mismatch(objective, kind, model_name: str) -> str | None:
    """What to change when ``objective`` trains another kind of model than ``kind`` (None when they fit)."""
    wanted = getattr(objective, "model_kind", CausalLM.name)
    if wanted == kind.name:
        return None
    fix = ("set objective.name=denoise" if kind.name == TextToImage.name else
           "set model.name to a diffusers text-to-image pipeline folder")
    return f"objective {objective.name!r} trains a {wanted}, and model {model_name!r} is a {kind.name}: {fix}"
