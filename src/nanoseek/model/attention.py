"""Multi-head Latent Attention (MLA), with its two equivalent computation paths.

Per token, keys and values come from one small latent c_kv (kv_lora_rank numbers, RMS-normed)
plus one rope key k_pe shared by all heads (qk_rope_head_dim numbers):

    k_h = [W_UK[h] c_kv ; k_pe],   v_h = W_UV[h] c_kv,   q_h = [q_nope_h ; q_pe_h]

* Expanded path (training, prefill): materialize k_h, v_h for every head and run standard
  causal attention (SDPA).
* Absorbed path (decode): since q_nope_h . (W_UK[h] c) = (W_UK[h]^T q_nope_h) . c, fold W_UK into
  the query and attend directly over the cached latents; fold W_UV in after attention. The cache
  then holds only kv_lora_rank + qk_rope_head_dim numbers per token per layer -- DeepSeek-V3's
  70,272 bytes/token in bf16 instead of 61 x 128 heads x (192 + 128) x 2 bytes expanded.

Both paths give the same scores up to float rounding; tests check that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cast_cache import cast_cached
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


# The latent norms use a fixed eps in DeepSeek's inference code, its Hugging Face code and
# transformers alike; `rms_norm_eps` only reaches the block and final norms (it matters for
# Moonlight, whose config says 1e-5).
LATENT_NORM_EPS = 1e-6


# CPU prompts of this many tokens run causal attention as two query halves (see causal_attention).
HALVED_ATTENTION_TOKENS = (320, 576)

# The absorbed path runs a prefill's queries (at least ABSORBED_CHUNK_MIN_QUERIES of them) in
# chunks whose scores hold at most ABSORBED_SCORES_MAX numbers (64 MiB in fp32; see
# forward_absorbed). Decode and verify steps, a few queries each, always run whole: split, each
# chunk would read the whole cache again and hold as many scores.
ABSORBED_SCORES_MAX = 1 << 24
ABSORBED_CHUNK_MIN_QUERIES = 64


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA of q, k, v [B, H, T, D].

    PyTorch's CPU flash kernel skips fully masked blocks of keys, but its key blocks are 512 long:
    up to 512 tokens it computes the whole T x T score matrix, half of which is masked. For
    HALVED_ATTENTION_TOKENS it is cheaper to split the queries in two: the first half attends
    causally to the first half of the keys only, the second half to all keys under an explicit
    mask. Measured at 2 threads (docs/engine.md): 14-17% less attention time at 384-512 tokens,
    a loss below 320 and above 576 (where the kernel's own blocking already skips).
    """
    T = q.shape[2]
    lo, hi = HALVED_ATTENTION_TOKENS
    if q.device.type != "cpu" or not lo <= T <= hi or q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
    h = T // 2
    first = F.scaled_dot_product_attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], is_causal=True, scale=scale)
    mask = torch.ones(T - h, T, dtype=torch.bool, device=q.device).tril_(h)
    second = F.scaled_dot_product_attention(q[:, :, h:], k, v, attn_mask=mask, scale=scale)
    return torch.cat((first, second), dim=2)


