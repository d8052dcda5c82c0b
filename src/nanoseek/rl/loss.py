"""The GRPO objective and its variants, as pure functions of per-token log-probabilities.

For G completions o_i of one prompt with rewards r_i (DeepSeekMath §4.1, R1):

    advantage    A_i = (r_i - mean(r)) / (std(r) + eps)           (dr_grpo: r_i - mean(r))
    ratio        rho_{i,t} = pi_theta(o_it) / pi_old(o_it)
    surrogate    min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    KL (k3)      D_{i,t} = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1   (>= 0, unbiased)
    objective    per token: surrogate - beta * D

Normalizers (`variant`):
* grpo:    mean over each completion's tokens (1/|o_i|), then mean over completions;
* dr_grpo: sum over all tokens / (n_completions * max_len), a constant (Dr. GRPO removes the
           length bias of 1/|o_i| and the std scaling of the advantage);
* dapo:    sum over all tokens / total tokens in the batch (token-level), usually with
           eps_high > eps_low ("clip-higher") and beta = 0.

The loss is the negative objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VARIANTS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [n_groups * G] (groups contiguous) -> advantages of the same shape; equal rewards -> 0."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    # A group of equal rewards must give exactly 0: the mean of eight 0.1s is not 0.1 in floating
    # point, and Adam would blow the resulting 1e-5 "advantage", same-signed for every completion,
    # up to a full-size step that pushes down everything the policy sampled.
    tied = (r == r[:, :1]).all(dim=1, keepdim=True)
    return adv.masked_fill(tied, 0.0).reshape(-1)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = logp_ref - logp; >= 0."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


@dataclass
class LossStats:
    loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                variant: str = "grpo", eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0,
                logp_ref: torch.Tensor | None = None, max_len: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """logp, logp_old, logp_ref, mask: [B, L] (mask 1 on completion tokens); advantages [B]."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta:
        if logp_ref is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        kl = kl_k3(logp, logp_ref)
        per_token = per_token - beta * kl
    if variant == "grpo":
        lengths = mask.sum(dim=1).clamp_min(1)
        objective = ((per_token * mask).sum(dim=1) / lengths).mean()
    elif variant == "dr_grpo":
        L = max_len if max_len is not None else mask.shape[1]
        objective = (per_token * mask).sum() / (mask.shape[0] * L)
    else:
        objective = (per_token * mask).sum() / mask.sum().clamp_min(1)
    loss = -objective
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        clip_active = ((unclipped != clipped) & (clipped < unclipped)).to(mask.dtype)  # where min() took the clip
        stats = LossStats(loss=float(loss), kl=float((kl * mask).sum() / n), clip_fraction=float((clip_active * mask).sum() / n),
                          ratio_mean=float((ratio * mask).sum() / n))
    return loss, stats
