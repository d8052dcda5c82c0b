"""Schedules as pure functions of the step: learning rate, MTP weight, bias-update speed."""

from __future__ import annotations

import math

from .config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr, or warmup-stable-decay (linear decay at the end).

    Steps run 0..max_steps-1, and the last one trains at the floor (min_lr_ratio x lr). WSD's decay
    starts after the warmup at the earliest, so a short run never drops from the warmup's peak."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    total = max(cfg.max_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(cfg.wsd_decay_fraction * total)) if cfg.wsd_decay_fraction > 0 else 0
    decay_start = max(total - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return peak + (floor - peak) * progress


def max_grad_norm(grad_clip: float) -> float:
    """The `max_norm` for clip_grad_norm_: grad_clip 0 turns clipping off (clip_grad_norm_ itself
    would zero every gradient at 0)."""
    return grad_clip if grad_clip > 0 else float("inf")


def mtp_weight(step: int, cfg: TrainConfig) -> float:
    return cfg.mtp_lambda if step < cfg.mtp_lambda_switch * cfg.max_steps else cfg.mtp_lambda_late


def bias_gamma(step: int, cfg: TrainConfig) -> float:
    if cfg.balancing != "aux_free":
        return 0.0
    return cfg.bias_update_gamma if step < cfg.bias_update_stop * cfg.max_steps else 0.0
