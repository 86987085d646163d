"""A text-to-image run's LoRA in the key layouts other tools load: diffusers, kohya-ss / A1111, ComfyUI.

The run's adapter is PEFT's (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``, alpha in
the LoRA config). Each style renames the same tensors; none changes a value:

- ``diffusers``: the file diffusers' ``save_lora_weights`` writes (``unet.``/``text_encoder.`` prefixes, PEFT's
  ``lora_A``/``lora_B``, rank and alpha in the safetensors metadata), what ``pipe.load_lora_weights`` reads.
- ``kohya`` (kohya-ss sd-scripts, A1111 / Forge, and what diffusers' ``_convert_non_diffusers_lora_to_diffusers``
  reads): one flat name per module, the diffusers module path with dots as underscores under ``lora_unet_`` (the
  denoiser) or ``lora_te_`` (the text encoder), with ``.lora_down.weight`` (= PEFT's A), ``.lora_up.weight`` (= B) and
  ``.alpha``, a 0-d tensor such that the update is ``up @ down * alpha / rank``. PEFT's rsLoRA scales by
  ``alpha / sqrt(rank)`` instead, so its ``.alpha`` is written as ``alpha * sqrt(rank)``; DoRA has no kohya tensor
  diffusers reads back for these models (it drops ``dora_scale``), so DoRA adapters are refused for kohya and ComfyUI.
  The ``ss_network_*`` metadata sd-scripts writes is added.
- ``comfyui``: what ComfyUI's ``comfy/lora.py`` maps (``model_lora_keys_unet`` / ``model_lora_keys_clip``, read for
  this module): for the denoiser its generic form, the key of the weight in ComfyUI's own (the original LDM /
  CompVis) UNet, ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``, followed by the same
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` as kohya's; the diffusers block names are turned into LDM
  ones the way ComfyUI's ``comfy.utils.unet_to_diffusers`` pairs them (``ldm_unet_name``). For the text encoder
  ComfyUI reads kohya's ``lora_te_text_model_encoder_layers_N_self_attn_q_proj`` for both SD 1.x's CLIP-L and SD 2.x's
  OpenCLIP-H (its generic ``text_encoders.clip_l.…`` form names the encoder by family, which a folder does not say), so
  the text encoder's keys are kohya's.
- SDXL: sd-scripts' SDXL networks name the UNet's modules by the original (LDM/SGM) UNet, ``lora_unet_`` + the LDM
  name with underscores (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), and the two text encoders
  ``lora_te1_`` and ``lora_te2_`` (ComfyUI's key map reads those for clip_l and clip_g); diffusers' SDXL loader maps
  them back through its SGM block mapper and kohya converter.
- Flux and SD3 (transformer denoisers): lora_transformers.py. Flux's kohya file names the original model's fused
  projections (``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_linear1``: PEFT's separate
  q/k/v LoRAs written as one exact block-diagonal LoRA) and is read back by diffusers' kohya Flux converter; the
  ComfyUI file of both families is diffusers' own names with the scale in ``lora_B`` (ComfyUI maps
  ``transformer.<diffusers module>`` for SD3 and Flux). SD3's kohya layout is refused: diffusers reads none of it back.

Checking: ``export.images`` loads each written file the way its users load it and compares the images for fixed
seeds with the run's. The diffusers file through ``pipe.load_lora_weights(folder)``; the kohya file through
``pipe.load_lora_weights(state_dict)``, which runs diffusers' own kohya converter (Flux's too); SD3's and Flux's
ComfyUI file through ``pipe.load_lora_weights(state_dict)`` as well (diffusers' names); the UNets' ComfyUI file, which
no diffusers loader reads as is, through ``comfyui_as_kohya``: the rename ComfyUI itself treats as equal (its key map
gives ``diffusion_model.X`` and ``lora_unet_`` + X with underscores the same weight) and then diffusers'
``_maybe_map_sgm_blocks_to_diffusers`` (LDM block numbers back to diffusers names: an implementation of that mapping
independent of ours) and its kohya converter. ComfyUI itself is not run here.
"""

from __future__ import annotations

import math
import re

import torch

from .errors import ExportError

STYLES = ("diffusers", "kohya", "comfyui")
FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors",
         "comfyui": "lora_comfyui.safetensors"}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def styles(style: str) -> list[str]:
    """The styles ``--style`` names (``all``: every one)."""
    if style == "all":
        return list(STYLES)
    if style not in STYLES:
        raise ExportError(f"--style {style!r}: allowed: {', '.join(STYLES)}, all")
    return [style]


