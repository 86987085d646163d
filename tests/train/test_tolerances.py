"""The equality tests' tolerances are loose enough for every machine's rounding and tight enough to catch a bug.

testing.SCALED_RTOL lets two computations of a tensor differ by float rounding of the tensor's scale (fp32: 5e-5 of its
largest magnitude), so that the tests hold on every CPU's kernels. Here the kernels are broken one line at a time, each
as a plausible bug would (a scaling left out, the wrong member's scaling, a wrong power, a sign, an operand dropped, a
small bias), and the equality test that covers that line must then fail: a tolerance that let any of these through
would be too loose. The break is a textual edit of the module's source, executed in place of the module for the test.
"""

import importlib
import inspect
import sys
import types

import pytest
import torch
import test_kernels
import test_loss
import test_packing


def _broken(monkeypatch, module_name: str, old: str, new: str) -> None:
    """Replace ``old`` (found exactly once) by ``new`` in the module's source, execute it, and put every function and
    class it defines in place of the original's, in the module and wherever another module imported them."""
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    assert source.count(old) == 1, f"{old!r} is not one line of {module_name}"
    fresh = types.ModuleType(module_name)
    fresh.__dict__.update(__name__=module_name, __package__=module.__package__, __file__=module.__file__)
    exec(compile(source.replace(old, new), module.__file__, "exec"), fresh.__dict__)
    originals = {name: obj for name, obj in vars(module).items()
                 if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == module_name}
    for name, obj in originals.items():  # data types (RMSNormOf, PackedRow, ...) stay the ones callers construct
        if isinstance(obj, type) and not issubclass(obj, torch.autograd.Function):
            fresh.__dict__[name] = obj
    originals = {name: obj for name, obj in originals.items() if vars(fresh)[name] is not obj}
    for other in [m for n, m in sys.modules.items() if n.startswith("tunesmith.") and m is not None]:
        for name, value in list(vars(other).items()):
            for orig_name, orig in originals.items():
                if value is orig:
                    monkeypatch.setattr(other, name, vars(fresh)[orig_name])


P, O, L, K = ("tunesmith.train.kernels.projections", "tunesmith.train.kernels.ops", "tunesmith.train.loss",
              "tunesmith.train.packing")
lora_group = test_kernels.test_projections_of_a_lora_group_with_other_ranks_scalings_and_an_unused_output_equal_peft
norm_source = test_kernels.test_projections_of_a_norm_equal_the_norm_then_the_linears_and_keep_no_norm_output
whole = test_kernels.test_a_model_through_the_kernels_gives_the_plain_loss_and_gradients

BUGS = [  # (module, the line as it is, the line broken, the test that must catch it, its parameters)
    (P, "y_i.addmm_(xa[:, col:col + a_i.size(0)], b_i.t(), alpha=s)",
     "y_i.addmm_(xa[:, col:col + a_i.size(0)], b_i.t(), alpha=1.0)", lora_group, {}),  # scaling left out: forward,
    (P, "gx = gx.addmm_(g_xa, a_cat, alpha=s)", "gx = gx.addmm_(g_xa, a_cat)", whole,  # input gradient,
     {"method": "lora", "checkpointing": False}),
    (P, "            ga = ga.mul_(s)\n", "            ga = ga\n", whole,  # A gradients (alpha / r = 8 there)
     {"method": "lora", "checkpointing": False}),
    (P, "torch.mm(xa[:, c:c + r].t(), g).mul_(ctx.scalings[i]).t()",
     "torch.mm(xa[:, c:c + r].t(), g).mul_(ctx.scalings[0]).t()", lora_group, {}),  # another member's scaling
    (P, "x0.to(ctx.dtype)).mul_(w_norm)", "x0.to(ctx.dtype))", norm_source, {"method": "lora"}),  # a factor left out
    (P, "x2 = _normed(kept, ctx.dtype)", "x2 = _normed(kept, ctx.dtype) * 1.0001", norm_source,
     {"method": "full"}),  # a 1e-4 error in the recomputed norm output
    (O, "mul_(rstd.pow(3))", "mul_(rstd.pow(2))", whole, {"method": "full", "checkpointing": False}),  # a power
    (O, "gx[..., :h].addcmul_(g[..., h:], sin[..., h:])", "gx[..., :h].addcmul_(g[..., h:], sin[..., h:], value=-1.0)",
     whole, {"method": "lora", "checkpointing": False}),  # a sign in the rotary backward
    (O, "torch.ops.aten.silu_backward(g * up, gate)", "torch.ops.aten.silu_backward(g, gate)",
     whole, {"method": "lora", "checkpointing": True}),  # an operand dropped, under gradient checkpointing
    (P, "kept = (src[0], rstd, src[1])", "kept = (src[0], rstd * 1.0001, src[1])", whole,
     {"method": "freeze", "checkpointing": True}),  # a 1e-4 error in what the norm keeps
    (L, "g[rows, yc] -= 1.0", "g[rows, yc] -= 0.999",
     test_loss.test_fused_cross_entropy_matches_torch_over_chunks_with_bias, {}),  # the softmax gradient's one-hot
    (K, "scale=ctx.scale)", "scale=ctx.scale * 1.001)",
     test_packing.test_packed_attention_takes_the_cpu_kernel_path_and_the_sdpa_loop_with_dropout_or_kernels_off,
     {}),  # the attention backward's scale
]


@pytest.mark.parametrize("module,old,new,test,params", BUGS,
                         ids=[f"{b[0].rsplit('.', 1)[1]}:{b[2].strip()[:48]}" for b in BUGS])
def test_each_broken_line_fails_the_equality_test_that_covers_it(tok, monkeypatch, module, old, new, test, params):
    with monkeypatch.context() as mp:
        _broken(mp, module, old, new)
        fixtures = {"tok": tok, "monkeypatch": mp, **params}
        with pytest.raises(AssertionError):
            test(**{name: fixtures[name] for name in inspect.signature(test).parameters})
