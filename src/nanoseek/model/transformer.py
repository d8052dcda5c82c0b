"""The DeepSeek-V3 causal LM: embedding -> L pre-norm decoder blocks -> final norm -> head,
plus the optional multi-token-prediction (MTP) blocks.

Module names mirror the official Hugging Face tensor names (`model.layers.3.self_attn.q_a_proj`),
and the MTP blocks live at `model.layers[num_hidden_layers + k]` exactly where the official
checkpoints store them, so loading is a near-identity mapping (see nanoseek.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache, take
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, vocab]
    hidden_states: torch.Tensor | None = None  # final-normed hidden states [B, T, hidden]
    mtp_logits: list[torch.Tensor] | None = None  # depth k: [B, T - k, vocab], predicts token i + 1 + k


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start_pos: int | torch.Tensor = 0,
                at: torch.Tensor | None = None) -> torch.Tensor:
        """`at` [B, K] (needs `cache`): cache every token, compute the block's output only there: [B, K, hidden]."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, at)
        x = (x if at is None else take(x, at)) + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP block's own final norm and (physically shared) output head."""

    def __init__(self, cfg: ModelConfig, head: nn.Linear) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = head


class MTPLayer(DecoderLayer):
    """MTP module k: h' = eh_proj([enorm(emb(t_{i+k})) ; hnorm(h_i^{k-1})]), then a full decoder block.

    Embedding first, then hidden state: that is the order in the released weights (the paper
    writes the reverse). The embedding and output head are the main model's, shared.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, embed_tokens: nn.Embedding, head: nn.Linear) -> None:
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.embed_tokens = embed_tokens
        self.shared_head = SharedHead(cfg, head)

    def combine(self, next_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        emb = self.embed_tokens(next_tokens)
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(hidden)), dim=-1))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(h))


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, lm_head: nn.Linear) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(L)]
        layers += [MTPLayer(cfg, L + k, self.embed_tokens, lm_head) for k in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.layers[self.cfg.num_hidden_layers:])  # type: ignore[arg-type]


class DeepseekV3ForCausalLM(nn.Module):
    """One model definition for training, evaluation and inference."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.model = DeepseekV3Model(cfg, self.lm_head)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, start_pos: int | torch.Tensor = 0, cache: LatentCache | None = None,
                return_mtp: bool = False, return_hidden: bool = False,
                logits_at: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, T] at positions start_pos..start_pos+T-1.

        `start_pos` is an int, or a LongTensor [B] of per-row start positions (rows of different
        lengths in one cache; needs `cache`). With `cache`, the new tokens' latents are written to
        it and, when start_pos > 0 (or per-row), attention runs on the absorbed path over
        everything cached. `return_mtp` adds the MTP logits, computed over the same sequence
        (training): depth k predicts token i + 1 + k from position i. `logits_at` (LongTensor [B]
        or [B, K] of indices into T) computes the head only there: logits [B, vocab] or
        [B, K, vocab]; `hidden_states` stays full. With a cache and no hidden states or MTP asked
        for, the last layer also runs only there (after caching every token's latent): a prefill
        skips that layer's attention, MoE and shared expert for all other tokens.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if isinstance(start_pos, torch.Tensor) and cache is None:
            raise ValueError("per-row start positions need a cache")
        cfg = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(self.positions(start_pos, T, input_ids.device), x.dtype)
        only = None  # the last layer's output is needed only at logits_at
        if logits_at is not None and cache is not None and not (return_hidden or return_mtp) and T > 1:
            only = logits_at.view(B, -1)
        L = cfg.num_hidden_layers
        for i, layer in enumerate(self.model.layers[:L]):
            x = layer(x, cos, sin, cache, start_pos, only if i == L - 1 else None)
        h = self.model.norm(x)
        if only is None:
            logits = self.lm_head(gather_positions(h, logits_at))
        else:
            logits = self.lm_head(h if logits_at.dim() == 2 else h[:, 0])
        out = CausalLMOutput(logits=logits, hidden_states=h if return_hidden else None)
        if return_mtp:
            out.mtp_logits = self.mtp_forward(input_ids, h, cos, sin)
        return out

    @staticmethod
    def positions(start_pos: int | torch.Tensor, T: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Token positions: [1, T] for an int start, [B, T] for per-row starts [B]."""
        if isinstance(start_pos, torch.Tensor):
            return start_pos.view(-1, 1) + torch.arange(T, device=start_pos.device)
        return torch.arange(start_pos, start_pos + T, device=device)[None]

    def mtp_step(self, depth: int, next_tokens: torch.Tensor, hidden: torch.Tensor, *, start_pos: int | torch.Tensor,
                 cache: LatentCache | None = None,
                 logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module `depth` (0-based) on the cache, for drafting: returns (hidden [B, T, H], logits).

        Position i reads `hidden[:, i]` (the main model's final-normed state at position i, or the
        previous MTP module's output when chaining) and the embedding of `next_tokens[:, i]` (the
        token at position i + 1); the logits predict the token at position i + 2 + depth. The module
        keeps its own latent cache (`cache.layers[num_hidden_layers + depth]`), like any layer.
        """
        mtp = self.model.mtp_layers[depth]
        x = mtp.combine(next_tokens, hidden)
        cos, sin = self.model.rotary(self.positions(start_pos, x.shape[1], x.device), x.dtype)
        h = mtp(x, cos, sin, cache, start_pos)
        return h, mtp.logits(gather_positions(h, logits_at))

    def mtp_forward(self, input_ids: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """Sequential MTP over a full sequence; module k sees positions 0..T-1-k."""
        logits = []
        hidden = h
        T = input_ids.shape[1]
        for k, mtp in enumerate(self.model.mtp_layers, start=1):
            n = T - k
            if n <= 0:
                break
            x = mtp.combine(input_ids[:, k:], hidden[:, :n])
            hidden = mtp(x, cos[:, :n], sin[:, :n])
            logits.append(mtp.logits(hidden))
        return logits

    # -- helpers ----------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        p = self.lm_head.weight
        return LatentCache(self.config, batch_size, max_len, dtype=dtype or p.dtype, device=p.device)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random init: N(0, std) for every matrix and embedding, ones for norms, zero biases."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("norm.weight") or ".norm." in name or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()

    def num_parameters(self, include_mtp: bool = True) -> int:
        seen = set()
        total = 0
        L = self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if not include_mtp and name.startswith("model.layers.") and int(name.split(".")[2]) >= L:
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def gather_positions(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, D] at per-row indices: [B] -> [B, D], [B, K] -> [B, K, D]; None -> x."""
    if index is None:
        return x
    if index.dim() == 1:
        return x[torch.arange(x.shape[0], device=x.device), index]
    return take(x, index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index)
