"""The kernels (train.kernels auto) compute what transformers and PEFT compute (train.kernels off).

- RMSNorm, the rotary embedding and SwiGLU against transformers' formulas; SwiGLU bit for bit;
- the projections that read one input, as one Function: a LoRA group of other ranks and scalings with an unused output,
  an RMSNorm or SwiGLU source computed inside (and not kept for backward), plain Linears, what they leave to PEFT;
- in bf16, the adapter's term is rounded into the sum once, so the forward sees small adapter terms;
- whole models: every method, gradient checkpointing, packed rows; the parts that are not Llama's run the model's code;
  generation with a cache runs the model's code; train.compile compiles the kernels.
Comparisons are at testing.SCALED_RTOL (float rounding of each tensor's scale) unless bit-exact is claimed.
"""

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_same, examples, lora_model, loss_and_grads, record_calls
from transformers.models.llama import modeling_llama as llama

from tunesmith.config import MethodConfig
from tunesmith.data import collate, collate_packed
from tunesmith.models import adapt, base_model
from tunesmith.testing import assert_close_scaled, scaled_error, tiny_model
from tunesmith.train.kernels import apply_kernels, compile_blocks
from tunesmith.train.kernels.block import LayerPlan, fuse_blocks
from tunesmith.train.kernels.ops import RMSNormFunction, SwiGLUFunction, rms_norm, rotary
from tunesmith.train.kernels.projections import Projections, RMSNormOf, SwiGLUOf, linear_params, project
from tunesmith.train.loss import token_loss
from tunesmith.train.packing import enable_packing
from tunesmith.train.steps import Compute
from tunesmith.train.steps import token_loss as step_loss

# ---------------------------------------------------------------- RMSNorm, rotary, SwiGLU


@pytest.mark.parametrize("weight_trains", [True, False])
def test_rmsnorm_function_equals_llama_rmsnorm_values_and_gradients(weight_trains):
    torch.manual_seed(0)
    norm = llama.LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_trains)
    x = (torch.randn(2, 7, 48) * 3).requires_grad_()
    g = torch.randn(2, 7, 48)
    ref = norm(x)
    ref.backward(g)
    ref_grads = x.grad.clone(), norm.weight.grad.clone() if weight_trains else None
    x.grad, norm.weight.grad = None, None
    out = RMSNormFunction.apply(x, norm.weight, 1e-5, torch.float32)
    out.backward(g)
    assert_close_scaled(out, ref)
    assert_close_scaled(x.grad, ref_grads[0])
    if weight_trains:
        assert_close_scaled(norm.weight.grad, ref_grads[1])
    else:
        assert norm.weight.grad is None


def test_rmsnorm_of_a_bf16_input_is_computed_in_fp32_and_rounded_once():
    """bf16 residuals (mixed precision): the norm is computed in fp32 as transformers' is, returned in bf16 once rounded
    (transformers rounds x^ to bf16 and multiplies by the bf16 weight: twice). Within bf16 rounding of fp32's."""
    torch.manual_seed(0)
    x32, w32 = torch.randn(5, 48) * 2, torch.rand(48) + 0.5
    ref = llama.LlamaRMSNorm(48, eps=1e-5)
    ref.weight.data = w32.clone()
    y = rms_norm(x32.bfloat16(), w32.bfloat16(), 1e-5)
    assert y.dtype == torch.bfloat16
    # three bf16 roundings (of x, of w, of y), each at most half a unit in the last place (2^-9) of its element
    assert_close_scaled(y.float(), ref(x32).detach(), rtol=3 * 2 ** -9)