def peft_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B) from a PEFT LoRA state dict (``get_peft_model_state_dict``'s names)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ExportError(f"LoRA tensor {key!r} is not an A or B matrix (DoRA magnitudes or other adapter types "
                              "have no kohya/ComfyUI form that diffusers reads back)")
        parts.setdefault(m["module"], {})[m["ab"]] = t
    bad = [k for k, v in parts.items() if set(v) != {"A", "B"}]
    if bad:
        raise ExportError(f"LoRA modules without both matrices: {bad[:3]}")
    return {k: (v["A"], v["B"]) for k, v in parts.items()}


def kohya_alpha(config: dict | None, module: str, rank: int) -> float:
    """The ``.alpha`` that makes kohya's ``alpha / rank`` the run's scale (PEFT: alpha / rank, or alpha / sqrt(rank)
    with rsLoRA; alpha_pattern per module where the config has one)."""
    config = config or {}
    if config.get("use_dora"):
        raise ExportError("a DoRA adapter: the kohya and ComfyUI layouts carry no DoRA magnitudes that diffusers reads "
                          "back for these models; export it with --style diffusers")
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = float(value)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def to_kohya(unet: dict | None, text_encoder: dict | None, unet_config: dict | None = None,
             text_config: dict | None = None, *, unet_names=None, text_encoder_2: dict | None = None,
             text_2_config: dict | None = None, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """The kohya layout of PEFT LoRA state dicts; ``unet_names`` (module path -> whole name) replaces the denoiser's
    naming (SDXL's LDM names, ComfyUI's form). SDXL (``sdxl``): its two text encoders under ``lora_te1_`` and
    ``lora_te2_``, as sd-scripts' SDXL networks name them."""
    out: dict[str, torch.Tensor] = {}
    te = ("lora_te1_", "lora_te2_") if sdxl else ("lora_te_", None)
    for prefix, state, config in (("lora_unet_", unet, unet_config), (te[0], text_encoder, text_config),
                                  (te[1], text_encoder_2, text_2_config)):
        if prefix is None:
            if state:
                raise ExportError("LoRA tensors of a second text encoder in a pipeline that is not SDXL")
            continue
        for module, (a, b) in peft_modules(state or {}).items():
            if prefix == "lora_unet_" and unet_names is not None:
                name = unet_names(module)
            elif prefix.startswith("lora_te") and module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
                # transformers 5's CLIPTextModel has no text_model level: kohya/A1111/ComfyUI names still do
                name = prefix + "text_model_" + module.replace(".", "_")
            else:
                name = prefix + module.replace(".", "_")
            if name + ".lora_down.weight" in out:
                raise ExportError(f"two LoRA modules share the name {name!r} in this layout")
            out[name + ".lora_down.weight"] = a.detach().contiguous()
            out[name + ".lora_up.weight"] = b.detach().contiguous()
            out[name + ".alpha"] = torch.tensor(kohya_alpha(config, module, a.shape[0]), dtype=torch.float32)
    return out


def to_comfyui(unet: dict | None, text_encoder: dict | None, unet_config: dict | None, text_config: dict | None,
               unet_arch: dict, **sdxl) -> dict[str, torch.Tensor]:
    """ComfyUI's layout: ``diffusion_model.<LDM name>`` for the denoiser, kohya's ``lora_te_`` (SDXL: ``lora_te1_``,
    ``lora_te2_``) for the text encoders."""
    return to_kohya(unet, text_encoder, unet_config, text_config,
                    unet_names=lambda m: "diffusion_model." + ldm_unet_name(m, unet_arch), **sdxl)


def kohya_metadata(unet_config: dict | None, text_config: dict | None) -> dict[str, str]:
    """sd-scripts' ``ss_*`` metadata (A1111 shows it; no loader needs it)."""
    config = unet_config or text_config or {}
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(config.get("r", "")),
            "ss_network_alpha": str(config.get("lora_alpha", "")),
            "ss_network_args": "{}" if not config.get("use_rslora") else '{"rslora": "alpha written as alpha*sqrt(r)"}',
            "ss_training_comment": "written by tunesmith export --format adapter"}


