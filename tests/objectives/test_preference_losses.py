"""Preference losses against the papers' formulas written out in plain Python (math, float64, one pair at a
time), against TRL's own loss code on the same numbers, and a few invariants (ln 2 at the start, the DPO
gradient, eps = 0, the hinge's zero region, sums that add over a split batch)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from tunesmith.objectives.preference_losses import (
    PreferenceLoss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_loss,
    rpo_term,
    simpo_loss,
)

# fp32 inputs up to ~1e4: h = differences of such numbers carries ~1e-5 absolute rounding
TOL = dict(rtol=1e-5, atol=1e-4)


# ---- the papers' formulas, one pair at a time -------------------------------------------------------------

def logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(logsigmoid(z))


def math_dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0, nc=None, nr=None) -> float:
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # Rafailov et al.; cDPO (Mitchell) when eps > 0
        return -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    if loss_type == "robust":  # Chowdhury et al.
        return ((1 - eps) * -logsigmoid(beta * h) - eps * -logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":  # SLiC
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":  # Azar et al., TRL's length-averaged log-ratios
        h_avg = (pc - rc) / nc - (pr - rr) / nr
        return (h_avg - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def math_log_odds(l_c: float, l_r: float) -> float:
    """log(p/(1-p)) of chosen minus rejected, p = exp(mean log-prob): log p - log(1 - p)."""
    return (l_c - math.log(-math.expm1(l_c))) - (l_r - math.log(-math.expm1(l_r)))


def math_orpo(pc, pr, nc, nr, beta) -> float:
    l_c, l_r = pc / nc, pr / nr
    p_c, p_r = math.exp(l_c), math.exp(l_r)
    log_odds = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
    return -l_c - beta * logsigmoid(log_odds)


def math_simpo(pc, pr, nc, nr, beta, gamma) -> float:
    return -logsigmoid(beta * (pc / nc - pr / nr) - gamma)


def math_kto(p, r, desirable, z0, beta, w_d, w_u) -> float:
    z0 = max(z0, 0.0)
    return w_d * (1 - sigmoid(beta * ((p - r) - z0))) if desirable else w_u * (1 - sigmoid(beta * (z0 - (p - r))))


def pairs(seed: int, n: int = 64, scale: float = 5.0):
    """fp32 summed log-probs (negative), policy = reference + noise * scale, and token counts 1..300."""
    g = torch.Generator().manual_seed(seed)
    rc, rr = -torch.rand(n, generator=g) * 400 - 1, -torch.rand(n, generator=g) * 400 - 1
    pc = (rc + torch.randn(n, generator=g) * scale).clamp(max=0)
    pr = (rr + torch.randn(n, generator=g) * scale).clamp(max=0)
    nc, nr = torch.randint(1, 300, (n,), generator=g), torch.randint(1, 300, (n,), generator=g)
    return pc, pr, rc, rr, nc, nr


def mean_logps_below_zero(seed: int, tokens: torch.Tensor, low: float) -> torch.Tensor:
    """Summed log-probs whose per-token mean lies in (low, 0): ORPO's p = exp(mean) strictly below 1."""
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(len(tokens), generator=g) * tokens * -low - 1e-3