def test_rotary_equals_transformers_in_fp32_and_bf16():
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    # HF's layout: (B, T, H, D) projections viewed as (B, H, T, D); cos/sin (B, T, D) from the rotary module
    q = torch.randn(1, 11, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 11, 2, 8).transpose(1, 2).requires_grad_()
    cos, sin = model.model.rotary_emb(q, torch.arange(11)[None])
    gq, gk = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8)
    ref = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.autograd.backward(ref, [gq, gk])
    ref_grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    out = rotary(q, k, cos, sin, llama.apply_rotary_pos_emb)
    torch.autograd.backward(out, [gq, gk])
    for a, b in zip(out, ref):
        assert_close_scaled(a, b)
    assert_close_scaled(q.grad, ref_grads[0])
    assert_close_scaled(k.grad, ref_grads[1])
    qb, kb = q.detach().bfloat16(), k.detach().bfloat16()  # bf16 q/k, fp32 cos/sin (an fp32 residual's rotary)
    for a, b in zip(rotary(qb, kb, cos, sin, llama.apply_rotary_pos_emb), ref):
        assert a.dtype == torch.bfloat16  # q/k rounded to bf16, then cos/sin, then the result: three roundings
        assert_close_scaled(a.float(), b.detach(), rtol=3 * 2 ** -9)


def test_rotary_of_another_shape_takes_the_models_own_function():
    calls = []
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos = sin = torch.randn(1, 3, 4)  # a partial rotary (half the head dimension): not Llama's
    rotary(q, k, cos, sin, lambda *a: calls.append(a) or (q, k))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_equals_autograd_bit_for_bit_and_keeps_two_tensors_not_three(dtype):
    g = torch.Generator().manual_seed(0)
    gate0, up0 = torch.randn(2, 7, 24, generator=g, dtype=dtype), torch.randn(2, 7, 24, generator=g, dtype=dtype)
    grad = torch.randn(2, 7, 24, generator=g, dtype=dtype)
    results = []
    for fused in (False, True):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = SwiGLUFunction.apply(gate, up) if fused else F.silu(gate) * up
        out.backward(grad)
        results.append((out, gate.grad, up.grad, saved))
    (out, d_gate, d_up, saved_plain), (fused_out, fused_d_gate, fused_d_up, saved_fused) = results
    assert torch.equal(fused_out, out) and torch.equal(fused_d_gate, d_gate) and torch.equal(fused_d_up, d_up)
    assert len(saved_plain) == 3 and len(saved_fused) == 2  # gate, up (autograd also keeps silu(gate))


# ---------------------------------------------------------------- projections