# ---------------------------------------------------------------- diffusers UNet names -> LDM (ComfyUI) names

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
          "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def ldm_unet_name(module: str, arch: dict) -> str:
    """The original (LDM) UNet's name of a diffusers UNet2DConditionModel module, as ComfyUI's
    ``unet_to_diffusers`` pairs them: down block x's resnet/attention i is ``input_blocks.{1 + (L+1)x + i}.0/.1``
    and its downsampler ``input_blocks.{1 + (L+1)x + L}.0.op``; the middle block's resnets ``middle_block.0/.2`` and
    attention ``middle_block.1``; up block x's resnet/attention i (L+1 of them) ``output_blocks.{(L+1)x + i}.0/.1`` and
    its upsampler the block's last entry, ``.1.conv`` or ``.2.conv`` after an attention. L: layers_per_block.
    ``arch``: the UNet's config (layers_per_block, up_block_types)."""
    layers = arch["layers_per_block"]
    n = len(arch["down_block_types"])
    per_block = list(layers) if isinstance(layers, (list, tuple)) else [layers] * n
    for k, v in _BASIC.items():
        if module == k:
            return v
    parts = module.split(".")
    try:
        if parts[0] == "down_blocks":
            x, kind = int(parts[1]), parts[2]
            first = 1 + sum(p + 1 for p in per_block[:x])
            if kind == "downsamplers" and parts[4:] == ["conv"]:
                return f"input_blocks.{first + per_block[x]}.0.op"
            i, rest = int(parts[3]), parts[4:]
            if kind == "resnets":
                return f"input_blocks.{first + i}.0.{_resnet(rest, module)}"
            if kind == "attentions":
                return ".".join([f"input_blocks.{first + i}.1", *rest])
        elif parts[0] == "mid_block":
            kind, i, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "attentions" and i == 0:
                return ".".join(["middle_block.1", *rest])
            if kind == "resnets" and i in (0, 1):
                return f"middle_block.{2 * i}.{_resnet(rest, module)}"
        elif parts[0] == "up_blocks":
            x, kind = int(parts[1]), parts[2]
            up_layers = [p + 1 for p in reversed(per_block)]
            first = sum(up_layers[:x])
            if kind == "upsamplers" and parts[4:] == ["conv"]:
                attn = "CrossAttn" in arch["up_block_types"][x]
                return f"output_blocks.{first + up_layers[x] - 1}.{2 if attn else 1}.conv"
            i, rest = int(parts[3]), parts[4:]
            if kind == "resnets":
                return f"output_blocks.{first + i}.0.{_resnet(rest, module)}"
            if kind == "attentions":
                return ".".join([f"output_blocks.{first + i}.1", *rest])
    except (IndexError, ValueError):
        pass
    raise ExportError(f"LoRA on UNet module {module!r}: it has no name in the LDM (ComfyUI) UNet layout that "
                      "tunesmith knows; export with --style diffusers or kohya")


def _resnet(rest: list[str], module: str) -> str:
    name = ".".join(rest)
    if name not in _RESNET:
        raise ExportError(f"LoRA on UNet module {module!r}: no LDM name for resnet part {name!r}")
    return _RESNET[name]


# ---------------------------------------------------------------- reading back