def noise(seed: int, n: int = 64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def expect(fn, *columns) -> torch.Tensor:
    """fn applied pair by pair to the python floats of the fp32 columns."""
    return torch.tensor([fn(*row) for row in zip(*(c.tolist() for c in columns))], dtype=torch.float64)


# ---- each loss equals its formula ---------------------------------------------------------------------

@pytest.mark.parametrize("scale", [5.0, 1e4], ids=["moderate", "extreme"])
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_losses_equal_the_formulas(loss_type, eps, beta, scale):
    pc, pr, rc, rr, nc, nr = pairs(0, scale=scale)
    out = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, chosen_tokens=nc, rejected_tokens=nr)
    want = expect(lambda *r: math_dpo(*r[:4], beta, loss_type, eps, *r[4:]), pc, pr, rc, rr, nc, nr)
    assert torch.isfinite(out.losses).all()
    torch.testing.assert_close(out.losses.double(), want, **TOL)
    torch.testing.assert_close(out.chosen_rewards.double(), expect(lambda p, r: beta * (p - r), pc, rc), **TOL)
    torch.testing.assert_close(out.rejected_rewards.double(), expect(lambda p, r: beta * (p - r), pr, rr), **TOL)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    _, _, rc, rr, _, _ = pairs(1)
    out = dpo_loss(rc.clone(), rr.clone(), rc, rr, beta=0.1)
    assert torch.equal(out.losses, torch.full_like(rc, math.log(2)))
    assert torch.equal(out.chosen_rewards, torch.zeros_like(rc))
    assert torch.equal(out.rejected_rewards, torch.zeros_like(rc))
    assert out.stats()["rewards/accuracy"] == 0  # a tie is not a win


def test_dpo_gradient_is_minus_beta_sigmoid_minus_beta_h():
    pc, pr, rc, rr, _, _ = pairs(2, scale=20.0)
    beta = 0.3
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta).losses.sum().backward()
    h = (pc.detach() - rc) - (pr.detach() - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * h))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * h))


def test_robust_with_eps_zero_is_sigmoid_and_hinge_is_zero_past_the_margin():
    pc, pr, rc, rr, _, _ = pairs(3, scale=50.0)
    assert torch.equal(dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.0).losses, dpo_loss(pc, pr, rc, rr, 0.1).losses)
    h = torch.tensor([2.0, 3.0, 200.0, 1.0, 0.0, -4.0])  # beta h = 1, 1.5, 100 | 0.5, 0, -2
    zeros = torch.zeros_like(h)
    hinge = dpo_loss(h, zeros, zeros, zeros, beta=0.5, loss_type="hinge").losses
    assert torch.equal(hinge[:3], zeros[:3])
    assert torch.equal(hinge[3:], torch.tensor([0.5, 1.0, 3.0]))


def test_dpo_refuses_what_it_cannot_honour():
    pc, pr, rc, rr, _, _ = pairs(4, n=4)
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        dpo_loss(pc, pr, rc, rr, 0.1, "ipo")
    with pytest.raises(ValueError, match="not one of sigmoid, robust, hinge, ipo"):
        dpo_loss(pc, pr, rc, rr, 0.1, "kto_pair")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.5)
    with pytest.raises(ValueError, match="sigmoid .cDPO. and robust only"):
        dpo_loss(pc, pr, rc, rr, 0.1, "hinge", 0.1)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr[:3], rc, rr, 0.1)


def test_log1mexp_near_zero_and_near_minus_infinity():
    xs = [-2e-38, -1e-30, -1e-12, -1e-9, -2.9e-8, -1e-7, -1e-3, -0.6931, -0.6932, -1.0, -20.0, -88.0, -104.0,
          -1e4]
    x = torch.tensor(xs, requires_grad=True)
    y = log1mexp(x)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-30)
    y.sum().backward()  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    want_grad = torch.tensor([-math.exp(v) / -math.expm1(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-30)
    edges = torch.tensor([0.0, -1e-45, -1e-38, -float("inf")], requires_grad=True)  # p = 1; below -tiny; p = 0
    out = log1mexp(edges)
    out.sum().backward()
    assert torch.isfinite(out[:3]).all() and out[3] == 0 and torch.isfinite(edges.grad).all()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_the_formula(beta):
    _, _, _, _, nc, nr = pairs(5)
    pc, pr = mean_logps_below_zero(50, nc, -3.0), mean_logps_below_zero(51, nr, -3.0)
    out = orpo_loss(pc, pr, nc, nr, beta)
    torch.testing.assert_close(out.losses.double(), expect(lambda *r: math_orpo(*r, beta), pc, pr, nc, nr), **TOL)
    torch.testing.assert_close(out.chosen_rewards.double(), expect(lambda p, n: beta * p / n, pc, nc), **TOL)


def test_orpo_is_finite_with_probabilities_near_one_and_near_zero():
    means = [-1e-20, -1e-9, -1e-6, -0.5, -30.0, -80.0, -1e3]
    l_c = torch.tensor([a for a in means for _ in means], requires_grad=True)
    l_r = torch.tensor([b for _ in means for b in means], requires_grad=True)
    ones = torch.ones_like(l_c)
    out = orpo_loss(l_c, l_r, ones, ones, beta=0.1)
    want = [-a - 0.1 * logsigmoid(math_log_odds(a, b)) for a, b in zip(l_c.tolist(), l_r.tolist())]
    torch.testing.assert_close(out.losses.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    out.losses.sum().backward()
    assert torch.isfinite(l_c.grad).all() and torch.isfinite(l_r.grad).all()


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0), (10.0, 5.0)])
def test_simpo_equals_the_formula(beta, gamma):
    pc, pr, _, _, nc, nr = pairs(6, scale=1e4)
    out = simpo_loss(pc, pr, nc, nr, beta, gamma)
    assert torch.isfinite(out.losses).all()
    want = expect(lambda *r: math_simpo(*r, beta, gamma), pc, pr, nc, nr)
    torch.testing.assert_close(out.losses.double(), want, **TOL)
    torch.testing.assert_close(out.rejected_rewards.double(), expect(lambda p, n: beta * p / n, pr, nr), **TOL)