def _attention_group(tok, **lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], **lora)
    model = get_peft_model(tiny_model(tok, seed=4), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
    return base_model(model).model.layers[0].self_attn


def test_projections_of_a_lora_group_with_other_ranks_scalings_and_an_unused_output_equal_peft(tok):
    """Members of a group may differ in rank and scaling (PEFT's rank_pattern/alpha_pattern), and an output the model
    never reads gets no gradient through its adapter; outputs and gradients equal PEFT's forward + autograd."""
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        attn = _attention_group(tok, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
        xi = x.clone().requires_grad_(True)
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        q, k, _ = project(xi, mods) if fused else [m(xi) for m in mods]
        ((q ** 2).sum() + (k * 0.5).sum()).backward()  # v's output is never used
        results.append((q.detach(), k.detach(), xi.grad, {n: p.grad for n, p in attn.named_parameters()
                                                         if p.grad is not None}))
    (q0, k0, gx0, g0), (q1, k1, gx1, g1) = results
    assert_close_scaled(q1, q0)
    assert_close_scaled(k1, k0)
    assert_close_scaled(gx1, gx0)
    assert g1.keys() == g0.keys() and not any("v_proj" in n for n in g0)
    for n in g0:
        assert_close_scaled(g1[n], g0[n], msg=n)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_projections_of_a_norm_equal_the_norm_then_the_linears_and_keep_no_norm_output(tok, method):
    """q/k/v of an RMSNorm's output: the Function computes the norm itself and keeps, for backward, its input and 1/rms
    instead of its output; the gradients of the input, the norm weight (full fine-tuning) and every Linear parameter
    equal the norm module followed by the Linears (PEFT's under LoRA)."""
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3)) * 2
    results = []
    for fused in (False, True):
        model, _ = adapt(tiny_model(tok, seed=4), MethodConfig(name=method, lora={"r": 4, "dropout": 0.0}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        layer = base_model(model).model.layers[1]
        attn, norm = layer.self_attn, layer.input_layernorm
        with torch.no_grad():  # not all ones, as initialised: the weight must show where it is used
            norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(6))
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        xi = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if fused:
                outs = project(RMSNormOf(xi, norm.weight, norm.variance_epsilon), mods)
                normed = None
            else:
                normed = norm(xi)
                outs = [m(normed) for m in mods]
        sum((o * (i + 1)).square().sum() for i, o in enumerate(outs)).backward()
        if fused:  # no (tokens, hidden) tensor other than the input is kept
            assert not any(t.shape == x.shape and not (t is xi or t.data_ptr() == xi.data_ptr()) for t in saved)
        results.append(([o.detach() for o in outs], xi.grad, {n: p.grad for n, p in layer.named_parameters()
                                                             if p.grad is not None}))
    (o0, gx0, g0), (o1, gx1, g1) = results
    for a, b in zip(o1, o0):
        assert_close_scaled(a, b)
    assert_close_scaled(gx1, gx0)
    assert g1.keys() == g0.keys() and (method == "lora") == any("lora_A" in n for n in g0)
    assert (method == "full") == ("input_layernorm.weight" in g0)
    for n in g0:
        assert_close_scaled(g1[n], g0[n], msg=n)


def test_the_down_projection_of_swiglu_keeps_gate_and_up_not_the_product_bit_for_bit(tok):
    """The MLP's down projection reads silu(gate) * up: the Function computes the product, keeps gate and up for backward
    and computes the product again for its A gradient (silu(gate) once, for that and for the SwiGLU backward). No
    product is kept, and every gradient is bit for bit SwiGLUFunction's followed by the projection of a kept product."""
    mlp = base_model(lora_model(tok)).model.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    gate0, up0 = torch.randn(1, 9, 64, generator=g), torch.randn(1, 9, 64, generator=g)
    grad = torch.randn(1, 9, 32, generator=g)
    results = []
    for recompute in (False, True):
        mlp.zero_grad(set_to_none=True)
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if recompute:
                out = project(SwiGLUOf(gate, up), [mlp.down_proj])[0]
            else:
                product = SwiGLUFunction.apply(gate, up)
                out = project(product, [mlp.down_proj])[0]
        out.backward(grad)
        kept = {t.data_ptr() for t in saved}
        assert (product.data_ptr() in kept) if not recompute else len([t for t in saved if t.shape == gate.shape]) == 2
        results.append((out.detach(), gate.grad, up.grad,
                        {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}))
    (o0, dg0, du0, g0), (o1, dg1, du1, g1) = results
    assert torch.equal(o1, o0) and torch.equal(dg1, dg0) and torch.equal(du1, du0)
    assert g1.keys() == g0.keys() and any("down_proj.lora_A" in n for n in g0)
    assert all(torch.equal(g1[n], g0[n]) for n in g0)


def test_projections_of_plain_linears_with_bias_train_weight_and_bias():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)]
    x = torch.randn(3, 5, 16)
    results = []
    for fused in (False, True):
        for lin in lins:
            lin.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        outs = project(xi, lins) if fused else [lin(xi) for lin in lins]
        (outs[0].sum() * 2 + outs[1].square().sum()).backward()
        results.append(([o.detach() for o in outs], xi.grad, [t.grad for lin in lins for t in (lin.weight, lin.bias)]))
    for a, b in zip(results[1][0] + [results[1][1]] + results[1][2], results[0][0] + [results[0][1]] + results[0][2]):
        assert_close_scaled(a, b)