def comfyui_as_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's generic ``diffusion_model.X`` keys as ``lora_unet_`` + X with underscores: the same weight in
    ComfyUI's own key map (model_lora_keys_unet maps both to ``diffusion_model.X.weight``), and the form diffusers'
    SGM/LDM block mapper reads."""
    out = {}
    for key, t in state.items():
        if key.startswith("diffusion_model."):
            name, _, suffix = key[len("diffusion_model."):].partition(".lora_")
            if not suffix:
                name, _, suffix = key[len("diffusion_model."):].rpartition(".")
                out["lora_unet_" + name.replace(".", "_") + "." + suffix] = t
                continue
            out["lora_unet_" + name.replace(".", "_") + ".lora_" + suffix] = t
        else:
            out[key] = t
    return out


# ---------------------------------------------------------------- files: write one style, load it back


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def run_lora(lora_file) -> tuple[dict[str, dict], dict[str, dict | None]]:
    """({component: state}, {component: LoRA config}) from a run's diffusers LoRA file, for the denoiser (unet or
    transformer) and the text encoders: PEFT names without the ``unet.``/``text_encoder.``/... prefixes, the configs
    from the file's ``lora_adapter_metadata``."""
    import json

    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    parts, configs = {}, {}
    for prefix in COMPONENTS:
        parts[prefix] = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        configs[prefix] = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")} or None
    other = [k for k in state if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if other:
        raise ExportError(f"{lora_file}: LoRA tensors of other components ({other[:2]}): only the denoiser's and the "
                          "text encoders' have kohya/ComfyUI names")
    return parts, configs


def _transformer_style(style: str, pipeline: str, parts: dict, cfgs: dict, base_folder) -> dict[str, torch.Tensor]:
    """SD3's and Flux's kohya / ComfyUI state dicts (lora_transformers.py); T5 adapters and SD3 kohya refused."""
    import json
    from pathlib import Path

    from .lora_transformers import to_comfyui_transformer, to_kohya_flux

    flux = pipeline.startswith("Flux")
    t5 = "text_encoder_2" if flux else "text_encoder_3"
    if parts.get(t5):
        raise ExportError(f"LoRA tensors on {pipeline}'s T5 encoder ({t5}): neither diffusers' kohya converter nor "
                          "ComfyUI's diffusers-name map reads a T5 LoRA; export it with --style diffusers")
    if style == "comfyui":
        names = ("transformer", "text_encoder") + (() if flux else ("text_encoder_2",))
        return to_comfyui_transformer({n: parts[n] for n in names if parts.get(n)}, cfgs)
    if not flux:
        raise ExportError(f"--style kohya for an SD3 LoRA ({pipeline}): sd-scripts' SD3 layout names the original "
                          "MMDiT's fused projections and diffusers has no converter that reads it back, so the file "
                          "could not be checked; export it with --style diffusers or comfyui")
    arch = json.loads((Path(base_folder) / "transformer" / "config.json").read_text(encoding="utf-8"))
    return to_kohya_flux(parts["transformer"], parts["text_encoder"], cfgs["transformer"], cfgs["text_encoder"], arch)


def write_style(style: str, lora_file, out_folder, base_folder) -> str:
    """Write the run's LoRA (its diffusers file ``lora_file``) in ``style`` into ``out_folder``; the file's name."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    target = Path(out_folder) / FILES[style]
    if style == "diffusers":
        shutil.copy2(lora_file, target)
        return target.name
    parts, cfgs = run_lora(lora_file)
    if parts["transformer"] or (Path(base_folder) / "transformer").is_dir():
        index = json.loads((Path(base_folder) / "model_index.json").read_text(encoding="utf-8"))
        state = _transformer_style(style, index.get("_class_name", ""), parts, cfgs, base_folder)
        meta = kohya_metadata(cfgs["transformer"], cfgs["text_encoder"])
        if style == "kohya":
            meta["ss_network_module"] = "networks.lora_flux"  # sd-scripts' Flux network
        save_file(state, str(target), metadata=meta)
        return target.name
    arch = json.loads((Path(base_folder) / "unet" / "config.json").read_text(encoding="utf-8"))
    sdxl = arch.get("addition_embed_type") == "text_time"
    extra = {"text_encoder_2": parts["text_encoder_2"], "text_2_config": cfgs["text_encoder_2"], "sdxl": sdxl}
    args = (parts["unet"], parts["text_encoder"], cfgs["unet"], cfgs["text_encoder"])
    if style == "kohya" and sdxl:  # sd-scripts' SDXL networks name the UNet's modules by the original (LDM) UNet
        state = to_kohya(*args, unet_names=lambda m: "lora_unet_" + ldm_unet_name(m, arch).replace(".", "_"), **extra)
    elif style == "kohya":
        state = to_kohya(*args, **extra)
    else:
        state = to_comfyui(*args, arch, **extra)
    save_file(state, str(target), metadata=kohya_metadata(cfgs["unet"], cfgs["text_encoder"]))
    return target.name


def load_style(pipe, style: str, folder) -> str:
    """Load the ``style`` file in ``folder`` onto ``pipe`` the way its users do (see the module); how, in words."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / FILES[style]
    if style == "diffusers":
        pipe.load_lora_weights(str(folder), weight_name=FILES[style])
        return "pipe.load_lora_weights(folder)"
    state = load_file(str(path))
    if getattr(pipe, "transformer", None) is not None:  # SD3, Flux
        from .lora_transformers import flux_kohya_readable

        why = flux_kohya_readable(state) if style == "kohya" else None
        if why:
            raise ExportError(why)
        pipe.load_lora_weights(state)
        return ("pipe.load_lora_weights(kohya state dict) (diffusers' kohya Flux converter)" if style == "kohya" else
                "pipe.load_lora_weights(ComfyUI state dict: diffusers' names, scale in lora_B)")
    if style == "kohya":
        pipe.load_lora_weights(state)
        return "pipe.load_lora_weights(kohya state dict) (diffusers' kohya converter)"
    # SDXL's loader maps LDM block names with its UNet's config itself; SD 1.x/2.x's is given it
    extra = {} if getattr(pipe, "text_encoder_2", None) is not None else {"unet_config": pipe.unet.config}
    pipe.load_lora_weights(comfyui_as_kohya(state), **extra)
    return "ComfyUI keys -> diffusers' LDM block mapper and kohya converter"
