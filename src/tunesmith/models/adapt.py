"""Decide which parameters train: all (full), named parts (freeze), or LoRA adapters (PEFT).

Freezing is a plain function over parameter names. Names come from
``named_parameters(remove_duplicate=False)`` so a tied weight answers to both of its names
(SmolLM2's ``lm_head.weight`` is ``model.embed_tokens.weight``): selecting either trains the one
shared tensor, and we say so, because training "the head" then also changes the input embeddings.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..config import FreezeConfig, LoraConfig, MethodConfig
from .errors import ModelError, ModelWarning


@dataclass
class ParamCounts:
    """Trainable and total parameter counts; a tied tensor is counted once."""

    trainable: int
    total: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def adapt(model, method_cfg: MethodConfig):
    """Prepare ``model`` for ``method_cfg.name``; returns (model, ParamCounts). LoRA returns a PeftModel."""
    if method_cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method_cfg.name == "freeze":
        freeze_except(model, select_trainable(model, method_cfg.freeze))
    elif method_cfg.name == "lora":
        model = apply_lora(model, method_cfg.lora)
    else:
        raise ModelError(f"method.name: got {method_cfg.name!r}; allowed: lora, freeze, full")
    return model, count_params(model)


def base_model(model):
    """The transformers model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_params(model) -> ParamCounts:
    trainable, total, names = 0, 0, []
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied tensor appears once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            names.append(name)
    return ParamCounts(trainable, total, names)


# ---------------------------------------------------------------- freeze


def find_blocks(model) -> tuple[str, int]:
    """(qualified name, count) of the transformer blocks: the longest ModuleList of one module type.

    Generic over architectures: Llama/Qwen/Mistral ``model.layers``, GPT-2 ``transformer.h``, ...
    """
    best: tuple[str, int] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > best[1]:
                best = (name, len(mod))
    if best is None:
        raise ModelError(f"could not find the transformer blocks of this {type(model).__name__}: "
                         "use method.freeze.train_patterns to name the parameters to train")
    return best


def parse_layers(items: list[str], n_blocks: int, field_name: str = "method.freeze.train_layers") -> set[int]:
    """['0-3', '10'] -> {0, 1, 2, 3, 10}, checked against the model's block count."""
    out: set[int] = set()
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(item))
        if not m:
            raise ModelError(f"{field_name}: {item!r} is not a block index or range; write e.g. '10' or '0-3' "
                             "(use method.freeze.train_last_layers for the last N blocks)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise ModelError(f"{field_name}: range {item!r} runs backwards; write it as '{hi}-{lo}'")
        if hi >= n_blocks:
            raise ModelError(f"{field_name}: {item!r} is out of range: the model has {n_blocks} blocks, "
                             f"indices 0-{n_blocks - 1}")
        out.update(range(lo, hi + 1))
    return out


def select_trainable(model, cfg: FreezeConfig) -> set[str]:
    """Parameter names (any alias of a tied tensor) that the freeze settings select; errors if none."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    prefix, n_blocks = find_blocks(model)
    blocks = parse_layers(cfg.train_layers, n_blocks)
    if cfg.train_last_layers:
        if cfg.train_last_layers > n_blocks:
            raise ModelError(f"method.freeze.train_last_layers: got {cfg.train_last_layers}, but the model has "
                             f"{n_blocks} blocks (allowed 1-{n_blocks})")
        blocks.update(range(n_blocks - cfg.train_last_layers, n_blocks))
    selected = {n for n in names for i in blocks if n.startswith(f"{prefix}.{i}.")}
    for pattern in cfg.train_patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ModelError(f"method.freeze.train_patterns: {pattern!r} is not a valid regular expression: {e}") from None
        hit = {n for n in names if rx.search(n)}
        if not hit:
            examples = ", ".join(n for n in names if not n.startswith(f"{prefix}.")) or names[0]
            raise ModelError(f"method.freeze.train_patterns: {pattern!r} matches no parameter name; names outside "
                             f"the blocks are: {examples}; block parameters look like {names_in_block(names, prefix)}")
        selected |= hit
    if not selected:
        raise ModelError("method.freeze selects no parameter: set train_last_layers, train_layers or train_patterns")
    return selected


def names_in_block(names: list[str], prefix: str) -> str:
    return ", ".join(n for n in names if n.startswith(f"{prefix}.0."))


def freeze_except(model, selected: set[str]) -> None:
    """requires_grad only for tensors with a selected name; warn when a tied tensor was chosen by one name."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    for key, p in params.items():
        chosen = [n for n in aliases[key] if n in selected]
        p.requires_grad_(bool(chosen))
        if chosen and len(chosen) < len(aliases[key]):
            others = [n for n in aliases[key] if n not in chosen]
            warnings.warn(f"{chosen[0]} is tied to {', '.join(others)} (tie_word_embeddings): training it also "
                          "changes the tied tensor", ModelWarning, stacklevel=3)


# ---------------------------------------------------------------- LoRA


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with PEFT LoRA adapters: W0 x + (alpha / r) B A x (Hu et al., 2021, arXiv:2106.09685).

    use_dora: DoRA, magnitude and direction (Liu et al., 2024); use_rslora: scale alpha / sqrt(r)
    (Kalajdzievski, 2023). ``all-linear`` adapts every linear layer except the output head.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                              bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"method.lora.target_modules={cfg.target_modules!r}: {e}. "
                         f"Linear modules in this model: {', '.join(linear)} (or use 'all-linear')") from None
    base_trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if base_trainable:  # e.g. a tied head; PEFT should never leave base weights trainable
        raise ModelError(f"LoRA left base weights trainable ({', '.join(base_trainable[:3])}); "
                         "check method.lora.target_modules")
    return peft_model