class LatentCache:
    """Preallocated latent KV cache: one [batch, max_len, kv_lora_rank + qk_rope_head_dim] tensor per layer.

    Row t of a layer holds [normalized c_kv_t | rotated k_pe_t] of the token at position t.

    `attend_len`: when set, attention at per-row positions reads this many slots (masked past each
    row's position) instead of up to the furthest row's end, which the host would have to read off
    the device: a CUDA graph records a step with no such read (engine/cudagraph.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, n_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.kv_lora_rank = cfg.kv_lora_rank
        self.max_len = max_len
        self.layers = [torch.zeros(batch_size, max_len, cfg.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(n_layers)]
        self.attend_len: int | None = None

    def nbytes_per_token(self) -> int:
        return sum(t.shape[-1] * t.element_size() for t in self.layers)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] at per-row indices [B, K] -> [B, K, D]."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        H, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, H, bias=bias)

    # -- shared pieces ----------------------------------------------------------------------
    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2), self.interleaved)
        return q_nope, q_pe  # [B, T, H, nope], [B, T, H, rope]

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[normalized c_kv | rotated k_pe] for each token: [B, T, kv_lora_rank + rope_dim]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleaved)), dim=-1)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start_pos: int | torch.Tensor = 0,
                at: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, hidden]; cos/sin: [B or 1, T, rope_dim/2] for the tokens' positions.

        `start_pos` is an int (every row starts there) or a LongTensor [B] of per-row start
        positions (batched decode of sequences of different lengths, speculative verification).
        Without a cache, or when filling an empty cache (start_pos == 0), the expanded path runs;
        with tokens already cached, or per-row positions, the absorbed path attends over the cache.

        `at` (LongTensor [B, K] of indices into T; needs `cache`): every token's latent is cached,
        but only the tokens at `at` attend, on the absorbed path; returns [B, K, hidden]. A
        prefill's last layer needs nothing else: only the prompt's last token reaches the logits.
        """
        latent = self._latent(x, cos, sin)
        if at is not None:
            if cache is None:
                raise ValueError("attending from selected positions needs a cache")
            B = x.shape[0]
            q_nope, q_pe = self._query(take(x, at), take(cos.expand(B, -1, -1), at), take(sin.expand(B, -1, -1), at))
            pos = (start_pos.view(-1, 1) if isinstance(start_pos, torch.Tensor) else start_pos) + at
            return self.forward_absorbed(q_nope, q_pe, self._store(cache, latent, start_pos)[0], pos)
        q_nope, q_pe = self._query(x, cos, sin)
        if cache is not None:
            cached, pos = self._store(cache, latent, start_pos)
            if isinstance(pos, torch.Tensor) or pos > 0:
                return self.forward_absorbed(q_nope, q_pe, cached, pos)
        return self.forward_expanded(q_nope, q_pe, latent)

    def _store(self, cache: LatentCache, latent: torch.Tensor,
               start_pos: int | torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Write the new tokens' latents [B, T, C] into this layer's cache. Returns the cache up to
        the last position written (per-row starts: the furthest row's) and the tokens' positions in
        `forward_absorbed`'s form: the int start, or per-row starts as [B, T] positions."""
        B, T = latent.shape[:2]
        layer = cache.layers[self.layer_idx]
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos.view(-1, 1) + torch.arange(T, device=layer.device)  # [B, T]
            if cache.attend_len is not None:  # the caller vouches that every position is below it
                layer[torch.arange(B, device=layer.device)[:, None], pos] = latent
                return layer[:, :cache.attend_len], pos
            end = int(pos.max()) + 1
            if torch.compiler.is_compiling():  # a graph cannot raise on a data-dependent value
                torch._check(end >= T)
                torch._check(end <= cache.max_len)
            elif end > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions; cannot write position {end - 1}")
            layer[torch.arange(B, device=layer.device)[:, None], pos] = latent
            return layer[:, :end], pos
        if start_pos + T > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; cannot write {start_pos}..{start_pos + T - 1}")
        layer[:, start_pos:start_pos + T] = latent
        return layer[:, :start_pos + T], start_pos

    def forward_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        B, T, Hh, _ = q_nope.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, T, Hh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, Hh, self.rope_dim)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        # CPU SDPA has a fast fused kernel only when q/k and v head sizes agree: pad v, then slice.
        pad = self.qk_dim - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        o = causal_attention(q, k, v, self.scale)
        o = o[..., : self.v_dim].transpose(1, 2).reshape(B, T, Hh * self.v_dim)
        return self.o_proj(o)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight as per-head [H, nope, C] (W_UK) and [H, v, C] (W_UV) views in `dtype`.

        Under no-grad a converted copy is kept while the weight is unchanged (same version counter
        and storage), so a bf16 model's fp32 attention core does not re-convert it every step.
        """
        w = cast_cached(self, "_absorbed_cache", self.kv_b_proj.weight, dtype)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def forward_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                         start_pos: int | torch.Tensor) -> torch.Tensor:
        """Attention of T new queries over the S cached latents, never expanding K or V.

        start_pos: the int position of the first query (cache rows 0..S-1 = 0..start_pos+T-1), or a
        LongTensor [B, T] of each query's position; cache slot s is visible to a query at position
        p iff s <= p, so rows of different lengths (and stale slots past a row's end) are masked.
        """
        B, T, Hh, _ = q_nope.shape
        S, C = cached.shape[1], self.kv_lora_rank
        # (a compiled step never compares S, which is symbolic there: that would need a guard)
        step = T if T < ABSORBED_CHUNK_MIN_QUERIES or torch.compiler.is_compiling() else \
            max(1, ABSORBED_SCORES_MAX // (B * Hh * S))
        if T > step:
            # A prefill on this path (after a prefix-cache hit, or from a cache offset): the scores
            # are [B, T*H, S] in fp32, and the mask and softmax make two more, so T x S grows as the
            # prompt's square (3,000 tokens of `bench`: +611 MiB; V3 at 8K: ~96 GiB). Queries in
            # chunks keep them at ABSORBED_SCORES_MAX; each chunk sees the cache up to its last query.
            outs = []
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                if isinstance(start_pos, torch.Tensor):
                    part, sp = cached, start_pos[:, t0:t1]
                else:
                    part, sp = cached[:, :start_pos + t1], start_pos + t0
                outs.append(self.forward_absorbed(q_nope[:, t0:t1], q_pe[:, t0:t1], part, sp))
            return torch.cat(outs, dim=1)
        out_dtype = q_nope.dtype
        if cached.device.type == "cpu" and (q_nope.dtype != torch.float32 or cached.dtype != torch.float32):
            # CPU bf16/fp16 GEMMs with 8-32 rows are 2-10x slower than fp32 ones (docs/engine.md):
            # the attention core runs in fp32, on an fp32 copy of the cache slice (converting a bf16
            # slice measured cheaper than keeping, and reading, an fp32 cache twice the size).
            # A compiled step skips the copy: its two cache products become reductions that upcast
            # each element as they read it (10% off a bf16 step at 4K context, docs/engine.md).
            q_nope, q_pe = q_nope.float(), q_pe.float()
            if not torch.compiler.is_compiling():
                cached = cached.float()
        core = q_nope.dtype
        w_uk, w_uv = self.absorbed_weights(core)  # [H, nope, C], [H, v, C]
        # Per-head bmm (not einsum: it copies the strided weight views on every call).
        q_lat = torch.bmm(q_nope.reshape(B * T, Hh, self.nope_dim).transpose(0, 1), w_uk)  # [H, B*T, C]
        q_full = torch.cat((q_lat.transpose(0, 1), q_pe.reshape(B * T, Hh, self.rope_dim)), dim=-1)
        q_full = q_full.reshape(B, T * Hh, C + self.rope_dim) * self.scale
        if cached.dtype != core:  # compiled low-precision cache: upcast inside the reductions
            scores = (q_full[:, :, None, :] * cached[:, None, :, :].float()).sum(-1)
        else:
            scores = torch.bmm(q_full, cached.transpose(1, 2)).float()  # [B, T*H, S]
        future = None
        if isinstance(start_pos, torch.Tensor):
            future = torch.arange(S, device=scores.device)[None, None, :] > start_pos[:, :, None]  # [B, T, S]
        elif T > 1:
            # only the last T - 1 slots can be in some query's future: mask that [T, T - 1] corner
            tail = torch.ones(T, T - 1, dtype=torch.bool, device=scores.device).triu_()
            scores.view(B, T, Hh, S)[..., S - T + 1:].masked_fill_(tail[None, :, None, :], float("-inf"))
        if future is not None:
            scores = scores.view(B, T, Hh, S).masked_fill(future[:, :, None, :], float("-inf")).view(B, T * Hh, S)
        probs = scores.softmax(dim=-1).to(core)
        if cached.dtype != core:
            o_lat = (probs[..., None] * cached[:, None, :, :C].float()).sum(-2).view(B * T, Hh, C).transpose(0, 1)
        else:
            o_lat = torch.bmm(probs, cached[..., :C]).view(B * T, Hh, C).transpose(0, 1)  # [H, B*T, C]
        o = torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1).reshape(B, T, Hh * self.v_dim)
        return self.o_proj(o.to(out_dtype))
