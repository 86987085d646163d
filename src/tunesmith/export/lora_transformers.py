"""The LoRA of a transformer denoiser (Flux, SD3) in kohya's and ComfyUI's layouts; lora_formats.py has the UNets'.

Flux, ``kohya``: sd-scripts' Flux networks (``networks/lora_flux.py``) name the modules of the original (BFL) model,
``lora_unet_`` + its dotted name with underscores: ``double_blocks_N_img_attn_qkv``, ``..._img_attn_proj``,
``..._img_mlp_0`` / ``_2``, ``..._img_mod_lin`` and the ``txt_`` ones of the text stream, ``single_blocks_N_linear1``,
``..._linear2``, ``..._modulation_lin``; the CLIP text encoder ``lora_te1_text_model_encoder_layers_N_...`` (T5,
sd-scripts' ``lora_te3_``, has no reader in diffusers' converter: a T5 adapter is refused). diffusers reads it back with
``_convert_kohya_flux_lora_to_diffusers`` (what ``FluxPipeline.lora_state_dict`` runs on any file with
``.lora_down.weight`` keys), ComfyUI with the generic ``lora_unet_`` + name map of ``model_lora_keys_unet``.

The original model fuses what diffusers keeps apart: a double block's q, k and v are one ``qkv`` linear (per stream),
a single block's q, k, v and MLP input are one ``linear1``. PEFT's adapter has a LoRA per diffusers module, so parts
``(A_i, B_i)`` of rank r are written as ONE LoRA of rank k*r that is exactly theirs::

    down = [A_1; A_2; ...; A_k]              (k*r, in)      rows stacked
    up   = diag(B_1, B_2, ..., B_k)          (sum out_i, k*r) block-diagonal, zeros elsewhere
    up @ down = [B_1 A_1; B_2 A_2; ...]      each part's rows get its own update and nothing else

``.alpha`` is k times the parts' alpha, so alpha / rank (kohya's scale) stays theirs: diffusers' converter and ComfyUI
(alpha over the rank of ``down``) read it so. (sd-scripts' ``split_qkv``
option saves its fused file with the per-part alpha unchanged and splits it back on loading; loaded there with
``split_qkv``, this file would be k times too strong.) A part the run did not adapt (proj_mlp in linear1 by default)
gets zero blocks of the same rank. diffusers' converter finds ``up`` block-diagonal (its "sparse" case: rank divisible
by k, off-diagonal blocks zero) and chunks ``down`` back into the A_i and ``up`` into the B_i: the very tensors, scaled
by alpha / rank as its other kohya paths are. Parts of different ranks or scales are written the same way with each
part's scale folded into its B (and alpha = rank): the same updates to float rounding, as diffusers' non-sparse case
reads it (each part keeps all of ``down`` and its own rows of ``up``). Caveat of that reader (and of sd-scripts' own):
it splits ``linear1`` at FLUX.1's sizes (3072 x 3 + 12288 rows), so a single-block LoRA of a transformer of another
width cannot be read back by diffusers (ComfyUI adds ``up @ down`` to the fused weight and needs no split); such a file
is refused by the check rather than written unchecked. LoRA on the outer layers (x_embedder, context_embedder,
time_text_embed, proj_out, norm_out: sd-scripts' img_in, txt_in, time_in, vector_in, guidance_in, final_layer) is
refused for kohya: diffusers 0.42's converter returns them without the ``transformer.`` prefix and its loader drops
them, so such a file would not load back whole (the comfyui file carries them).

SD3 and Flux, ``comfyui``: ComfyUI's ``model_lora_keys_unet`` maps diffusers' own names for these two families,
``transformer.<diffusers module>`` (comfy/lora.py: ``key_map["transformer.{}".format(k[:-len(".weight")])] = to``,
commented "regular diffusers sd3 lora format" in its SD3 branch and "simpletrainer and probably regular diffusers flux
lora format" in its Flux one; read at commit 41444b5 of comfyanonymous/ComfyUI, through
``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``, which point q, k, v and proj_mlp at their slices of the
fused weights), and ``load_lora`` reads ``.lora_B.weight`` / ``.lora_A.weight`` under those names. What it does not read
is the alpha diffusers' file keeps in its metadata: a module without a ``.alpha`` key is applied at scale 1 (``B @ A``),
so a run trained at alpha != r would load at the wrong strength. The ComfyUI file is therefore the diffusers layout with
the run's scale (alpha / r; rsLoRA alpha / sqrt(r)) multiplied into each ``lora_B`` and no ``.alpha`` (diffusers' SD3
loader refuses keys without "lora" in them, so a ``.alpha`` key would make the file unreadable there), and the CLIP
encoders under ``text_encoder.text_model.encoder.layers.N...`` (and ``text_encoder_2.`` for SD3's second), ComfyUI's
"diffusers lora" names of ``model_lora_keys_clip``. diffusers reads the same file back with
``pipe.load_lora_weights(state_dict)``: no metadata, so alpha = rank, scale 1, the same reading. Scaling B by a power of
two (alpha = 2r, r, ...) is exact; another scale may round the last bit.

SD3, ``kohya``: refused. sd-scripts' SD3 networks name the original MMDiT
(``lora_unet_joint_blocks_N_x_block_attn_qkv``) and diffusers 0.42 has no converter that reads them:
``SD3LoraLoaderMixin.lora_state_dict`` converts nothing, and ``load_lora_weights`` on such a file finds no
``transformer.`` keys and loads nothing, with only a warning (tried on the tiny SD3 pipeline: zero adapters after
loading), so such a file could not be checked here.
"""