@pytest.mark.parametrize("kl_shift", [0.7, -0.7], ids=["kl>0", "kl<0 clamped"])
@pytest.mark.parametrize("scale", [5.0, 1e4], ids=["moderate", "extreme"])
def test_kto_equals_the_formula(kl_shift, scale):
    pc, _, rc, _, _, _ = pairs(7, scale=scale)
    desirable = torch.arange(64) % 3 != 0
    mismatched_ref = rc.flip(0)
    mismatched_policy = mismatched_ref + kl_shift + noise(70) * 0.1
    kl = kto_kl_estimate(mismatched_policy, mismatched_ref)
    want_kl = max(0.0, sum(a - b for a, b in zip(mismatched_policy.tolist(), mismatched_ref.tolist())) / 64)
    assert kl.shape == () and not kl.requires_grad
    assert kl.item() == pytest.approx(want_kl, abs=1e-4)
    out = kto_loss(pc, rc, desirable, kl, beta=0.1, desirable_weight=1.33, undesirable_weight=0.8)
    want = expect(lambda p, r, d: math_kto(p, r, d, kl.item(), 0.1, 1.33, 0.8), pc, rc, desirable)
    torch.testing.assert_close(out.losses.double(), want, **TOL)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc)[desirable])
    torch.testing.assert_close(out.rejected_rewards, 0.1 * (pc - rc)[~desirable])


def test_kto_refuses_a_non_bool_label():
    pc, _, rc, _, _, _ = pairs(8, n=4)
    with pytest.raises(ValueError, match="bool tensor"):
        kto_loss(pc, rc, torch.tensor([1, 0, 1, 0]), torch.tensor(0.0), 0.1)


def test_rpo_term_is_the_length_averaged_nll_of_chosen():
    pc, _, _, _, nc, _ = pairs(9)
    torch.testing.assert_close(rpo_term(pc, nc).double(), expect(lambda p, n: -p / n, pc, nc), **TOL)


# ---- statistics are sums that add over a split batch --------------------------------------------------

def _assert_stats_add(full: PreferenceLoss, a: PreferenceLoss, b: PreferenceLoss):
    s, sa, sb = full.stats(), a.stats(), b.stats()
    assert s.keys() == sa.keys() == sb.keys()
    for k in s:
        assert s[k] == pytest.approx(sa[k] + sb[k], rel=1e-6, abs=1e-6), k