def test_what_the_function_does_not_compute_runs_its_own_forward(tok, monkeypatch):
    """Dropout on the adapter input, DoRA: PEFT's own forward (the norm then computed alone); adapters switched off
    (PEFT's disable_adapter) or merged: the base Linear alone, through the Function."""
    calls = record_calls(monkeypatch, Projections)
    dropout = base_model(lora_model(tok, dropout=0.1)).model.layers[0].self_attn
    assert linear_params(dropout.q_proj) is None
    x = torch.randn(1, 4, 32)
    norm = llama.LlamaRMSNorm(32)
    outs = project(RMSNormOf(x, norm.weight, norm.variance_epsilon), [dropout.q_proj, dropout.k_proj])
    assert calls == [] and len(outs) == 2
    dora = base_model(lora_model(tok, use_dora=True)).model.layers[0].self_attn
    assert linear_params(dora.q_proj) is None

    model = lora_model(tok)
    attn = base_model(model).model.layers[0].self_attn
    with model.disable_adapter():
        params = linear_params(attn.q_proj)
        assert params.lora_a is None and params.weight is attn.q_proj.base_layer.weight
        assert_close_scaled(project(x, [attn.q_proj])[0], attn.q_proj.base_layer(x))
    assert linear_params(attn.q_proj).lora_a is not None


def test_in_bf16_a_small_adapter_term_is_rounded_into_the_sum_once():
    """x W^T rounded to bf16 lands on the bf16 grid, and an adapter term below half a unit in the last place added to
    it would round away every time: the forward would not see what the adapters learned. The Function rounds
    x W^T + s (x A^T) B^T once, so on average the output moves by the adapter's term."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False).bfloat16()
    lin.weight.data = torch.randn(64, 64, generator=g).bfloat16()
    x = torch.randn(256, 64, generator=g).bfloat16()
    a = torch.randn(4, 64, generator=g) * 0.01
    b = torch.randn(64, 4, generator=g) * 0.01  # s (x A^T) B^T ~ 1e-3 of x W^T: under bf16's half unit (2^-9)
    base = (x @ lin.weight.t()).float()
    term = (x.float() @ a.t() @ b.t()) * 2.0
    # the arguments: the source ("x": the input itself), the products' dtype, eps, scalings, x, then W, b, A, B
    y = Projections.apply("x", torch.bfloat16, 0.0, (2.0,), x, lin.weight, None, a, b)[0].float()
    separate = (x @ lin.weight.t() + term.bfloat16()).float()  # rounded apart, as PEFT's sum is
    moved, wanted, lost = (y - base), term, (separate - base)
    assert float((moved * wanted).sum() / wanted.square().sum()) == pytest.approx(1.0, abs=0.1)
    assert abs(float((lost * wanted).sum() / wanted.square().sum())) < 0.5  # rounded apart: most of it is lost


def test_projections_under_bf16_autocast_return_parameter_gradients_in_their_dtypes(tok):
    """bf16 mixed precision: a frozen bf16 base and fp32 adapters, products in bf16; the adapters' gradients are fp32
    and within bf16 rounding of the fp32 computation's."""
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    results = []
    for bf16 in (False, True):
        attn = _attention_group(tok)
        if bf16:
            for p in attn.parameters():
                if not p.requires_grad:
                    p.data = p.data.bfloat16()
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        xi = (x.bfloat16() if bf16 else x).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = project(xi, mods)
        sum(o.float().square().sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}, xi.grad))
    (o32, g32, gx32), (o16, g16, gx16) = results
    assert all(o.dtype == torch.bfloat16 for o in o16) and gx16.dtype == torch.bfloat16
    assert g16.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g16.values())
    for a, b in zip(o16, o32):
        assert_close_scaled(a.float(), b.detach(), rtol=2e-2)
    for n in g32:
        assert_close_scaled(g16[n], g32[n], rtol=5e-2, msg=n)


# ---------------------------------------------------------------- whole models


def _built(tok, method, kernels, checkpointing=False, seed=3):
    model, _ = adapt(tiny_model(tok, seed=seed), MethodConfig(name=method, lora={"r": 4, "dropout": 0.0},
                                                             freeze={"train_last_layers": 1}))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=g)
        elif "norm" in name:  # not all ones, as initialised: a norm weight used in the wrong place must show
            with torch.no_grad():
                p.uniform_(0.5, 1.5, generator=g)
    enable_packing(model)
    taken = apply_kernels(model, kernels)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, taken


