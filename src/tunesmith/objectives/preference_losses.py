"""Preference losses as plain functions of per-sequence log-probabilities: DPO and variants, ORPO, SimPO, KTO.

Inputs are summed log-probabilities of each completion's tokens given its prompt, log pi(y|x), one fp32 number
per sequence, shape (P,) for P pairs (KTO: (N,) for N unpaired examples); no model code here. Each function
returns per-pair losses, not a mean: the caller sums them and divides by the step's pair count, in plain sight,
so gradient accumulation over micro-batches and processes equals one large batch (TRL instead takes
``losses.mean()`` per micro-batch).

Notation: pc, pr = policy log pi(y_c|x), log pi(y_r|x) for chosen and rejected; rc, rr = the same under the
reference model; |c|, |r| = completion token counts;

    h = (pc - rc) - (pr - rr)          the DPO "logits": how much more the policy prefers y_c than the reference does

Each formula was checked against TRL 1.16 (trl/trainer/dpo_trainer.py, trl/trainer/kto_trainer.py,
trl/experimental/{cpo,orpo}); where TRL departs from the paper the docstring says how, and
tests/objectives/test_preference_losses.py runs TRL's own code on the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
_LN2 = math.log(2.0)


@dataclass
class PreferenceLoss:
    """Per-pair losses and the implicit rewards logged beside them.

    losses            (P,) per pair, differentiable (KTO: (N,) per example, in input order)
    chosen_rewards    (P,) detached (KTO: (N_desirable,) rewards of the desirable examples)
    rejected_rewards  (P,) detached (KTO: (N_undesirable,))
    paired            False for KTO, whose examples are not pairs: no margins or accuracy then
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    paired: bool = True

    def stats(self) -> dict[str, float]:
        """Sums, not means, so micro-batches and processes add up; divide by the summed counts at the end.

        Paired: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracy (pairs with chosen
        reward > rejected reward), count (pairs); every sum divides by count.
        KTO: loss and count (examples); rewards/chosen over count/chosen, rewards/rejected over count/rejected;
        TRL's KTO margin is rewards/chosen/count/chosen - rewards/rejected/count/rejected, after summing.
        One device sync for all figures.
        """
        c, r = self.chosen_rewards.detach().float(), self.rejected_rewards.detach().float()
        sums = {"loss": self.losses.detach().float().sum(), "rewards/chosen": c.sum(), "rewards/rejected": r.sum()}
        if self.paired:
            sums |= {"rewards/margins": (c - r).sum(), "rewards/accuracy": (c > r).float().sum()}
            counts = {"count": len(self.losses)}
        else:
            counts = {"count": len(self.losses), "count/chosen": len(c), "count/rejected": len(r)}
        return dict(zip(sums, torch.stack(list(sums.values())).tolist())) | counts


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected 1-D tensors of one shape (P,), one number per sequence; got {shapes}")


