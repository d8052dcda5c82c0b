"""Rotary position embedding on MLA's decoupled rope dims, with YaRN context extension.

Only `qk_rope_head_dim` numbers per head carry position. DeepSeek's weights expect the
*interleaved* pairing (x[2j], x[2j+1]) rotated by angle pos * theta_j, so that is what
`apply_rope` computes. It returns the rotated pairs de-interleaved, [evens | odds]: q and k get
the same permutation, so every q.k product (hence every logit) is unchanged, and the cat is cheaper
than re-interleaving. `rope_interleave: false` configs (weights already permuted) use rotate-half.

YaRN (arXiv 2309.00071) as DeepSeek uses it:
* frequencies: pairs rotating fast (j <= low) keep theta_j, slow pairs (j >= high) use theta_j / s,
  a linear ramp blends in between; low/high come from beta_fast/beta_slow rotations over the
  original context;
* cos/sin amplitude m(s, mscale) / m(s, mscale_all_dim), m(s, a) = 0.1 a ln s + 1 (1.0 for every
  released config, where mscale == mscale_all_dim);
* softmax scale qk_head_dim^-0.5 * m(s, mscale_all_dim)^2.
The official inference script turns YaRN on only when run with max_seq_len > 4096; transformers
and DeepSeek's own Hugging Face code always apply it when `rope_scaling` is set. We follow the
latter, because that is what the checkpoints' config.json describes.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair angular frequencies theta'_j, float32, shape [qk_rope_head_dim // 2]."""
    dim = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    # Explicit CPU: models are often built under `torch.device("meta")`, which would make these meta.
    exps = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (base ** exps)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    interpolated = 1.0 / (factor * (base ** exps))
    return interpolated * ramp + inv_freq * (1 - ramp)


def rope_amplitude(cfg: ModelConfig) -> float:
    """Factor multiplying cos and sin (YaRN's attention_factor)."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = float(rs["factor"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for given positions; no length-sized tables, so any position works.

    The frequencies are a plain fp32 attribute, not a buffer: they must survive `model.to(bf16)`
    and meta-device construction unchanged, and they are never part of a checkpoint.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(cfg)}
        self.amplitude = rope_amplitude(cfg)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int tensor [..., T] -> cos, sin of shape [..., T, rope_dim // 2] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        if self.amplitude != 1.0:
            cos, sin = cos * self.amplitude, sin * self.amplitude
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of x. cos/sin broadcast against x[..., : d/2]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
