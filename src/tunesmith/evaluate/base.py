"""The base model a tuned one is compared with: one path for the end-of-run comparison, `tunesmith eval`,
the safety probes and the release gate.

A LoRA model and the model it was tuned from are one set of weights: with PEFT's ``disable_adapter()`` the
PeftModel computes exactly what its base computes, so the base is never loaded a second time. Any other
base (a full or freeze run's, or a model named on the command line) is loaded in the dtype of the tuned
model's first parameter, on its device, and let go when the comparison ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Base:
    model: Any  # the base: the tuned model with its adapters off, or a loaded copy (None once the block ends)
    tokenizer: Any  # the loaded copy's own tokenizer; None for adapters off (the tuned model's tokenizer is its own)
    adapters_off: bool  # True: ``model`` is the tuned PeftModel inside ``disable_adapter()``


@contextmanager
def base_model(tuned, base_ref: str | Path | None, *, own_base: bool = True,
               trust_remote_code: bool = False) -> Iterator[Base]:
    """``with base_model(tuned, ref) as base:`` the base to compare ``tuned`` with, for the block only.

    ``base_ref`` is a model reference, a saved model folder or a run folder; ``own_base`` says it is the model
    ``tuned`` was tuned from. A PeftModel and its own base: ``tuned`` with its adapters disabled (``base_ref`` may
    be None), enabled again on exit. Otherwise ``base_ref`` is loaded (``models.load_for_inference``) in eval mode
    and dropped on exit: ``base.model`` is None after the block, so no reference keeps the weights alive.
    """
    from .. import models

    if own_base and models.is_peft(tuned):
        with tuned.disable_adapter():
            yield Base(tuned, None, adapters_off=True)
        return
    if base_ref is None:
        raise ValueError("base_model: no base to load (base_ref is None) and the tuned model is not a LoRA "
                         "model whose adapters could be switched off")
    first = next(tuned.parameters())
    model, tokenizer = models.load_for_inference(base_ref, dtype=first.dtype, device=first.device,
                                                 trust_remote_code=trust_remote_code)
    base = Base(model, tokenizer, adapters_off=False)
    del model
    try:
        yield base
    finally:
        base.model = base.tokenizer = None
        if first.device.type != "cpu":  # give the loaded copy's memory back to the device at once
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache(garbage_collection=True)
