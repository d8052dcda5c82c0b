"""Pure computation: the DeepSeek-V3 modules. No file or network I/O lives here."""

from .attention import MLA, LatentCache
from .moe import MLP, MoE, route
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale
from .transformer import CausalLMOutput, DecoderLayer, DeepseekV3ForCausalLM, MTPLayer, cross_entropy

__all__ = [
    "MLA", "LatentCache", "MLP", "MoE", "route", "RMSNorm", "RotaryEmbedding", "apply_rope", "rope_inv_freq",
    "softmax_scale", "CausalLMOutput", "DecoderLayer", "DeepseekV3ForCausalLM", "MTPLayer", "cross_entropy",
]