def test_stats_are_sums_that_add_across_a_split_batch():
    pc, pr, rc, rr, nc, nr = pairs(10, scale=20.0)
    cut = 23
    parts = [slice(None), slice(None, cut), slice(cut, None)]
    for fn in (lambda s: dpo_loss(pc[s], pr[s], rc[s], rr[s], 0.1, "robust", 0.1),
               lambda s: orpo_loss(pc[s], pr[s], nc[s], nr[s], 0.1),
               lambda s: simpo_loss(pc[s], pr[s], nc[s], nr[s], 2.0, 1.0)):
        _assert_stats_add(*(fn(s) for s in parts))
    full = dpo_loss(pc, pr, rc, rr, 0.1).stats()
    c, r = 0.1 * (pc - rc), 0.1 * (pr - rr)
    assert full["count"] == 64 and full["rewards/accuracy"] == (c > r).sum().item()
    assert full["rewards/margins"] == pytest.approx((c - r).sum().item(), rel=1e-5)
    desirable = torch.arange(64) < 40  # the second part has no desirable example at all
    kl = torch.tensor(0.3)
    kto = [kto_loss(pc[s], rc[s], desirable[s], kl, 0.1) for s in (slice(None), slice(None, 50), slice(50, None))]
    _assert_stats_add(*kto)
    assert (kto[0].stats()["count/chosen"], kto[0].stats()["count/rejected"], kto[2].stats()["count/chosen"]) \
        == (40, 24, 0)


# ---- the same numbers through TRL's own code ----------------------------------------------------------

@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


def _cpu_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)


def _fake_lm(log_probs_for: dict[int, torch.Tensor]):
    """A stand-in for TRL's fused-head model output: per-token log-probs chosen by the input tensor."""
    def model(input_ids, **_):
        lp = log_probs_for[input_ids.data_ptr()]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())
    return model


def _sequences(logps: torch.Tensor, tokens: torch.Tensor, fill: float = 0.0):
    """Rows of [prompt token, completion tokens..., padding]; each summed log-prob put on its first completion
    token (TRL sums per-token log-probs over the row, and the sft term averages over masked tokens)."""
    width = int(tokens.max()) + 2
    pos = torch.arange(width)[None, :]
    completion_mask = ((pos >= 1) & (pos <= tokens[:, None])).long()
    per_token = torch.zeros(len(logps), width - 1)
    per_token[:, 0] = logps
    input_ids = torch.full((len(logps), width), fill).long()
    return input_ids, completion_mask, per_token


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0),
                                           ("sft", 0.0)])
