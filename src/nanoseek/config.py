"""Model configuration with the official DeepSeek `config.json` field names.

A real DeepSeek-V3 `config.json` *is* a nanoseek config: `ModelConfig.from_dict` reads it as is.
Two dialects exist in the wild and both are read:

* the official one (DeepSeek's Hub repos): `rope_theta` + `rope_scaling` ({"type": "yarn", ...});
* the one `transformers` >= 5 writes: `rope_parameters` ({"rope_type": "yarn", "rope_theta": ...}),
  `rope_interleave`, `head_dim`, `qk_head_dim`, and *no* `scoring_func` / `topk_method`
  (the `deepseek_v3` model type implies sigmoid / noaux_tc routing).

`to_dict` writes the official dialect plus the keys transformers needs, so the file loads in the
official tooling, in transformers and here. Presets (`tiny`, `bench`, `deepseek-v3`, ...) are just
such configs. Validation happens here, at the edge, with messages that name the field.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_SCALING_TYPES = ("yarn",)


class ConfigError(ValueError):
    """A config.json or preset that cannot describe a valid model."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # unused by MLA; kept for other tools
    q_lora_rank: int | None = 1536  # None (or 0) -> plain q_proj, as in V2-Lite / Moonlight
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    torch_dtype: str | None = "bfloat16"
    quantization_config: dict[str, Any] | None = None
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # Keys we do not interpret but carry through a load/save round trip (auto_map, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Numbers per token per layer in the latent cache: normalized latent + rotated rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def mtp_is_moe(self) -> bool:
        # MTP blocks sit at index num_hidden_layers + k and follow the same dense/MoE rule.
        return self.is_moe_layer(self.num_hidden_layers)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        # Types first: a float size or a "false" string would pass the range checks and fail (or
        # silently mean something else) much later.
        for name in ("moe_intermediate_size", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                     "first_k_dense_replace", "moe_layer_freq", "num_nextn_predict_layers", "n_routed_experts"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"`{name}` must be an integer, got {v!r}")
        for name in ("norm_topk_prob", "rope_interleave", "tie_word_embeddings", "attention_bias", "seq_aux"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"`{name}` must be true or false, got {v!r}")
        for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range", "aux_loss_alpha"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"`{name}` must be a finite number, got {v!r}")
        need(self.torch_dtype in (None, "float32", "bfloat16", "float16"),
             f"`torch_dtype` must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"`{name}` must be a positive integer, got {v!r}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"`q_lora_rank` must be null or a positive integer, got {self.q_lora_rank!r}")
        need(self.qk_rope_head_dim % 2 == 0,
             f"`qk_rope_head_dim` must be even (rotary pairs), got {self.qk_rope_head_dim}")
        need(self.hidden_act == "silu", f"`hidden_act` must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}")
        need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
             f"`num_nextn_predict_layers` must be an integer >= 0, got {self.num_nextn_predict_layers!r}")
        need(isinstance(self.first_k_dense_replace, int) and 0 <= self.first_k_dense_replace,
             f"`first_k_dense_replace` must be an integer >= 0, got {self.first_k_dense_replace!r}")
        need(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1,
             f"`moe_layer_freq` must be an integer >= 1, got {self.moe_layer_freq!r}")
        need(isinstance(self.n_routed_experts, int) and self.n_routed_experts >= 0,
             f"`n_routed_experts` must be an integer >= 0, got {self.n_routed_experts!r}")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            self._validate_moe(need)
        self._validate_rope(need)
        if self.quantization_config is not None:
            q = self.quantization_config
            need(isinstance(q, dict), "`quantization_config` must be an object")
            need(q.get("quant_method") == "fp8",
                 f"`quantization_config.quant_method` {q.get('quant_method')!r} is not supported (only 'fp8')")
            need(q.get("fmt", "e4m3") == "e4m3",
                 f"`quantization_config.fmt` {q.get('fmt')!r} is not supported (only 'e4m3')")
            bs = q.get("weight_block_size", [128, 128])
            need(isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs),
                 f"`quantization_config.weight_block_size` must be two positive integers, got {bs!r}")
        return self

    def _validate_moe(self, need) -> None:
        need(self.moe_intermediate_size > 0, f"`moe_intermediate_size` must be > 0, got {self.moe_intermediate_size}")
        need(self.n_shared_experts >= 0, f"`n_shared_experts` must be >= 0, got {self.n_shared_experts}")
        need(self.scoring_func in SCORING_FUNCS,
             f"unknown `scoring_func` {self.scoring_func!r}; expected one of {', '.join(SCORING_FUNCS)}")
        need(self.topk_method in TOPK_METHODS,
             f"unknown `topk_method` {self.topk_method!r}; expected one of {', '.join(TOPK_METHODS)}")
        need(isinstance(self.num_experts_per_tok, int) and self.num_experts_per_tok >= 1,
             f"`num_experts_per_tok` must be a positive integer, got {self.num_experts_per_tok!r}")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"`num_experts_per_tok` ({self.num_experts_per_tok}) cannot exceed `n_routed_experts` "
             f"({self.n_routed_experts})")
        need(isinstance(self.n_group, int) and self.n_group >= 1,
             f"`n_group` must be a positive integer, got {self.n_group!r}")
        need(isinstance(self.topk_group, int) and self.topk_group >= 1,
             f"`topk_group` must be a positive integer, got {self.topk_group!r}")
        need(self.n_routed_experts % self.n_group == 0,
             f"`n_routed_experts` ({self.n_routed_experts}) must be divisible by `n_group` ({self.n_group})")
        need(self.topk_group <= self.n_group,
             f"`topk_group` ({self.topk_group}) cannot exceed `n_group` ({self.n_group})")
        if self.topk_method != "greedy" and self.n_group > 1:
            per_group = self.n_routed_experts // self.n_group
            need(self.num_experts_per_tok <= self.topk_group * per_group,
                 f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds the experts left after group "
                 f"limiting (`topk_group` {self.topk_group} x {per_group} experts per group)")
            if self.topk_method == "noaux_tc":
                need(per_group >= 2,
                     f"`topk_method` 'noaux_tc' scores each group by its two best experts, so "
                     f"`n_routed_experts` / `n_group` must be >= 2, got {per_group}")
        need(self.routed_scaling_factor > 0, f"`routed_scaling_factor` must be > 0, got {self.routed_scaling_factor}")

    def _validate_rope(self, need) -> None:
        need(self.rope_theta > 0, f"`rope_theta` must be > 0, got {self.rope_theta}")
        rs = self.rope_scaling
        if rs is None:
            return
        need(isinstance(rs, dict), f"`rope_scaling` must be an object or null, got {rs!r}")
        kind = rs.get("type", rs.get("rope_type"))
        need(kind in ROPE_SCALING_TYPES,
             f"unsupported `rope_scaling.type` {kind!r}; supported: {', '.join(ROPE_SCALING_TYPES)}")
        factor = rs.get("factor")
        need(isinstance(factor, (int, float)) and factor > 0,
             f"`rope_scaling.factor` must be a positive number, got {factor!r}")
        orig = rs.get("original_max_position_embeddings")
        need(isinstance(orig, int) and orig > 0,
             f"`rope_scaling.original_max_position_embeddings` must be a positive integer, got {orig!r}")

    # ---- (de)serialization ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read either config.json dialect (official or transformers >= 5)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"`model_type` {model_type!r} is not a DeepSeek-V2/V3 model")

        # transformers >= 5 dialect -> official fields
        rope_params = d.pop("rope_parameters", None)
        if rope_params and d.get("rope_scaling") is None:
            # As transformers reads a config holding both dialects: a non-null `rope_scaling` wins;
            # otherwise `rope_parameters` does, and its `rope_theta` wins over a top-level one.
            if not isinstance(rope_params, dict):
                raise ConfigError(f"`rope_parameters` must be an object, got {rope_params!r}")
            rope_params = dict(rope_params)
            d.pop("rope_scaling", None)
            theta = rope_params.pop("rope_theta", None)
            if theta is not None:
                d["rope_theta"] = theta
            d.setdefault("rope_theta", 10000.0)
            kind = rope_params.pop("rope_type", None) or rope_params.pop("type", "default")
            rope_params.pop("type", None)
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope_params}
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            rs = dict(rs)
            kind = rs.pop("rope_type", None) or rs.get("type")
            if kind in (None, "default"):
                d["rope_scaling"] = None
            else:
                rs["type"] = kind
                d["rope_scaling"] = rs
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        d.pop("dtype", None)

        # Fields transformers writes that are derived here: check them, do not store them.
        qk_head_dim = d.pop("qk_head_dim", None)
        head_dim = d.pop("head_dim", None)
        d.pop("num_mtp_layers", None) if "num_nextn_predict_layers" in d else None
        if "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")

        # Routing defaults by model type (transformers drops these keys for deepseek_v3).
        if model_type == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("n_group", 1)
            d.setdefault("topk_group", 1)
        else:
            d.setdefault("scoring_func", "sigmoid")
            d.setdefault("topk_method", "noaux_tc")
        if d.get("q_lora_rank") == 0:  # the official inference configs spell "no q-LoRA" as 0
            d["q_lora_rank"] = None
        for key in ("n_group", "topk_group"):
            if key in d and d[key] is None:
                d[key] = 1

        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        extra.pop("architectures", None)
        extra.pop("transformers_version", None)
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        if qk_head_dim is not None and qk_head_dim != cfg.qk_head_dim:
            raise ConfigError(f"`qk_head_dim` ({qk_head_dim}) must equal `qk_nope_head_dim` + `qk_rope_head_dim` "
                              f"({cfg.qk_head_dim})")
        if head_dim is not None and head_dim != cfg.qk_rope_head_dim:
            raise ConfigError(f"`head_dim` ({head_dim}) must equal `qk_rope_head_dim` ({cfg.qk_rope_head_dim}); "
                              "transformers uses it as the rotary dimension")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The official dialect plus what transformers >= 5 needs (`rope_interleave`, routing keys)."""
        d = asdict(self)
        extra = d.pop("extra")
        arch = "DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch], **d}
        if self.quantization_config is None:
            out.pop("quantization_config")
        out.update({k: v for k, v in extra.items() if k not in out})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        except TypeError as e:  # a field with a wrong JSON type that the dataclass rejects
            raise ConfigError(f"{path}: {e}") from e

    def save(self, directory: str | os.PathLike) -> Path:
        from .io_utils import atomic_write_text

        path = Path(directory) / "config.json"
        atomic_write_text(path, self.to_json())
        return path

    def replace(self, **changes: Any) -> "ModelConfig":
        d = asdict(self)
        d.update(changes)
        return ModelConfig(**d).validate()


# ---- presets ---------------------------------------------------------------------------------

def _yarn(factor: float, orig: int, mscale: float, mscale_all_dim: float) -> dict[str, Any]:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: every mechanism present (q-LoRA, dense + MoE layers, groups, shared expert, MTP).
    "tiny": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=352, moe_intermediate_size=64,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
        max_position_embeddings=2048, torch_dtype="float32",
    ),
    # Benchmarks (fixed by the issue tracker; do not change).
    "bench": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
        num_nextn_predict_layers=1, torch_dtype="float32",
    ),
    # Default model of the training demo: trains on 2 CPU cores in minutes.
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=704, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        max_position_embeddings=1024, num_nextn_predict_layers=1, torch_dtype="float32",
    ),
    # The real architectures (deepseek-ai/DeepSeek-V3 config.json; also V3.1, R1).
    "deepseek-v3": dict(
        rope_scaling=_yarn(40, 4096, 1.0, 1.0),
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    ),
    "deepseek-v2": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        routed_scaling_factor=16.0, scoring_func="softmax", topk_method="group_limited_greedy",
        norm_topk_prob=False, first_k_dense_replace=1, num_nextn_predict_layers=0,
        rope_scaling=_yarn(40, 4096, 0.707, 0.707), bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        first_k_dense_replace=1, num_nextn_predict_layers=0, rope_scaling=_yarn(40, 4096, 0.707, 0.707),
        bos_token_id=100000, eos_token_id=100001,
    ),
    "moonlight-16b-a3b": dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446,
        first_k_dense_replace=1, max_position_embeddings=8192, rope_theta=50000.0, rope_scaling=None,
        rms_norm_eps=1e-5, num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163586,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset as a validated `ModelConfig`, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    d = {**copy.deepcopy(PRESETS[name]), **overrides}
    return ModelConfig.from_dict(d)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction m(s, a) = 0.1 * a * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