@pytest.mark.parametrize("method,checkpointing", [("full", False), ("lora", False), ("lora", True), ("freeze", True)])
def test_a_model_through_the_kernels_gives_the_plain_loss_and_gradients(tok, method, checkpointing):
    """The whole training forward/backward (packed rows, the fused head) with train.kernels auto against off; with
    gradient checkpointing the recomputation in backward runs the kernels again."""
    batch = collate_packed(examples(tok, [9, 14, 6]))
    fused, taken = _built(tok, method, "auto", checkpointing)
    plain, none = _built(tok, method, "off", checkpointing)
    assert taken == {"layers": 2, "attention": 2, "mlp": 2, "rmsnorm": 5} and none == {}  # 2 per layer + the final norm
    assert all("forward" not in vars(m) for m in plain.modules())
    assert_same(loss_and_grads(fused, token_loss, batch),
                loss_and_grads(plain, lambda m, b: token_loss(m, b, fused=False), batch))


def test_bf16_mixed_through_the_kernels_trains_the_adapters_fp32_would(tok):
    """A LoRA model with its base in bf16 and products in bf16 (model.dtype bf16-mixed), through the kernels and through
    PEFT under autocast, against the fp32 model: the loss within bf16 rounding, the adapters' gradients pointing the
    same way (cosine; elementwise the tiny random model's gradients are sums of large cancelling terms, 10-25% off in
    bf16 either way). The built-in model's: tests/train/test_train_real_model.py."""
    batch = collate_packed(examples(tok, [30, 40, 25, 33], prompt_frac=0.3))
    ref = loss_and_grads(_built(tok, "lora", "auto")[0], token_loss, batch)
    flat = torch.cat([g.flatten() for g in ref[3].values()])
    for kernels in ("auto", "off"):
        model, _ = _built(tok, "lora", kernels)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
        loss, n, _, grads = loss_and_grads(model, lambda m, b: step_loss(m, b, Compute(kernels == "auto",
                                                                                      torch.bfloat16)), batch)
        assert n == ref[1] and grads.keys() == ref[3].keys() and all(g.dtype == torch.float32 for g in grads.values())
        assert_close_scaled(torch.tensor(loss), torch.tensor(ref[0]), rtol=1e-2)
        cos = F.cosine_similarity(torch.cat([grads[k].flatten() for k in ref[3]]), flat, dim=0)
        assert cos > 0.98, (kernels, float(cos))  # measured: 0.995 (kernels), 0.998 (PEFT)


def _phi3(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


def _gemma(tok):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                        hidden_act="silu"))


def _qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


@pytest.mark.parametrize("build,plan", [
    (_phi3, LayerPlan(norms=True, attention=None, mlp=False)),  # fused gate_up_proj, its own attention
    (_gemma, LayerPlan(norms=False, attention="llama", mlp=True)),  # its norm scales by 1 + weight
    (_qwen2, LayerPlan(norms=True, attention="qwen2", mlp=True)),  # Llama's attention with a sliding window
])
def test_only_the_llama_parts_of_other_models_run_the_kernels(tok, build, plan):
    batch = collate_packed(examples(tok, [7, 11]))
    fused, plain = build(tok), build(tok)
    for m in (fused, plain):
        m, _ = adapt(m, MethodConfig(name="full"))
        enable_packing(m)
    fuse_blocks(fused)
    layer = fused.model.layers[0]
    got = layer.forward.args[1]
    assert (got.norms, got.mlp, got.attention is not None) == (plan.norms, plan.mlp, plan.attention is not None)
    assert_same(loss_and_grads(fused, token_loss, batch),
                loss_and_grads(plain, lambda m, b: token_loss(m, b, fused=False), batch))


