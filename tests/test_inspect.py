"""`nanoseek inspect`: parameter counts, KV-cache bytes and FLOPs, against published figures and real models."""

from __future__ import annotations

import json
import time

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import PRESETS, ConfigError, ModelConfig, preset
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.summary import run_inspect, summarize


def inspect_json(capsys, model: str) -> dict:
    assert main(["inspect", model, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def v3() -> dict:
    return summarize(preset("deepseek-v3"))


def test_deepseek_v3_cli_json(capsys):
    s = inspect_json(capsys, "deepseek-v3")
    p, kv = s["params"], s["kv_cache"]
    assert s["source"] == "preset"
    assert abs(p["total"] / 671.0e9 - 1) < 0.005
    assert abs(p["total_with_mtp_as_stored"] / 685e9 - 1) < 0.01
    assert 36.5e9 < p["activated"] < 38e9
    assert 36.5e9 < p["activated_excl_embedding"] < p["activated"]
    assert kv["latent_bytes_per_token"] == 70272
    assert kv["expanded_mha_bytes_per_token"] == 61 * 128 * ((128 + 64) + 128) * 2 == 4_997_120
    assert kv["latent_bytes_per_token_with_mtp"] == 62 * (512 + 64) * 2
    assert "published" in s and "definitions" in s


def test_deepseek_v3_exact_counts(v3):
    """Own arithmetic from the config (spec §1.2), independent of the model code."""
    H, V, L = 7168, 129280, 61
    attn = H * 1536 + 1536 + 1536 * 128 * 192 + H * 576 + 512 + 512 * 128 * 256 + 128 * 128 * H
    dense = 3 * H * 18432
    expert = 3 * H * 2048
    moe = 256 * expert + expert + 256 * H  # routed + shared + router
    norms = 2 * H
    main_total = 2 * V * H + H + L * (attn + norms) + 3 * dense + 58 * moe
    mtp = 2 * H * H + 3 * H + attn + norms + moe  # eh_proj, enorm/hnorm/shared_head.norm, block
    p = v3["params"]
    assert attn == 187_107_328
    assert p["total"] == main_total == 671_026_404_352
    assert p["mtp_unique"] == mtp
    assert p["total_with_mtp"] == main_total + mtp
    assert p["mtp_stored_copies"] == 2 * V * H
    assert p["total_with_mtp_as_stored"] == main_total + mtp + 2 * V * H
    activated = 2 * V * H + H + L * (attn + norms) + 3 * dense + 58 * (9 * expert + 256 * H)
    assert p["activated"] == activated  # 37.55B, spec §1.2
    assert p["activated_excl_embedding"] == activated - V * H
    comps = {c["name"]: c for c in v3["components"]}
    assert comps["attention"]["per_unit"] == attn and comps["attention"]["count"] == L
    assert comps["routed_experts"]["per_unit"] == expert and comps["routed_experts"]["count"] == 58 * 256
    assert comps["routed_experts"]["activated"] == 58 * 8 * expert
    assert comps["dense_mlp"]["total"] == 3 * dense
    assert comps["router"]["total"] == 58 * 256 * H
    assert comps["embedding"]["total"] == comps["lm_head"]["total"] == V * H
    main_rows = [c for c in v3["components"] if not c["name"].startswith("mtp")]
    assert sum(c["total"] for c in main_rows) == p["total"]
    assert sum(c["activated"] for c in main_rows) == p["activated"]


def test_deepseek_v3_flops_match_isca(v3):
    """6 N + 3 A at seq 4096 lands on the ISCA '25 figure of 250 GFLOPs/token (spec §10.2)."""
    f = v3["flops"]
    n = f["matmul_params_per_token"]
    assert n == v3["params"]["activated_excl_embedding"] - sum(  # minus norm vectors
        c["total"] for c in v3["components"] if c["name"] == "norms") - 61 * (1536 + 512)
    attn = 61 * 2 * 128 * (192 + 128) * (4096 + 1) / 2
    assert f["attention_forward_per_token"] == round(attn)
    assert f["training_per_token"] == round(6 * n + 3 * attn)
    assert abs(f["training_per_token"] / 250e9 - 1) < 0.01
    assert f["training_per_token_with_mtp"] > f["training_per_token"]
    assert abs(summarize(preset("deepseek-v2"))["flops"]["training_per_token"] / 155e9 - 1) < 0.01


def test_deepseek_v3_checkpoint_layout(v3):
    """The official FP8 checkpoint: 91,991 tensors, ~641.3 GB (spec §6.1)."""
    ck = v3["checkpoint"]
    assert ck["tensors"] == 91_991
    assert abs(ck["bytes"] / 2**30 - 641.3) < 0.1


def test_meta_build_is_quick():
    summarize(preset("tiny"))  # warm up lazy torch initialisation
    t = time.perf_counter()
    summarize(preset("deepseek-v3"))
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize("name, overrides", [("tiny", {}), ("bench", {}), ("small", {}),
                                             ("tiny", {"num_nextn_predict_layers": 2}),
                                             ("tiny", {"q_lora_rank": None, "first_k_dense_replace": 0})])
def test_counts_equal_a_real_model(name, overrides):
    cfg = preset(name, **overrides)
    s = summarize(cfg)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    unique = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates the shared tensors
    assert s["params"]["total_with_mtp"] == unique
    assert s["params"]["total"] == model.num_parameters(include_mtp=False)
    every_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert s["params"]["total_with_mtp_as_stored"] == every_name
    comps = {c["name"]: c["total"] for c in s["components"]}
    assert comps["embedding"] == model.model.embed_tokens.weight.numel()
    assert sum(v for k, v in comps.items() if k not in ("mtp", "mtp_stored_copies")) == s["params"]["total"]
    L = cfg.num_hidden_layers
    assert s["kv_cache"]["latent_bytes_per_token"] == L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    cache = model.new_cache(1, 4, dtype=torch.bfloat16)  # the model's cache holds the MTP layers too
    assert cache.nbytes_per_token() == s["kv_cache"]["latent_bytes_per_token_with_mtp"]


def test_tiny_activated_by_hand():
    cfg = preset("tiny")
    s = summarize(cfg)
    model = DeepseekV3ForCausalLM(cfg)
    L = cfg.num_hidden_layers
    routed = sum(p.numel() for n, p in model.named_parameters()
                 if ".mlp.experts." in n and int(n.split(".")[2]) < L)
    main = model.num_parameters(include_mtp=False)
    skipped = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    assert s["params"]["activated"] == main - skipped


def test_tied_embeddings_counted_once():
    cfg = preset("tiny", tie_word_embeddings=True, num_nextn_predict_layers=0)
    s = summarize(cfg)
    model = DeepseekV3ForCausalLM(cfg)
    assert s["params"]["total"] == sum(p.numel() for p in model.parameters())
    comps = {c["name"]: c["total"] for c in s["components"]}
    assert s["params"]["activated"] == s["params"]["activated_excl_embedding"] + comps["embedding"]
    assert comps["lm_head"] == 0 and comps["embedding"] == cfg.vocab_size * cfg.hidden_size


def test_directory_with_config_json(tmp_path, capsys):
    cfg = preset("bench")
    cfg.save(tmp_path)
    s = inspect_json(capsys, str(tmp_path))
    assert s["source"].endswith("config.json")
    assert s["params"] == summarize(cfg)["params"]
    assert "published" not in s
    assert main(["inspect", str(tmp_path)]) == 0  # human table
    out = capsys.readouterr().out
    assert "total (main model, no MTP)" in out and "M" in out


def test_transformers_written_config_matches_transformers_count(tmp_path, capsys):
    """A config.json in the transformers >= 5 dialect; its model (which builds no MTP) has `total` params."""
    transformers = pytest.importorskip("transformers")
    from conftest import TINY

    hf_cfg = transformers.DeepseekV3Config(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"]})
    hf_cfg.save_pretrained(tmp_path)
    s = inspect_json(capsys, str(tmp_path))
    torch.manual_seed(0)
    hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    assert s["params"]["total"] == sum(p.numel() for p in hf_model.parameters())


def test_unknown_preset_exit_2(capsys):
    assert main(["inspect", "deepseek-v9"]) == 2
    err = capsys.readouterr().err
    assert "deepseek-v9" in err and all(name in err for name in PRESETS)


def test_missing_dir_and_dir_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "presets" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="presets"):
        run_inspect("no-such-model", as_json=True)


def test_bad_config_json_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["inspect", str(tmp_path)]) == 2
    assert "llama" in capsys.readouterr().err


def test_deepseek_v2_lite_sanity(capsys):
    s = inspect_json(capsys, "deepseek-v2-lite")
    p = s["params"]
    assert abs(p["total"] / 15.7e9 - 1) < 0.01
    # Published 2.4B active: 2.45B without the embedding matrix, 2.66B with it.
    assert abs(p["activated_excl_embedding"] / 2.4e9 - 1) < 0.03
    assert p["total"] == p["total_with_mtp_as_stored"]  # no MTP
    assert s["kv_cache"]["latent_bytes_per_token"] == 27 * 576 * 2
    assert s["kv_cache"]["expanded_mha_bytes_per_token"] == 27 * 16 * 320 * 2


def test_moonlight_sanity(capsys):
    s = inspect_json(capsys, "moonlight-16b-a3b")
    p = s["params"]
    assert abs(p["total"] / 16e9 - 1) < 0.01  # "16B"
    assert 2.5e9 < p["activated_excl_embedding"] < p["activated"] < 3.0e9  # "A3B"
    assert p["mtp_unique"] == 0


def test_human_output_deepseek_v3(capsys):
    assert main(["inspect", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    for text in ("671.03B", "684.49B", "37.55B", "70,272 B", "4,997,120 B", "250.46 GFLOP", "91,991"):
        assert text in out, text
    table = out.split("\n\n")[2].splitlines()  # component table, last column right-aligned
    assert table[0].startswith("component") and set(table[1]) == {"-", " "}
    assert len({len(line) for line in table}) == 1


def test_summarize_is_pure():
    cfg = preset("tiny")
    before = cfg.to_dict()
    assert summarize(cfg) == summarize(cfg)
    assert cfg.to_dict() == before
    assert isinstance(json.dumps(summarize(ModelConfig.from_dict(before))), str)