def _token_counts(tokens: torch.Tensor) -> torch.Tensor:
    """(P,) counts as fp32, at least 1 (as TRL's ``clamp(min=1.0)``): an empty completion has log-prob 0, so it
    divides to 0 rather than nan."""
    return tokens.float().clamp(min=1.0)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """DPO and its variants on summed log-probs (P,); names and formulas as TRL's DPOTrainer ``loss_type``.

    sigmoid  DPO, Rafailov et al. 2023 (arXiv 2305.18290):  -logsigmoid(beta h).
             With label_smoothing = eps > 0: conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
             preferences"): -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h), the cross-entropy against
             labels flipped with probability eps. TRL up to 0.2x computed exactly this for "sigmoid";
             TRL 1.16 ignores label_smoothing for "sigmoid" (its CPOTrainer still applies it).
    robust   Provably robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), eps = label_smoothing in
             [0, 0.5): (-(1-eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps); an unbiased
             estimate of the clean-label loss. Same as TRL; equals sigmoid at eps = 0.
    hinge    SLiC, Zhao et al. 2023 (arXiv 2305.10425), as in TRL: relu(1 - beta h), i.e. margin 1/beta. SLiC's
             calibration loss uses the policy's log-prob difference alone; TRL's (and RSO's, Liu et al. 2023,
             arXiv 2309.06657) subtracts the reference's, as here.
    ipo      IPO, Azar et al. 2023 (arXiv 2310.12036, eq. 17 with tau = beta): (h_avg - 1/(2 beta))^2 where,
             as in TRL, every log-ratio is length-AVERAGED: h_avg = (pc - rc)/|c| - (pr - rr)/|r|, so needs
             chosen_tokens and rejected_tokens (P,). The paper writes summed log-probs; TRL's comment says the
             authors confirmed the averaged form is what their results used.

    chosen_tokens / rejected_tokens are read by ipo only. Rewards (TRL's, for every loss type including ipo,
    unaveraged): chosen = beta (pc - rc), rejected = beta (pr - rr), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type in ("sigmoid", "robust") and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type {loss_type} (the share of pairs "
                         f"assumed flipped); got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type sigmoid (cDPO) and robust only; got "
                         f"{label_smoothing} with loss_type {loss_type}: set it to 0")
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                      ref_rejected=ref_rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    chosen_logratios = policy_chosen.float() - ref_chosen.float()  # (P,)
    rejected_logratios = policy_rejected.float() - ref_rejected.float()  # (P,)
    h = chosen_logratios - rejected_logratios  # (P,)
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if eps > 0:
            losses = (1 - eps) * losses - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type ipo averages log-ratios over completion tokens (as TRL): pass "
                             "chosen_tokens and rejected_tokens, the (P,) completion token counts")
        h_avg = chosen_logratios / _token_counts(chosen_tokens) - rejected_logratios / _token_counts(rejected_tokens)
        losses = (h_avg - 1 / (2 * beta)) ** 2

    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def rpo_term(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """(P,) length-averaged NLL of each chosen completion, -pc/|c|: RPO's SFT term (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", arXiv 2404.19733), which the caller weights by
    rpo_alpha and adds to the preference loss.

    TRL averages per TOKEN over the micro-batch instead (rpo_alpha in TRL <= 0.2x: a CrossEntropyLoss mean over
    every chosen token; loss_type "sft" in 1.16: ``-per_token_logps[chosen_mask].mean()``), i.e.
    sum(-pc) / sum(|c|), which weights long completions more; the two agree when lengths are equal. To get
    TRL's number: ``-policy_chosen.sum() / chosen_tokens.sum()``.
    """
    _check_same_shape(policy_chosen=policy_chosen, chosen_tokens=chosen_tokens)
    return -policy_chosen.float() / _token_counts(chosen_tokens)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate in value and gradient over the whole range (Maechler 2012,
    "Accurately computing log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) below.

    Each branch sees only the inputs it is accurate on, so the branch torch.where discards has a finite
    gradient (TRL's ORPO ``log1mexp`` feeds every x to both, and x in (-3e-8, 0] then makes
    log1p(-exp(x)) = -inf and its gradient 0 * inf = nan). x is capped at -tiny (the smallest normal
    float): at x = 0, p = 1 exactly, the result is log(tiny) (about -87.3 in fp32) instead of -inf.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -_LN2
    safe_near = torch.where(near_zero, x, -_LN2)  # inputs for log(-expm1(x)): in (-ln 2, 0)
    safe_far = torch.where(near_zero, -_LN2, x)  # inputs for log1p(-exp(x)): <= -ln 2
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, beta: float) -> PreferenceLoss:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691; eqs. 4 and 7 for the odds ratio, as TRL cites them): no reference
    model; beta is the paper's lambda.

        l_c = pc/|c|, l_r = pr/|r|            mean token log-prob; p = exp(l)
        log_odds = log(p_c/(1-p_c)) - log(p_r/(1-p_r)) = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))
        loss = -l_c - beta * logsigmoid(log_odds)      NLL of chosen (length-averaged) + lambda * L_OR

    Rewards as TRL logs them: beta * l_c, beta * l_r (detached).
    TRL differs in the NLL: a CrossEntropyLoss mean over every token of the micro-batch's chosen sequences,
    PROMPT TOKENS INCLUDED ("orpo chosen nll loss is computed over the full prompt and response"); here, as in
    the paper's L_SFT, it is each completion's own mean, -pc/|c|. The odds-ratio term is TRL's exactly.
    """
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, chosen_tokens=chosen_tokens,
                      rejected_tokens=rejected_tokens)
    mean_chosen = policy_chosen.float() / _token_counts(chosen_tokens)  # (P,) <= 0
    mean_rejected = policy_rejected.float() / _token_counts(rejected_tokens)  # (P,)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    losses = -mean_chosen - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, beta * mean_chosen.detach(), beta * mean_rejected.detach())


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734): no reference model, length-averaged log-probs.

        loss = -logsigmoid(beta * (pc/|c| - pr/|r|) - gamma)

    TRL (CPOTrainer, loss_type "simpo") writes it as logits = (pc/|c| - pr/|r|) - simpo_gamma / beta and
    loss = -logsigmoid(beta * logits): the same number with gamma = simpo_gamma (a margin in reward units).
    SimPO's released code (princeton-nlp/SimPO) takes gamma_beta_ratio = gamma / beta instead: gamma =
    beta * gamma_beta_ratio.
    TRL adds a cDPO-style label_smoothing and, unless cpo_alpha = 0, an NLL term; neither is part of SimPO.
    Rewards as TRL logs them: beta * pc/|c|, beta * pr/|r| (detached).
    """
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, chosen_tokens=chosen_tokens,
                      rejected_tokens=rejected_tokens)
    mean_chosen = policy_chosen.float() / _token_counts(chosen_tokens)  # (P,)
    mean_rejected = policy_rejected.float() / _token_counts(rejected_tokens)  # (P,)
    losses = -F.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)
    return PreferenceLoss(losses, beta * mean_chosen.detach(), beta * mean_rejected.detach())


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, arXiv 2402.01306): a scalar, detached,
    estimate of KL(pi || pi_ref) = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)), where the
    (x, y') are MISMATCHED pairs: each prompt with another example's completion, so y' is a plausible output
    that is not the answer to x.

    TRL builds them by rotating the completions by one within each batch: (x_1, y_n), (x_2, y_1), ...,
    (x_n, y_{n-1}) (``KL_completion_ids``, made at dataset preparation in chunks of per_device_train_batch_size;
    the vision collator does it per batch), scores them under no_grad, and across processes averages the
    per-process means and clamps after. To match that with several processes, all-reduce the sum and count of
    the differences and clamp the global mean; this helper clamps its own batch's mean.
    """
    _check_same_shape(policy_mismatched_logps=policy_mismatched_logps, ref_mismatched_logps=ref_mismatched_logps)
    return (policy_mismatched_logps.float() - ref_mismatched_logps.float()).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_estimate: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306, eq. 7), as TRL's KTOTrainer (loss_type "kto").

    Unpaired: N examples, each one completion labelled desirable (True) or not. With r = log pi(y|x) -
    log pi_ref(y|x) (N,) and z0 = clamp(kl_estimate, min=0), detached (see kto_kl_estimate):

        desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))

    The paper's lambda_y - v(x, y) is the same number. Losses stay in input order (TRL concatenates the
    desirable ones first; its mean is the same). Rewards: beta * r of the desirable / undesirable examples.
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True: a desirable example); got dtype {desirable.dtype}")
    if kl_estimate.numel() != 1:
        raise ValueError(f"kl_estimate must be a scalar (kto_kl_estimate); got shape {tuple(kl_estimate.shape)}")
    logratios = policy_logps.float() - ref_logps.float()  # (N,)
    z0 = kl_estimate.detach().float().clamp(min=0).reshape(())
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return PreferenceLoss(losses, rewards[desirable], rewards[~desirable], paired=False)
