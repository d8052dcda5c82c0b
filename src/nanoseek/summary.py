"""`nanoseek inspect`: parameter counts, KV-cache bytes and FLOPs per token of a model config.

Everything is counted from real parameter shapes: `summarize` builds `DeepseekV3ForCausalLM(cfg)`
under `torch.device("meta")` (shapes only, no storage: the 671B model takes ~50 ms and no memory)
and walks `named_parameters`. Nothing is a closed-form guess that could drift from the model code.

Definitions (also written into the JSON under "definitions"):

* **total** -- parameters of the main model (no MTP), the shared embedding and `lm_head` counted once
  each. DeepSeek-V3: 671.03B, the "671B".
* **total_with_mtp** -- plus the MTP modules' own parameters (`eh_proj`, norms, decoder block);
  their embedding and output head *are* the main model's, so they are not counted again.
* **total_with_mtp_as_stored** -- what the official checkpoint holds: each MTP module also stores
  copies of the embedding (`model.layers.61.embed_tokens`) and head (`shared_head.head`), so those
  are counted again per module. DeepSeek-V3: 684.49B, the Hub's "685B" (671B + 14B MTP).
  Tensors that are not parameters (the router correction bias, FP8 `weight_scale_inv`) are counted
  separately under "checkpoint", never in these totals.
* **activated** -- parameters a token touches, DeepSeek's convention: everything except the routed
  experts it was not sent to (k of E per MoE layer), with the *whole* embedding matrix and head
  counted. DeepSeek-V3: 37.55B (the paper's "37B").
* **activated_excl_embedding** -- the same without the embedding matrix (a lookup reads one row of
  hidden_size numbers, which is not a matmul). DeepSeek-V3: 36.63B; README_WEIGHTS says 36.7B while
  claiming to include both embedding and head -- our arithmetic cannot reproduce that combination.
* **KV cache** (bytes per token, BF16 = 2 bytes): latent cache num_hidden_layers x (kv_lora_rank +
  qk_rope_head_dim) x 2 (70,272 for V3); expanded MHA-style cache num_hidden_layers x heads x
  (qk_head_dim + v_head_dim) x 2 (what a naive implementation would hold).
* **FLOPs per token** at sequence length S (default 4096), counting a multiply-add as 2 FLOPs:
  forward = 2 x N + A, training = 3 x forward = 6 x N + 3 x A, where N = activated matmul parameters
  (activated_excl_embedding minus the norm vectors) and A = causal attention, expanded (training)
  form: per layer 2 x heads x (qk_head_dim + v_head_dim) x (S + 1) / 2 (QK^T and PV over the mean
  causal context). The MTP module is excluded (reported separately). For DeepSeek-V3 this gives
  250.5 GFLOPs/token for training at S = 4096, matching the 250 of the ISCA '25 paper (Table 2);
  DeepSeek-V2 gives 155.3 against the same table's 155.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, ConfigError, ModelConfig, preset

BF16_BYTES = 2
DEFAULT_SEQ_LEN = 4096

# Published figures for the real presets (spec §1.1, §1.2, §10.1, §10.2), shown next to ours.
PUBLISHED: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "total": "671B (main model)",
        "total_with_mtp_as_stored": "685B on the Hub (671B + 14B MTP)",
        "activated": "37B (paper); 36.7B (README_WEIGHTS)",
        "kv_latent_bytes_per_token": "70,272 (ISCA '25 Table 1)",
        "training_gflops_per_token": "250 at seq 4096 (ISCA '25 Table 2)",
    },
    "deepseek-v2": {
        "total": "236B", "activated": "21B",
        "training_gflops_per_token": "155 at seq 4096 (ISCA '25 Table 2)",
    },
    "deepseek-v2-lite": {"total": "15.7B", "activated": "2.4B"},
    "moonlight-16b-a3b": {"total": "~16B", "activated": "~3B"},
}

DEFINITIONS: dict[str, str] = {
    "total": "main model parameters (no MTP); shared embedding and lm_head counted once each",
    "total_with_mtp": "total + the MTP modules' own parameters; their embedding/head are the main model's, not recounted",
    "total_with_mtp_as_stored": "total_with_mtp + the copies of embedding and head each MTP module stores in the "
                                "official checkpoint (model.layers.{L+k}.embed_tokens, shared_head.head)",
    "activated": "parameters one token uses in the main model: all but the routed experts it skips (k of E per "
                 "MoE layer); whole embedding matrix and lm_head included (DeepSeek's convention)",
    "activated_excl_embedding": "activated without the embedding matrix (a lookup reads one row, not a matmul)",
    "matmul_params_per_token": "activated_excl_embedding without norm vectors: the weights a token multiplies by",
    "kv_cache": "bytes per token in BF16: latent = layers x (kv_lora_rank + qk_rope_head_dim) x 2; "
                "expanded MHA = layers x heads x (qk_head_dim + v_head_dim) x 2",
    "flops": "per token at seq_len S, multiply-add = 2 FLOPs: forward = 2 N + A, training = 6 N + 3 A; "
             "N = matmul_params_per_token, A = sum over layers of 2 x heads x (qk_head_dim + v_head_dim) x (S+1)/2 "
             "(causal attention, expanded form); MTP excluded unless named",
}


# ---- counting --------------------------------------------------------------------------------

def _meta_model(cfg: ModelConfig) -> torch.nn.Module:
    from .model import DeepseekV3ForCausalLM

    with torch.device("meta"):
        return DeepseekV3ForCausalLM(cfg)


def _component(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """Parameter name -> (component, layer index or None)."""
    if name == "model.embed_tokens.weight":
        return "embedding", None
    if name == "lm_head.weight":
        return "lm_head", None
    if name == "model.norm.weight":
        return "norms", None
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return "other", None
    idx = int(parts[2])
    rest = ".".join(parts[3:])
    if idx >= cfg.num_hidden_layers:
        return "mtp", idx
    if rest.startswith("self_attn."):
        return "attention", idx  # includes the latent norms q_a_layernorm / kv_a_layernorm
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return "norms", idx
    if rest.startswith("mlp.experts."):
        return "routed_experts", idx
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts", idx
    if rest == "mlp.gate.weight":
        return "router", idx
    if rest.startswith("mlp."):
        return "dense_mlp", idx
    return "other", idx


def _mtp_part(name: str) -> str:
    rest = ".".join(name.split(".")[3:])
    if rest.startswith("self_attn."):
        return "attention"
    if rest.startswith("mlp.experts."):
        return "routed_experts"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    if rest == "mlp.gate.weight":
        return "router"
    if rest.startswith("mlp."):
        return "dense_mlp"
    if rest == "eh_proj.weight":
        return "eh_proj"
    return "norms"  # enorm, hnorm, shared_head.norm, input/post_attention_layernorm


def _fp8_stored(name: str, cfg: ModelConfig) -> bool:
    """Whether the official FP8 checkpoint stores this weight as FP8 (spec §6.2): every Linear inside a
    decoder block except the router; the embedding, head, norms and MTP extras stay BF16."""
    if cfg.quantization_config is None or not name.startswith("model.layers."):
        return False
    rest = ".".join(name.split(".")[3:])
    return (rest.startswith("self_attn.") or rest.startswith("mlp.")) and rest != "mlp.gate.weight" \
        and not rest.endswith("layernorm.weight")


def _ceil_blocks(shape: tuple[int, int], block: list[int]) -> int:
    return math.ceil(shape[0] / block[0]) * math.ceil(shape[1] / block[1])


COMPONENT_ORDER = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router",
                   "norms", "lm_head", "other")


def summarize(cfg: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, Any]:
    """Parameter counts, KV-cache bytes and FLOPs per token of `cfg`, as a JSON-ready dict (pure)."""
    cfg.validate()
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    model = _meta_model(cfg)
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    route_frac = k / E if E else 0.0

    named = list(model.named_parameters(remove_duplicate=False))
    # The embedding owns a shared (tied) tensor, so put it first; everything else keeps module order.
    named.sort(key=lambda np_: np_[0] != "model.embed_tokens.weight")

    comp_total: dict[str, int] = {c: 0 for c in COMPONENT_ORDER}
    comp_layers: dict[str, set[int]] = {c: set() for c in COMPONENT_ORDER}
    comp_matmul: dict[str, int] = {c: 0 for c in COMPONENT_ORDER}
    mtp_parts: dict[str, int] = {}
    mtp_matmul_active = 0
    mtp_active = 0
    stored_copies = 0
    n_norm_vectors = n_experts = 0
    seen: set[int] = set()
    # Official-layout checkpoint bookkeeping (experts split per expert, FP8 + scales where stored so).
    ckpt_tensors = ckpt_elems = ckpt_bytes = 0
    wdtype = getattr(torch, cfg.torch_dtype or "bfloat16", None)
    wdtype_bytes = wdtype.itemsize if isinstance(wdtype, torch.dtype) else BF16_BYTES
    block = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])

    for name, p in named:
        n = p.numel()
        comp, idx = _component(name, cfg)
        duplicate = id(p) in seen
        seen.add(id(p))
        if duplicate and comp != "mtp":
            continue  # a tied lm_head: one tensor, stored once
        # -- checkpoint layout (MTP modules store their own copies of the shared embedding and head)
        if p.dim() == 3:  # stacked experts [E, out, in] -> E tensors [out, in]
            per, shape = p.shape[0], tuple(p.shape[1:])
            if name.endswith("gate_up_proj"):  # gate and up are separate tensors on disk
                per, shape = 2 * per, (shape[0] // 2, shape[1])
        else:
            per, shape = 1, tuple(p.shape)
        ckpt_tensors += per
        ckpt_elems += n
        if _fp8_stored(name, cfg) and len(shape) == 2:
            scales = per * _ceil_blocks(shape, block)
            ckpt_tensors += per
            ckpt_elems += scales
            ckpt_bytes += n * 1 + scales * 4
        else:
            ckpt_bytes += n * wdtype_bytes
        if duplicate:
            stored_copies += n
            continue
        # -- parameter accounting
        is_norm = p.dim() == 1
        active = n * route_frac if ".mlp.experts." in name else n
        if comp == "mtp":
            part = _mtp_part(name)
            mtp_parts[part] = mtp_parts.get(part, 0) + n
            mtp_active += active
            mtp_matmul_active += 0 if is_norm else active
            continue
        comp_total[comp] += n
        if idx is not None:
            comp_layers[comp].add(idx)
        if comp == "routed_experts" and name.endswith("gate_up_proj"):
            n_experts += p.shape[0]
        if comp == "norms":
            n_norm_vectors += 1
        if not is_norm and comp != "embedding":
            comp_matmul[comp] += active

    for _, b in model.named_buffers():  # router correction bias: stored in fp32, not a parameter
        ckpt_tensors += 1
        ckpt_elems += b.numel()
        ckpt_bytes += b.numel() * 4

    total = sum(comp_total.values())
    mtp_unique = sum(mtp_parts.values())
    n_moe = len(comp_layers["router"])
    n_dense = len(comp_layers["dense_mlp"])

    def activated_of(c: str) -> int:
        return round(comp_total[c] * route_frac) if c == "routed_experts" else comp_total[c]

    counts = {"embedding": 1, "attention": len(comp_layers["attention"]), "dense_mlp": n_dense,
              "routed_experts": n_experts, "shared_experts": len(comp_layers["shared_experts"]), "router": n_moe,
              "norms": n_norm_vectors, "lm_head": 1 if comp_total["lm_head"] else 0, "other": len(comp_layers["other"])}
    units = {"embedding": "matrix", "attention": "layer", "dense_mlp": "layer", "routed_experts": "expert",
             "shared_experts": "layer", "router": "layer", "norms": "vector", "lm_head": "matrix", "other": "-"}
    components = []
    for c in COMPONENT_ORDER:
        if c == "other" and comp_total[c] == 0:
            continue
        cnt = counts[c]
        components.append({
            "name": c, "count": cnt, "unit": units[c],
            "per_unit": comp_total[c] // cnt if cnt and comp_total[c] % cnt == 0 else None,
            "total": comp_total[c], "activated": activated_of(c),
        })
    if D:
        components.append({"name": "mtp", "count": D, "unit": "module", "per_unit": mtp_unique // D,
                           "total": mtp_unique, "activated": round(mtp_active)})
        if stored_copies:
            components.append({"name": "mtp_stored_copies", "count": D, "unit": "module",
                               "per_unit": stored_copies // D, "total": stored_copies, "activated": 0})

    activated = sum(x["activated"] for x in components if x["name"] in COMPONENT_ORDER)
    activated_excl_embedding = activated - comp_total["embedding"]
    matmul_active = round(sum(comp_matmul.values()))

    # -- KV cache
    latent_layer = cfg.kv_cache_dim * BF16_BYTES
    expanded_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * BF16_BYTES
    kv = {
        "dtype": "bfloat16",
        "latent_bytes_per_token_per_layer": latent_layer,
        "latent_bytes_per_token": L * latent_layer,
        "latent_bytes_per_token_with_mtp": (L + D) * latent_layer,
        "expanded_mha_bytes_per_token": L * expanded_layer,
        "expanded_over_latent": round(expanded_layer / latent_layer, 2),
    }

    # -- FLOPs
    attn_fwd_layer = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    attn_fwd = L * attn_fwd_layer
    fwd = 2 * matmul_active + attn_fwd
    # An MTP module multiplies by its own weights and by lm_head again, and attends over one more layer.
    mtp_matmul = round(mtp_matmul_active) + D * comp_total["lm_head"]
    mtp_fwd = D * attn_fwd_layer + 2 * mtp_matmul
    flops = {
        "seq_len": seq_len,
        "matmul_params_per_token": matmul_active,
        "attention_forward_per_token": round(attn_fwd),
        "forward_per_token": round(fwd),
        "training_per_token": round(3 * fwd),
        "training_per_token_with_mtp": round(3 * (fwd + mtp_fwd)),
        "decode_matmul_per_token": 2 * matmul_active,
    }

    checkpoint = {
        "layout": "official Hugging Face tensors (per-expert, MTP copies included)"
                  + (", FP8 weights + f32 weight_scale_inv" if cfg.quantization_config else ""),
        "tensors": ckpt_tensors,
        "elements": ckpt_elems,
        "bytes": ckpt_bytes,
    }

    return {
        "model_type": cfg.model_type,
        "architecture": {
            "num_hidden_layers": L, "dense_layers": n_dense, "moe_layers": n_moe, "mtp_modules": D,
            "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_head_dim": cfg.qk_head_dim, "v_head_dim": cfg.v_head_dim,
            "n_routed_experts": E, "num_experts_per_tok": k, "n_shared_experts": cfg.n_shared_experts,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "params": {
            "total": total,
            "total_with_mtp": total + mtp_unique,
            "total_with_mtp_as_stored": total + mtp_unique + stored_copies,
            "mtp_unique": mtp_unique,
            "mtp_stored_copies": stored_copies,
            "activated": activated,
            "activated_excl_embedding": activated_excl_embedding,
            "mtp_activated": round(mtp_active),
            "mtp_activated_with_embedding_and_head": round(mtp_active) + comp_total["embedding"] + comp_total["lm_head"]
            if D else 0,
            "mtp_parts": dict(sorted(mtp_parts.items())),
        },
        "components": components,
        "kv_cache": kv,
        "flops": flops,
        "checkpoint": checkpoint,
        "definitions": DEFINITIONS,
    }


# ---- loading and printing --------------------------------------------------------------------

def load_config(model: str) -> tuple[ModelConfig, str]:
    """A preset name or a directory with config.json (or the config.json path) -> (config, source).

    A preset name wins over a same-named directory; write `./tiny` to mean the directory.
    """
    if model in PRESETS:
        return preset(model), "preset"
    path = Path(model)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"directory {model!r} has no config.json")
        return ModelConfig.from_json_file(cfg_path), str(cfg_path)
    if path.is_file() and path.suffix == ".json":
        return ModelConfig.from_json_file(path), str(path)
    raise ConfigError(f"{model!r} is neither a preset nor a model directory; presets: {', '.join(PRESETS)}")


def _fmt(n: float | int | None) -> str:
    if n is None:
        return "-"
    a = abs(n)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if a >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.2f}"


def _fmt_bytes(n: int) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,} B"


def _fmt_flops(n: float) -> str:
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP")):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_summary(s: dict[str, Any], title: str = "") -> str:
    """The human-readable report of a `summarize` dict: aligned tables, B/M units."""
    a, p, kv, fl, ck = s["architecture"], s["params"], s["kv_cache"], s["flops"], s["checkpoint"]
    lines = []
    if title:
        lines += [title, ""]
    lines.append(
        f"{s['model_type']}: {a['num_hidden_layers']} layers ({a['dense_layers']} dense + {a['moe_layers']} MoE)"
        f" + {a['mtp_modules']} MTP, hidden {a['hidden_size']}, {a['num_attention_heads']} heads, "
        f"{a['n_routed_experts']} routed experts (top-{a['num_experts_per_tok']}) + {a['n_shared_experts']} shared, "
        f"vocab {a['vocab_size']:,}")
    lines.append("")
    rows = [["component", "count", "per unit", "total", "activated/token"]]
    for c in s["components"]:
        rows.append([c["name"], f"{c['count']:,} {c['unit']}{'s' if c['count'] != 1 else ''}",
                     _fmt(c["per_unit"]), _fmt(c["total"]), _fmt(c["activated"])])
    lines += _table(rows, right={1, 2, 3, 4})
    lines.append("")
    kv_rows = [
        ["parameters", "", ""],
        ["total (main model, no MTP)", _fmt(p["total"]), f"{p['total']:,}"],
        ["total with MTP (embedding/head once)", _fmt(p["total_with_mtp"]), f"{p['total_with_mtp']:,}"],
        ["total with MTP as stored (+ MTP copies of embedding/head)", _fmt(p["total_with_mtp_as_stored"]),
         f"{p['total_with_mtp_as_stored']:,}"],
        ["activated/token (incl. embedding + lm_head)", _fmt(p["activated"]), f"{p['activated']:,}"],
        ["activated/token (excl. embedding)", _fmt(p["activated_excl_embedding"]),
         f"{p['activated_excl_embedding']:,}"],
    ]
    if a["mtp_modules"]:
        kv_rows.append(["MTP activated/token (own parameters)", _fmt(p["mtp_activated"]),
                        f"{_fmt(p['mtp_activated_with_embedding_and_head'])} with embedding + head"])
    kv_rows += [
        ["KV cache per token (bf16)", "", ""],
        ["latent (kv_lora_rank + qk_rope_head_dim per layer)", f"{kv['latent_bytes_per_token']:,} B",
         f"{kv['latent_bytes_per_token_per_layer']:,} B/layer"],
        ["latent incl. MTP layers", f"{kv['latent_bytes_per_token_with_mtp']:,} B", ""],
        ["expanded MHA (heads x (qk_head_dim + v_head_dim))", f"{kv['expanded_mha_bytes_per_token']:,} B",
         f"{kv['expanded_over_latent']}x latent"],
        [f"FLOPs per token (seq {fl['seq_len']:,})", "", ""],
        ["N = matmul params/token", _fmt(fl["matmul_params_per_token"]), "activated excl. embedding and norms"],
        ["A = attention scores + values (forward, causal)", _fmt_flops(fl["attention_forward_per_token"]), ""],
        ["forward 2N + A", _fmt_flops(fl["forward_per_token"]), ""],
        ["training 6N + 3A", _fmt_flops(fl["training_per_token"]), ""],
        ["training incl. MTP", _fmt_flops(fl["training_per_token_with_mtp"]), ""],
        ["checkpoint (official layout)", "", ""],
        ["tensors", f"{ck['tensors']:,}", ""],
        ["elements (incl. FP8 scales, router bias)", _fmt(ck["elements"]), ""],
        ["bytes", _fmt_bytes(ck["bytes"]), f"{ck['bytes']:,} B"],
    ]
    width = max(len(r[0]) for r in kv_rows if r[1] or r[2]) + 2
    vwidth = max(len(r[1]) for r in kv_rows)
    for label, v, extra in kv_rows:
        if not v and not extra:
            lines.append(label)
        else:
            lines.append(f"  {label.ljust(width)}{v.rjust(vwidth)}  {extra}".rstrip())
    if s.get("published"):
        lines += ["", "published"]
        w = max(len(key) for key in s["published"]) + 2
        lines += [f"  {key.ljust(w)}{val}" for key, val in s["published"].items()]
    return "\n".join(lines)


def run_inspect(model: str, as_json: bool = False) -> int:
    """`nanoseek inspect PRESET|DIR [--json]`: print the summary; ConfigError for an unknown model."""
    cfg, source = load_config(model)
    s = {"model": model, "source": source, **summarize(cfg)}
    if source == "preset" and model in PUBLISHED:
        s["published"] = PUBLISHED[model]
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s, title=f"nanoseek inspect {model} ({source})"))
    return 0