from __future__ import annotations

import torch

from .errors import ExportError
from .lora_formats import kohya_alpha, peft_modules

# diffusers module (inside transformer_blocks.N) -> (kohya name inside double_blocks_N, part index in a fused module)
_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.to_out.0": ("img_attn_proj", None), "ff.net.0.proj": ("img_mlp_0", None),
           "ff.net.2": ("img_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", None),
           "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
           "norm1_context.linear": ("txt_mod_lin", None)}
# inside single_transformer_blocks.N -> inside single_blocks_N
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None)}
FLUX1_LINEAR1 = (3072, 3072, 3072, 12288)  # the split diffusers' converter applies to every single block's linear1


def flux_kohya_name(module: str) -> tuple[str, int | None]:
    """(sd-scripts' name, part index in a fused module or None) of a diffusers FluxTransformer2DModel module."""
    parts = module.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2 and parts[1].isdigit():
        table, block = (_DOUBLE, "double_blocks") if parts[0] == "transformer_blocks" else (_SINGLE, "single_blocks")
        found = table.get(".".join(parts[2:]))
        if found:
            return f"lora_unet_{block}_{parts[1]}_{found[0]}", found[1]
        raise ExportError(f"LoRA on Flux transformer module {module!r}: it has no name in kohya's Flux layout "
                          "(sd-scripts' networks/lora_flux.py); export with --style diffusers or comfyui")
    # sd-scripts names the outer layers too (img_in, txt_in, time_in_*, vector_in_*, guidance_in_*, final_layer_*), but
    # diffusers 0.42's converter returns them without the "transformer." prefix and its loader drops them
    raise ExportError(f"LoRA on Flux transformer module {module!r}: diffusers' kohya Flux converter drops the outer "
                      "layers' LoRA (it returns x_embedder, context_embedder, time_text_embed, proj_out and norm_out "
                      "without the transformer. prefix), so the kohya file could not be checked; export with --style "
                      "diffusers or comfyui (ComfyUI reads the comfyui file's diffusers names for these layers)")


def fused_part_sizes(name: str, arch: dict) -> tuple[int, ...]:
    """Rows of each part of a fused module (q, k, v[, mlp]) from the transformer's config."""
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    mlp = int(inner * 4.0)  # FluxSingleTransformerBlock's mlp_ratio
    return (inner,) * 3 + ((mlp,) if name.endswith("_linear1") else ())


