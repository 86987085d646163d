"""A Llama-formula decoder block written out, each kernel called with what it computes from.

transformers' LlamaDecoderLayer runs norm -> attention -> residual -> norm -> MLP -> residual, calling its modules
one after another. Written out here with the same operations, every kernel call says what it receives: the q/k/v
projections are given the attention norm's input and weights (``RMSNormOf``), since they compute the norm
themselves; the down projection is given gate and up (``SwiGLUOf``); the attention gets the packed row's
boundaries from the keyword arguments the model was called with. Nothing travels between kernels except through
these arguments.

It applies where the code is transformers' Llama code, compared by bytecode (``same_code``): the decoder layer (which
Mistral, Qwen2/3, Gemma, Phi-3, ... also use unchanged), the RMSNorm (Llama, Mistral, Qwen2/3, ...; not Gemma's
``1 + weight``), the MLP with a SiLU (not Phi-3's fused gate_up, not GELU MLPs) and the attention (Llama's, and
Qwen2's and Mistral's, which add a sliding window). Each part whose code is not Llama's runs the model's own
module. Generation with a KV cache, and a forward asked for its attention weights, run the model's own code.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from .ops import rms_norm, rotary
from .projections import RMSNormOf, SwiGLUOf, project


def same_code(f, g) -> bool:
    """Whether two functions have identical bytecode, constants and names (one was copied from the other)."""
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names)


def _llama():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def is_llama_norm(module) -> bool:
    """Llama's RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` (not Gemma's ``(1 + weight)``)."""
    return (same_code(type(module).forward, _llama().LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def is_llama_mlp(module) -> bool:
    """Llama's MLP ``down(silu(gate(x)) * up(x))`` with transformers' SiLUActivation or torch's nn.SiLU."""
    from transformers.activations import SiLUActivation

    return (same_code(type(module).forward, _llama().LlamaMLP.forward)
            and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)
            and all(isinstance(getattr(module, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj")))


@functools.lru_cache(maxsize=None)
def _attention_forms() -> tuple:
    """(forward, sliding window of a module) for the attention code written out here: Llama's, and Qwen2's and Mistral's
    (Llama's plus a ``sliding_window`` argument, from the module or from the config)."""
    forms = [(_llama().LlamaAttention.forward, lambda m: None)]
    try:
        from transformers.models.mistral.modeling_mistral import MistralAttention
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

        forms += [(Qwen2Attention.forward, lambda m: m.sliding_window),
                  (MistralAttention.forward, lambda m: getattr(m.config, "sliding_window", None))]
    except ImportError:
        pass
    return tuple(forms)


def attention_window(module):
    """For an attention module whose code is written out here: a function giving its sliding window. Else None."""
    if not all(isinstance(getattr(module, k, None), nn.Module) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    for forward, window in _attention_forms():
        if same_code(type(module).forward, forward):
            return window
    return None


# ---------------------------------------------------------------- the parts


def attention(attn: nn.Module, window, source, position_embeddings, attention_mask, **kwargs) -> torch.Tensor:
    """Llama's attention (LlamaAttention.forward, training and evaluation: no cache) on the input ``source`` gives: the
    hidden states, or ``RMSNormOf`` the layer's input when the norm before the attention is computed by the q/k/v
    projections. (B, T, hidden) -> (B, T, hidden)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(attn).__module__]
    x = source.x0 if isinstance(source, RMSNormOf) else source
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = (t.view(shape).transpose(1, 2) for t in project(source, [attn.q_proj, attn.k_proj, attn.v_proj]))
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin, original=modeling.apply_rotary_pos_emb)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, modeling.eager_attention_forward)
    sliding = window(attn)
    extra = {"sliding_window": sliding} if sliding is not None else {}
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                       scaling=attn.scaling, **extra, **kwargs)
    out = out.reshape(*x.shape[:-1], -1).contiguous()
    return project(out, [attn.o_proj])[0]


def mlp(module: nn.Module, source) -> torch.Tensor:
    """Llama's MLP down(silu(gate(x)) * up(x)) on the input ``source`` gives (a tensor, or ``RMSNormOf``)."""
    gate, up = project(source, [module.gate_proj, module.up_proj])
    return project(SwiGLUOf(gate, up), [module.down_proj])[0]


def _norm_source(norm: nn.Module, x: torch.Tensor, fused: bool):
    """What the layer's next part reads: ``RMSNormOf`` x (computed inside that part's projections), or the output of
    the model's own norm module."""
    return RMSNormOf(x, norm.weight, float(norm.variance_epsilon)) if fused else norm(x)


def _as_tensor(source) -> torch.Tensor:
    return rms_norm(source.x0, source.weight, source.eps) if isinstance(source, RMSNormOf) else source


# ---------------------------------------------------------------- the decoder layer


@dataclass(frozen=True)
class LayerPlan:
    """Which parts of one decoder layer run the code written out here (decided once, when the kernels are applied)."""
    norms: bool  # both RMSNorms are Llama's
    attention: object  # the attention's sliding-window function (``attention_window``), or None: the model's module
    mlp: bool


def decoder_layer(layer: nn.Module, plan: LayerPlan, hidden_states, attention_mask=None, position_ids=None,
                  past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward, written out (see the module docstring). (B, T, hidden) -> (B, T, hidden)."""
    if past_key_values is not None or kwargs.get("output_attentions"):  # generation, attention maps: the model's code
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
    residual = hidden_states
    source = _norm_source(layer.input_layernorm, hidden_states, plan.norms)
    if plan.attention is not None:
        hidden_states = attention(layer.self_attn, plan.attention, source, position_embeddings, attention_mask, **kwargs)
    else:
        hidden_states, _ = layer.self_attn(hidden_states=_as_tensor(source), attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=None, use_cache=use_cache,
                                           position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = hidden_states
    source = _norm_source(layer.post_attention_layernorm, hidden_states, plan.norms)
    hidden_states = mlp(layer.mlp, source) if plan.mlp else layer.mlp(_as_tensor(source))
    return residual + hidden_states


# ---------------------------------------------------------------- applying it


def _norm_forward(norm, hidden_states):
    return rms_norm(hidden_states, norm.weight, float(norm.variance_epsilon))


def _attention_forward(attn, window, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    if past_key_values is not None or kwargs.get("output_attentions"):
        return type(attn).forward(attn, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    return attention(attn, window, hidden_states, position_embeddings, attention_mask, **kwargs), None


def _mlp_forward(module, x):
    return mlp(module, x)


def fuse_blocks(model: nn.Module) -> dict[str, int]:
    """Route ``model``'s Llama-formula code through the kernels: each decoder layer whose code is Llama's runs
    ``decoder_layer``; in layers that do not, the norms, attention and MLPs that are Llama's run their kernels alone;
    so does every other Llama RMSNorm (the final norm). Returns how many of each it took; not applied twice."""
    llama = _llama()
    counts = {"layers": 0, "attention": 0, "mlp": 0, "rmsnorm": 0}
    done: set[int] = set()
    for module in model.modules():
        ours = vars(module).get("forward")
        if isinstance(ours, functools.partial) and ours.func is decoder_layer:  # applied before: leave it and its parts
            done.update(id(m) for m in module.modules())
        if "forward" in vars(module) or not same_code(type(module).forward, llama.LlamaDecoderLayer.forward):
            continue
        norms = all(is_llama_norm(getattr(module, k, None)) for k in ("input_layernorm", "post_attention_layernorm"))
        plan = LayerPlan(norms, attention_window(module.self_attn), is_llama_mlp(module.mlp))
        module.forward = functools.partial(decoder_layer, module, plan)
        counts["layers"] += 1
        counts["attention"] += plan.attention is not None
        counts["mlp"] += plan.mlp
        counts["rmsnorm"] += 2 * norms
        done.update(id(m) for m in module.modules())
    for module in model.modules():  # the Llama parts of layers that are not Llama's, and the final norm
        if id(module) in done or "forward" in vars(module):
            continue
        window = attention_window(module)
        if window is not None:
            module.forward = functools.partial(_attention_forward, module, window)
            counts["attention"] += 1
        elif is_llama_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
        elif is_llama_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rmsnorm"] += 1
    return counts
