"""Custom kernels: training steps that compute the same numbers as transformers and PEFT in fewer passes over memory
and less of it, behind a switch (``train.kernels``: ``auto`` uses them where they apply, ``off`` runs the plain
transformers/PEFT forward and autograd). Each has a test against the plain path; ``off`` is the reference the tests
and a training run compare them with (tests/train/test_kernels_switch.py).

- ``block.py``: Llama-formula decoder layers written out, calling the kernels below with explicit arguments;
- ``projections.py``: the Linears that read one input as one Function, LoRA inside the GEMMs, their input's norm or
  SwiGLU computed inside so that it need not be kept for backward;
- ``ops.py``: RMSNorm, the rotary embedding and SwiGLU in fewer passes;
- outside this package, used by the same switch: the output layer fused with the loss (``train/loss.py``) and the
  per-example attention of packed rows (``train/packing.py``).

Measured on the built-in model (bench/bench_train_vs_trl.py; README "Speed and memory" has the figures).
"""

from __future__ import annotations

from torch import nn

from ...models import base_model
from .block import fuse_blocks

KERNEL_SETTINGS = ("auto", "off")


def apply_kernels(model: nn.Module, setting: str = "auto") -> dict[str, int]:
    """With ``setting`` auto, route ``model``'s Llama-formula decoder layers, attention, MLPs and norms through the
    kernels (``block.fuse_blocks``); returns how many of each it took (nothing for "off": the model is left as it is).
    The loss and the packed attention take the same setting as an argument (``loss.token_loss(fused=...)``)."""
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"train.kernels: got {setting!r}; allowed: {', '.join(KERNEL_SETTINGS)}")
    if setting == "off":
        return {}
    return fuse_blocks(model)


def compile_blocks(model) -> int:
    """``torch.compile`` each transformer block in place (regional compilation); returns how many.

    The blocks are the classes the model names in ``_no_split_modules`` (its decoder layers): they share
    one code path, so inductor compiles once and reuses the kernels for every layer, and compiling in
    place keeps parameter names, the optimizer and checkpoints as they are. Shapes are dynamic because a
    packed row has a different length at every step. The per-example attention stays eager (a graph
    break); what compiles is the norms, rotary embedding, projections (LoRA included) and the MLP, whose
    elementwise work inductor fuses into fewer passes over memory. With train.kernels auto the blocks compiled
    are the kernels' (dynamo traces their autograd Functions; only the attention breaks the graph).
    """
    inner = base_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


__all__ = ["KERNEL_SETTINGS", "apply_kernels", "compile_blocks"]