def fuse_lora(parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]], sizes: tuple[int, ...],
              in_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of one LoRA whose update is each part's ``scale_i * B_i @ A_i`` in its rows (see the module).

    ``parts``: part index -> (A (r_i, in), B (out_i, r_i), kohya alpha_i: the scale is alpha_i / r_i); missing parts
    get zero blocks.
    """
    ranks = {a.shape[0] for a, _, _ in parts.values()}
    alphas = {alpha for _, _, alpha in parts.values()}
    same = len(ranks) == 1 and len(alphas) == 1
    rank = max(ranks)
    ref = next(iter(parts.values()))[0]
    downs, blocks = [], []
    for i, rows in enumerate(sizes):
        a, b, alpha = parts.get(i, (ref.new_zeros(rank, in_features), ref.new_zeros(rows, rank), float(rank)))
        if b.shape[0] != rows or a.shape[1] != in_features:
            raise ExportError(f"LoRA part {i} is {b.shape[0]}x{a.shape[1]}; the fused module's part is "
                              f"{rows}x{in_features}")
        downs.append(a)
        blocks.append(b if same else b * (alpha / a.shape[0]))
    down = torch.cat(downs, dim=0)  # (sum r_i, in)
    up = torch.block_diag(*blocks)  # (sum out_i, sum r_i)
    # the same scale: alpha_i * k / (r * k) == alpha_i / r, kohya's scale is the parts'; else it is in the B blocks
    alpha = next(iter(alphas)) * len(sizes) if same else float(down.shape[0])
    return down.contiguous(), up.contiguous(), alpha


def to_kohya_flux(transformer: dict | None, text_encoder: dict | None, t_config: dict | None, te_config: dict | None,
                  arch: dict) -> dict[str, torch.Tensor]:
    """Flux's kohya layout (see the module) of PEFT LoRA state dicts of the transformer and CLIP."""
    from .lora_formats import to_kohya

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple]] = {}
    for module, (a, b) in peft_modules(transformer or {}).items():
        name, part = flux_kohya_name(module)
        alpha = kohya_alpha(t_config, module, a.shape[0])
        if part is not None:
            fused.setdefault(name, {})[part] = (a.detach(), b.detach(), alpha)
            continue
        out[name + ".lora_down.weight"] = a.detach().contiguous()
        out[name + ".lora_up.weight"] = b.detach().contiguous()
        out[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    for name, parts in fused.items():
        down, up, alpha = fuse_lora(parts, fused_part_sizes(name, arch), next(iter(parts.values()))[0].shape[1])
        out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = down, up
        out[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    out.update(to_kohya(None, text_encoder, None, te_config, sdxl=True, text_encoder_2=None))  # CLIP: lora_te1_
    return out


def flux_kohya_readable(state: dict[str, torch.Tensor]) -> str | None:
    """Why diffusers' kohya Flux converter cannot read ``state`` back (a linear1 not of FLUX.1's sizes), or None."""
    for key, t in state.items():
        if key.endswith("_linear1.lora_up.weight") and t.shape[0] != sum(FLUX1_LINEAR1):
            return (f"{key.split('.')[0]}: diffusers' kohya Flux converter splits every single block's linear1 at "
                    f"FLUX.1's sizes ({' + '.join(map(str, FLUX1_LINEAR1))} rows) and this transformer's has "
                    f"{t.shape[0]}, so the file cannot be loaded back and checked; ComfyUI would read it. Export with "
                    "--style diffusers or comfyui, or train without LoRA on the single blocks' attention "
                    "(method.lora.target_modules naming transformer_blocks.N modules only)")
    return None


def to_comfyui_transformer(parts: dict[str, dict], configs: dict[str, dict | None]) -> dict[str, torch.Tensor]:
    """ComfyUI's layout of an SD3 / Flux LoRA (see the module): diffusers' names, PEFT's A, and B times the run's scale
    (ComfyUI applies ``B @ A`` at scale 1 when a module has no ``.alpha``)."""
    out: dict[str, torch.Tensor] = {}
    for component, state in parts.items():
        for module, (a, b) in peft_modules(state or {}).items():
            scale = kohya_alpha(configs.get(component), module, a.shape[0]) / a.shape[0]  # alpha/r (rsLoRA: /sqrt(r))
            if component != "transformer" and not module.startswith("text_model."):
                # transformers 5's CLIPTextModel has no text_model level; ComfyUI's names have it
                module = "text_model." + module
            name = f"{component}.{module}"
            out[name + ".lora_A.weight"] = a.detach().contiguous()
            out[name + ".lora_B.weight"] = (b.detach() * scale).contiguous()
    return out
