"""ModelConfig: both config.json dialects, validation messages, presets."""

from __future__ import annotations

import json

import pytest

from nanoseek.config import ConfigError, ModelConfig, PRESETS, preset

# The official deepseek-ai/DeepSeek-V3 config.json (the fields that matter), as published.
OFFICIAL_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                           "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                           "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False,
}


def test_official_config_is_the_deepseek_v3_preset():
    cfg = ModelConfig.from_dict(OFFICIAL_V3)
    ref = preset("deepseek-v3")
    for f in ("hidden_size", "n_routed_experts", "q_lora_rank", "rope_scaling", "rope_theta", "scoring_func",
              "topk_method", "num_nextn_predict_layers", "quantization_config", "first_k_dense_replace"):
        assert getattr(cfg, f) == getattr(ref, f), f
    assert cfg.qk_head_dim == 192 and cfg.kv_cache_dim == 576
    assert cfg.extra["auto_map"]["AutoConfig"] == "configuration_deepseek.DeepseekV3Config"
    assert cfg.to_dict()["auto_map"] == OFFICIAL_V3["auto_map"]  # unknown keys survive a round trip


def test_transformers_v5_dialect(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=64,
        intermediate_size=256,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "mscale": 0.707,
                      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "scoring_func" not in raw and "rope_theta" not in raw  # the v5 dialect
    cfg = ModelConfig.from_json_file(tmp_path / "config.json")
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.rope_scaling["mscale_all_dim"] == 0.707
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"  # implied by deepseek_v3
    assert cfg.q_lora_rank is None


def test_both_rope_dialects_in_one_file_are_read_as_transformers_reads_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    yarn = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 512,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    base = {k: v for k, v in OFFICIAL_V3.items() if k not in ("rope_scaling", "rope_theta", "auto_map")}
    for extra, want in (({"rope_scaling": None}, (50000.0, "yarn", 4.0)),
                        ({"rope_theta": 10000.0}, (50000.0, "yarn", 4.0)),
                        ({"rope_scaling": {**{k: v for k, v in yarn.items() if k != "rope_theta"}, "factor": 2.0},
                          "rope_theta": 20000.0}, (20000.0, "yarn", 2.0))):
        (tmp_path / "config.json").write_text(json.dumps({**base, "rope_parameters": yarn, **extra}))
        hf = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
        cfg = ModelConfig.from_json_file(tmp_path / "config.json")
        assert (cfg.rope_theta, cfg.rope_scaling["type"], cfg.rope_scaling["factor"]) == (
            hf["rope_theta"], hf["rope_type"], hf["factor"]) == want, extra


def test_v5_dialect_inconsistent_derived_field():
    d = dict(OFFICIAL_V3, qk_head_dim=100)
    with pytest.raises(ConfigError, match=r"`qk_head_dim` \(100\) must equal"):
        ModelConfig.from_dict(d)
    d = dict(OFFICIAL_V3, head_dim=128)
    with pytest.raises(ConfigError, match=r"`head_dim` \(128\) must equal `qk_rope_head_dim` \(64\)"):
        ModelConfig.from_dict(d)


def test_v2_defaults_and_official_zero_q_lora():
    d = {k: v for k, v in PRESETS["deepseek-v2-lite"].items() if k not in ("scoring_func", "topk_method")}
    cfg = ModelConfig.from_dict({**d, "q_lora_rank": 0})
    assert cfg.q_lora_rank is None  # the official inference configs write 0 for "no q-LoRA"
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "greedy"  # deepseek_v2 defaults


@pytest.mark.parametrize("change,message", [
    ({"n_routed_experts": 10, "n_group": 4}, r"`n_routed_experts` \(10\) must be divisible by `n_group` \(4\)"),
    ({"topk_group": 3, "n_group": 2}, r"`topk_group` \(3\) cannot exceed `n_group` \(2\)"),
    ({"num_experts_per_tok": 9}, r"`num_experts_per_tok` \(9\) cannot exceed `n_routed_experts` \(8\)"),
    ({"scoring_func": "relu"}, r"unknown `scoring_func` 'relu'"),
    ({"topk_method": "best"}, r"unknown `topk_method` 'best'"),
    ({"num_experts_per_tok": 5}, r"exceeds the experts left after group limiting"),
    ({"qk_rope_head_dim": 7}, r"`qk_rope_head_dim` must be even"),
    ({"hidden_size": 0}, r"`hidden_size` must be a positive integer"),
    ({"rope_scaling": {"type": "ntk", "factor": 2}}, r"unsupported `rope_scaling.type` 'ntk'"),
    ({"rope_scaling": {"type": "yarn", "factor": -1, "original_max_position_embeddings": 8}},
     r"`rope_scaling.factor` must be a positive number"),
    ({"model_type": "llama"}, r"`model_type` 'llama' is not a DeepSeek"),
    ({"quantization_config": {"quant_method": "awq"}}, r"`quantization_config.quant_method` 'awq'"),
    ({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, r"'noaux_tc' scores each group by its two best"),
    ({"moe_intermediate_size": 64.0}, r"`moe_intermediate_size` must be an integer, got 64.0"),
    ({"n_shared_experts": 1.5}, r"`n_shared_experts` must be an integer"),
    ({"tie_word_embeddings": "false"}, r"`tie_word_embeddings` must be true or false, got 'false'"),
    ({"routed_scaling_factor": float("inf")}, r"`routed_scaling_factor` must be a finite number"),
    ({"rms_norm_eps": float("nan")}, r"`rms_norm_eps` must be a finite number"),
    ({"torch_dtype": "float64"}, r"`torch_dtype` must be float32, bfloat16 or float16"),
])
def test_validation_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **change)


def test_presets_are_valid_and_match_the_spec():
    for name in PRESETS:
        preset(name)
    b = preset("bench")
    assert (b.vocab_size, b.hidden_size, b.intermediate_size, b.moe_intermediate_size, b.num_hidden_layers) == \
        (8192, 512, 1408, 256, 6)
    assert (b.num_attention_heads, b.q_lora_rank, b.kv_lora_rank, b.qk_nope_head_dim, b.qk_rope_head_dim,
            b.v_head_dim) == (8, 192, 128, 32, 16, 32)
    assert (b.n_routed_experts, b.n_shared_experts, b.num_experts_per_tok, b.n_group, b.topk_group) == (32, 1, 4, 4, 2)
    assert b.routed_scaling_factor == 2.5 and b.norm_topk_prob and not b.tie_word_embeddings
    assert b.max_position_embeddings == 4096 and b.num_nextn_predict_layers == 1
    v2l = preset("deepseek-v2-lite")
    assert v2l.scoring_func == "softmax" and v2l.topk_method == "greedy" and v2l.q_lora_rank is None
    ml = preset("moonlight-16b-a3b")
    assert ml.rope_scaling is None and ml.rope_theta == 50000.0 and ml.routed_scaling_factor == 2.446


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; available: tiny"):
        preset("huge")


def test_config_file_roundtrip(tmp_path):
    cfg = preset("deepseek-v2-lite")
    cfg.save(tmp_path)
    again = ModelConfig.from_json_file(tmp_path / "config.json")
    assert again == cfg


def test_wrong_json_types_are_config_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    with pytest.raises(ConfigError, match="`hidden_size` must be a positive integer"):
        ModelConfig.from_json_file(tmp_path / "config.json")
