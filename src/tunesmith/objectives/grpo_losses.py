"""The formulas of group-relative policy optimisation, on tensors: advantages from grades, the clipped per-token loss.

GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1): sample G answers to each prompt, grade them, and take each
answer's advantage relative to its group, A_i = (r_i - mean(r)) / (std(r) + eps), for every token of the answer. The
per-token objective is PPO's clipped surrogate with the probability ratio rho_t = pi(y_t) / pi_old(y_t):

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's k3 estimator, as the paper)

DAPO (Yu et al. 2025) raises eps_high above eps_low ("clip-higher") and averages over every answer token of the batch
instead of per answer; Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training") divides by a constant (answers
x the answer length limit) and drops the std scaling, both to remove a bias toward short (right) and long (wrong)
answers. The sums here are left to the caller to divide (objectives/grpo.py: the step's answers, active tokens, or
answers x max length), so gradient accumulation equals one large batch whatever the loss type.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's, so that a group with a tiny spread does not get huge advantages


def group_advantages(rewards: torch.Tensor, scale: str = "group",
                     batch_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (P, G), zero_spread (P,) bool) of rewards (P, G): each reward less its group's mean, divided by the
    group's standard deviation (``scale`` group), the whole batch's (batch: ``batch_std`` where the batch is spread
    over several processes, else the std of ``rewards``) or nothing (none); std unbiased, as torch.std and TRL. A group
    whose answers all scored the same has advantages exactly 0: it teaches nothing."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards: got {scale!r}; allowed: {', '.join(SCALES)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    spread = rewards.std(dim=1) if rewards.size(1) > 1 else torch.zeros(rewards.size(0), dtype=rewards.dtype)
    zero = spread == 0
    if scale == "group":
        centred = centred / (spread[:, None] + STD_EPS)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + STD_EPS)
    return centred.masked_fill(zero[:, None], 0.0), zero


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor, eps_low: float,
                       eps_high: float, ref_logp: torch.Tensor | None = None, beta: float = 0.0):
    """(loss_t, kl_t or None, clipped_t bool) per token, each (N,): the clipped surrogate (+ beta KL) of the module
    docstring. ``old_logp``: the log-probs of the policy that sampled the answers (with one update per sample batch,
    the current ones detached: the ratio is then 1 and its gradient A * d logp). ``clipped_t``: where the clip took the
    gradient away (the ratio outside the range on the side the advantage pushes)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - eps_low) & (advantage < 0)) | ((ratio > 1.0 + eps_high) & (advantage > 0))
    kl = None
    if ref_logp is not None and beta:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + beta * kl
    return loss, kl, clipped


def summed_loss(token_loss: torch.Tensor, rows: torch.Tensor, token_weight: torch.Tensor, n_answers: int,
                loss_type: str) -> torch.Tensor:
    """The batch's loss before the step's division: grpo sums each answer's mean token loss (the step divides by its
    answers); dapo and dr_grpo sum every token's loss (divided by the step's active tokens, or answers x max length).
    ``rows`` (N,): the answer of each token; ``token_weight`` (N,): 0 for tokens left out (answers cut at the length
    limit when masked, passes with no loss)."""
    weighted = token_loss * token_weight
    if loss_type == "grpo":
        per_answer = torch.zeros(n_answers, dtype=weighted.dtype, device=weighted.device).index_add(0, rows, weighted)
        counts = torch.zeros(n_answers, dtype=weighted.dtype, device=weighted.device).index_add(0, rows, token_weight)
        return (per_answer / counts.clamp(min=1.0)).sum()
    if loss_type in ("dapo", "dr_grpo"):
        return weighted.sum()
    raise ValueError(f"loss_type: got {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