def test_a_gelu_mlp_and_a_non_llama_layer_keep_their_own_code(tok):
    model = tiny_model(tok)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    fuse_blocks(model)
    assert not model.model.layers[0].forward.args[1].mlp
    assert fuse_blocks(model) == {"layers": 0, "attention": 0, "mlp": 0, "rmsnorm": 0}  # not applied twice


def test_generation_with_a_cache_runs_the_models_own_code_and_answers_the_same(tok):
    from tunesmith.evaluate import generate_batch

    plain, fused = lora_model(tok), lora_model(tok)
    apply_kernels(fused)
    convs = [[{"role": "user", "content": "the quick brown fox"}], [{"role": "user", "content": "hello"}]]
    assert generate_batch(fused, tok, convs, max_new_tokens=8) == generate_batch(plain, tok, convs, max_new_tokens=8)


def test_compiled_blocks_give_the_eager_loss_and_gradients_on_packed_rows(tok):
    """train.compile: each decoder layer through inductor, the kernels traced, the per-example attention left eager; two
    packed rows of different lengths (dynamic shapes, no recompile per length)."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (train.compile refuses with C009 without one)")
    eager, compiled = lora_model(tok), lora_model(tok)
    for m in (eager, compiled):
        enable_packing(m)
        apply_kernels(m)
    assert compile_blocks(compiled) == 2
    from torch._dynamo.utils import counters

    counters.clear()
    for lengths in ([9, 14, 6], [11, 5, 8, 7]):
        batch = collate_packed(examples(tok, lengths))
        assert_same(loss_and_grads(compiled, token_loss, batch), loss_and_grads(eager, token_loss, batch))
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile (forward graphs before/after the attention)


def test_padded_batches_run_the_kernels_with_sdpa_masks(tok):
    batch = collate(examples(tok, [9, 14, 6]), tok.pad_token_id)
    fused, _ = _built(tok, "lora", "auto")
    plain, _ = _built(tok, "lora", "off")
    assert_same(loss_and_grads(fused, token_loss, batch),
                loss_and_grads(plain, lambda m, b: token_loss(m, b, fused=False), batch))


# ---------------------------------------------------------------- the switch, end to end


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_with_kernels_auto_and_off_gives_the_same_losses_and_weights(tmp_path, tiny_model_dir, tiny_data,
                                                                              method):
    """train.kernels off is the plain transformers/PEFT computation: four steps each way reach the same per-step losses
    and final weights, to float rounding (SCALED_RTOL; measured here: losses within 2e-7, weights within 9e-6 of
    their largest magnitude)."""
    import json

    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.train import train

    train_f, valid_f = tiny_data
    runs = {}
    for kernels in ("auto", "off"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                                 f"output_dir={tmp_path / kernels}", "data.max_length=64", "train.batch_size=4",
                                 "train.max_steps=4", "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=4",
                                 "eval.samples=0", "eval.metric_examples=0", "eval.compare_base=false",
                                 f"method.name={method}", "method.lora.r=4", "method.lora.dropout=0.0",
                                 "model.dtype=float32", f"train.kernels={kernels}"])
        res = train(cfg, quiet=True)
        events = [json.loads(line) for line in open(res.output_dir / "metrics.jsonl")]
        weights = {k: v for f in (res.output_dir / "best").glob("*.safetensors") for k, v in load_file(f).items()}
        runs[kernels] = ([e["loss"] for e in events if e["kind"] == "train"], weights)
        messages = [e["text"] for e in events if e["kind"] == "message"]
        assert any(m.startswith("train.kernels: 2 layers") for m in messages) == (kernels == "auto")
    (loss_a, w_a), (loss_b, w_b) = runs["auto"], runs["off"]
    assert len(loss_a) == 4
    assert_close_scaled(torch.tensor(loss_a), torch.tensor(loss_b))
    assert w_a.keys() == w_b.keys() and w_a
    for k in w_a:
        assert_close_scaled(w_a[k], w_b[k], msg=k)
