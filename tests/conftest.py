"""Shared fixtures: random checkpoints written by transformers itself, the numerical oracle."""

from __future__ import annotations

import copy
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The scheduler and prefix-cache suites compare batched outputs with the engine's one-by-one
# outputs on one device. They run on CPU in CI; NANOSEEK_TEST_DEVICE=cuda runs the same oracles on
# a GPU (CUDA graphs, the GPU expert path), where a batching bug could hide behind other kernels.
TEST_DEVICE = os.environ.get("NANOSEEK_TEST_DEVICE", "cpu")

TINY = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=352, moe_intermediate_size=64,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, max_position_embeddings=2048, num_nextn_predict_layers=1,
)


def random_experts(cfg, gen: torch.Generator, std: float):
    """A stack of routed experts with normal(0, std) weights drawn from `gen`."""
    from nanoseek.model.moe import Experts

    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, std, generator=gen)
        ex.down_proj.normal_(0, std, generator=gen)
    return ex


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.08, bias_std: float = 0.0) -> None:
    """Weights large enough that every mechanism moves the logits; norms near, not at, one."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(bias_std * torch.randn(b.shape, generator=g))


def hf_checkpoint(tmp_path, overrides: dict | None = None, seed: int = 0, bias_std: float = 0.05,
                  family: str = "v3"):
    """Build a random transformers DeepSeek model, save it with save_pretrained; return (dir, hf_model)."""
    transformers = pytest.importorskip("transformers")
    cfg = copy.deepcopy(TINY)
    cfg.update(overrides or {})
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # HF's default (128) breaks its eager path
    if family == "v3":
        hf_cfg = transformers.DeepseekV3Config(**cfg)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        for k in ("num_nextn_predict_layers",):
            cfg.pop(k, None)
        hf_cfg = transformers.DeepseekV2Config(**cfg)
        cls = transformers.DeepseekV2ForCausalLM
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    randomize(model, seed, bias_std=bias_std)
    path = tmp_path / f"hf-{family}-{seed}"
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def tiny_model():
    import nanoseek

    model = nanoseek.load_model("tiny")
    randomize(model, 1, bias_std=0.05)
    return model


@pytest.fixture(autouse=True)
def _check_host_positions(monkeypatch):
    """Every decode step in the tests checks that the positions the engine tracks on the host (to
    avoid waiting for the device) equal the device's."""
    from nanoseek.engine import engine

    monkeypatch.setattr(engine, "CHECK_POSITIONS", True)


class CharTokenizer:
    """A stand-in with the plain tokenizer interface (encode, decode, bos_id, eos_id) that Engine
    accepts: one character per token id."""

    bos_id, eos_id = 0, 1

    def encode(self, text, add_bos=False):
        return ([0] if add_bos else []) + [ord(c) - 0x4E00 for c in text]

    def decode(self, ids, skip_special=False):
        return "".join(chr(0x4E00 + i) for i in ids)