def test_dpo_matches_trl_dpo_trainer(trl, loss_type, eps):
    from trl.trainer.dpo_trainer import DPOTrainer

    pc, pr, rc, rr, nc, nr = pairs(11, scale=20.0)
    beta = 0.1
    input_ids, completion_mask, per_token = _sequences(torch.cat([pc, pr]), torch.cat([nc, nr]))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_cpu_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
                  ref_chosen_logps=rc, ref_rejected_logps=rr)
    trl_loss = DPOTrainer._compute_loss(trainer, _fake_lm({input_ids.data_ptr(): per_token}), inputs, False)

    if loss_type == "sft":  # TRL's token-weighted NLL; rpo_term is per sequence
        torch.testing.assert_close(trl_loss, -pc.sum() / nc.sum())
        torch.testing.assert_close((rpo_term(pc, nc) * nc).sum() / nc.sum(), trl_loss)
        return
    ours = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, chosen_tokens=nc, rejected_tokens=nr)
    torch.testing.assert_close(ours.losses.mean(), trl_loss)
    stats, logged = ours.stats(), trainer._metrics["train"]
    for ours_key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                              ("rewards/margins", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")]:
        assert stats[ours_key] / stats["count"] == pytest.approx(logged[trl_key][0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_matches_trl_cpo_sigmoid_with_label_smoothing(trl, eps):
    """TRL 1.16's DPOTrainer no longer smooths "sigmoid"; its CPOTrainer keeps the cDPO formula, on
    logits pc - pr (no reference): dpo_loss with a zero reference is the same computation."""
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, _, _ = pairs(12, scale=20.0)
    cpo = SimpleNamespace(alpha=0.0, accelerator=_cpu_accelerator(), loss_type="sigmoid", beta=0.1,
                          label_smoothing=eps, simpo_gamma=0.0)
    losses, _, _ = CPOTrainer.cpo_loss(cpo, pc, pr)
    zeros = torch.zeros_like(pc)
    torch.testing.assert_close(dpo_loss(pc, pr, zeros, zeros, 0.1, "sigmoid", eps).losses, losses)


@pytest.mark.parametrize("beta,simpo_gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl_cpo_simpo(trl, beta, simpo_gamma):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, nc, nr = pairs(13)
    cpo = SimpleNamespace(alpha=0.0, accelerator=_cpu_accelerator(), loss_type="simpo", beta=beta,
                          label_smoothing=0.0, simpo_gamma=simpo_gamma)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, pc / nc, pr / nr)  # TRL averages first
    ours = simpo_loss(pc, pr, nc, nr, beta, gamma=simpo_gamma)
    torch.testing.assert_close(ours.losses, losses)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_orpo_odds_ratio_term_matches_trl(trl):
    from trl.experimental.orpo import ORPOTrainer

    _, _, _, _, nc, nr = pairs(14)
    pc, pr = mean_logps_below_zero(140, nc, -2.0), mean_logps_below_zero(141, nr, -2.0)
    orpo = SimpleNamespace(beta=0.2, accelerator=_cpu_accelerator())
    or_term, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(orpo, pc / nc, pr / nr)
    ours = orpo_loss(pc, pr, nc, nr, beta=0.2)
    # TRL returns beta * logsigmoid(log_odds) and subtracts its mean from a separately computed NLL
    torch.testing.assert_close(ours.losses - rpo_term(pc, nc), -or_term)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


@pytest.mark.parametrize("kl_shift", [0.7, -0.7], ids=["kl>0", "kl<0 clamped"])
def test_kto_matches_trl_kto_trainer(trl, kl_shift):
    from trl.trainer.kto_trainer import KTOTrainer

    pc, _, rc, _, n, _ = pairs(15, scale=20.0)
    desirable = torch.arange(64) % 3 != 0
    ref_mismatched = rc.roll(1)  # what TRL's rotated (x_i, y_{i-1}) pairs would score
    policy_mismatched = ref_mismatched + kl_shift + noise(150) * 0.1
    input_ids, completion_mask, per_token = _sequences(pc, n, fill=0)
    kl_input_ids, kl_completion_mask, kl_per_token = _sequences(policy_mismatched, n.roll(1), fill=1)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_cpu_accelerator(), calculate_KL=True,
        precompute_ref_logps=True, loss_type="kto", beta=0.1, desirable_weight=1.33, undesirable_weight=0.8,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, trainer)
    batch = dict(label=desirable, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 completion_mask=completion_mask, KL_input_ids=kl_input_ids,
                 KL_attention_mask=torch.ones_like(kl_input_ids), KL_completion_mask=kl_completion_mask,
                 ref_logps=rc, ref_KL_logps=ref_mismatched)
    lm = _fake_lm({input_ids.data_ptr(): per_token, kl_input_ids.data_ptr(): kl_per_token})
    trl_loss = KTOTrainer._compute_loss(trainer, lm, batch, False)

    kl = kto_kl_estimate(policy_mismatched, ref_mismatched)
    ours = kto_loss(pc, rc, desirable, kl, beta=0.1, desirable_weight=1.33, undesirable_weight=0.8)
    assert kl.item() == pytest.approx(trainer._metrics["train"]["kl"][0], abs=1e-6)
    torch.testing.assert_close(ours.losses.mean(), trl_loss)
    stats = ours.stats()
    assert stats["rewards/chosen"] / stats["count/chosen"] == pytest.approx(
        trainer._metrics["train"]["rewards/chosen"][0], rel=1e-5)
    assert stats["rewards/rejected"] / stats["count/rejected"] == pytest.approx(
        trainer._metrics["train"]["rewards/rejected"][0], rel=1e-5)
