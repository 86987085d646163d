"""The benchmark's model FLOP utilisation counts the work a training step does, no more.

bench/train_workers.model_flops is the numerator of the MFU that bench_train_vs_trl.py reports. Here it is held to
the matrix products one packed training step actually runs (loss, forward and backward, through tunesmith's own
fast paths), as torch's FlopCounterMode counts them, for LoRA and full fine-tuning. The attention is left out of
both sides: the counter has no formula for the CPU flash kernel, and the count's causal attention term is a
convention (half of the L x L products), not something a counter can check.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tunesmith.config import MethodConfig
from tunesmith.data import IGNORE, RenderedExample, collate_packed
from tunesmith.models import adapt, base_model
from tunesmith.testing import tiny_model, tiny_tokenizer
from tunesmith.train.kernels import apply_kernels
from tunesmith.train.loss import token_loss
from tunesmith.train.packing import enable_packing


def _train_workers():
    """bench/train_workers.py as a module, without the environment defaults it sets for its own process."""
    path = Path(__file__).resolve().parents[1] / "bench" / "train_workers.py"
    spec = importlib.util.spec_from_file_location("bench_train_workers", path)
    module = importlib.util.module_from_spec(spec)
    environ, path_before = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(path.parent))  # it imports bench/harness.py, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path_before
    return module


def _addmm_inplace_flops(_self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_flops_equal_the_matrix_products_a_step_runs(method):
    tok = tiny_tokenizer()
    model = tiny_model(tok, layers=3, hidden=64, heads=4)  # GQA: 2 key/value heads
    r = 8
    cfg = (MethodConfig(name="lora", lora={"r": r, "alpha": 16, "dropout": 0.0}) if method == "lora"
           else MethodConfig(name="full"))
    model, _ = adapt(model, cfg)
    apply_kernels(model)
    assert enable_packing(model)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((9, 4), (14, 9), (6, 2)):  # the first tokens of each are prompt (no loss)
        ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
        examples.append(RenderedExample(ids, [IGNORE] * prompt + ids[prompt:], origin=None))

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}) as counter:
        loss, _, _ = token_loss(model, collate_packed(examples))
        loss.backward()
    ran = counter.get_total_flops()

    config, workers = base_model(model).config, _train_workers()
    lengths = [len(e.input_ids) for e in examples]
    attention = sum(workers.attention_flops(config, n) for n in lengths)
    counted = (workers.model_flops(config, lengths, [e.n_targets for e in examples], method, r=r)
               - 3 * attention)  # attention: forward + twice that backward
    assert ran > 0 and counted == ran
