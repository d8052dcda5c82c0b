"""Logit parity with transformers' DeepSeek-V3 / V2 on random checkpoints it wrote itself."""

from __future__ import annotations

import zlib

import pytest
import torch

import nanoseek
from conftest import hf_checkpoint

TOL = 1e-4

CASES = {
    "tiny": {},
    "yarn_mscale_0.707": dict(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=256),
    "yarn_mscale_ne_mscale_all_dim": dict(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
        max_position_embeddings=256),
    "group_limited_4_groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "no_q_lora": dict(q_lora_rank=None),
    "three_dense_layers": dict(num_hidden_layers=4, first_k_dense_replace=3),
    "two_shared_top3": dict(n_shared_experts=2, num_experts_per_tok=3, topk_group=2),
    "moonlight_like_theta_50000_eps_1e-5": dict(rope_theta=50000.0, rms_norm_eps=1e-5, routed_scaling_factor=2.446),
    # configurations the cases above leave out
    "rope_not_interleaved": dict(rope_interleave=False),
    "one_group_sigmoid_unnormalized_no_dense": dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                                    first_k_dense_replace=0, routed_scaling_factor=3.0),
    "yarn_factor_40_v3": dict(
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=2560),
    "no_shared_experts": dict(n_shared_experts=0),
}


def _compare(path, hf_model, T: int, seed: int = 0, batch: int = 2) -> float:
    model = nanoseek.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf_model(ids).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    # crc32, not hash(): str hashes change from process to process, and so would the weights
    path, hf_model = hf_checkpoint(tmp_path, CASES[case], seed=zlib.crc32(case.encode()) % 1000)
    T = 160 if "yarn" in case else 48  # YaRN cases run past the original context (64)
    diff = _compare(path, hf_model, T)
    print(f"parity {case}: max|diff| = {diff:.2e}")
    assert diff <= TOL, f"{case}: max abs logit difference {diff:.3e} > {TOL}"


def test_logits_match_transformers_512_tokens(tmp_path):
    path, hf_model = hf_checkpoint(tmp_path, {}, seed=7)
    diff = _compare(path, hf_model, T=512, batch=1)
    print(f"parity 512 tokens: max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_logits_are_sensitive_to_the_routing_bias(tmp_path):
    """Guards the parity test itself: the correction bias must actually change routing and logits."""
    path, hf_model = hf_checkpoint(tmp_path, {}, seed=3, bias_std=0.2)
    model = nanoseek.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("method,extra", [
    ("greedy", dict(n_group=1, topk_group=1)),
    ("group_limited_greedy", dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)),
])
def test_v2_family_matches_transformers_deepseek_v2(tmp_path, method, extra):
    """Softmax scoring, no correction bias, no q-LoRA (V2-Lite style): oracle is DeepseekV2ForCausalLM."""
    overrides = dict(q_lora_rank=None, topk_method=method, norm_topk_prob=False, routed_scaling_factor=1.5,
                     n_shared_experts=2, **extra)
    path, hf_model = hf_checkpoint(tmp_path, overrides, seed=11, family="v2")
    model = nanoseek.load_model(path, dtype=torch.float32)
    assert model.config.scoring_func == "softmax" and model.config.topk_method == method
    assert model.config.num_nextn_predict_layers == 0
    diff = _compare(path, hf_model, T=48)
    print(f"parity v2 {method}: max|diff| = {diff:.2e}")
    assert diff <= TOL
