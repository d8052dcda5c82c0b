"""nanoseek writes checkpoints that transformers loads to the same logits; loading is lazy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import load_model, save_model
from conftest import randomize

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("overrides", [
    {},
    {"q_lora_rank": None, "n_shared_experts": 2, "num_experts_per_tok": 3, "topk_group": 2},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
])
def test_nanoseek_save_transformers_load_same_logits(tmp_path, overrides):
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny", **overrides)).eval()
    randomize(model, 21, bias_std=0.05)
    save_model(model, tmp_path, max_shard_size="400KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 1024, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    print(f"roundtrip nanoseek->transformers {overrides or 'tiny'}: {diff:.2e}")
    assert diff <= 1e-4


def test_tied_embeddings_survive_loading_both_ways(tmp_path):
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny", tie_word_embeddings=True)).eval()
    randomize(model, 22, bias_std=0.05)
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path / "ours")
    back = load_model(tmp_path / "ours")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(back(ids).logits, ref)
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-4
        hf.save_pretrained(tmp_path / "theirs")  # no lm_head tensor, no MTP block
        theirs = load_model(tmp_path / "theirs")
        assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
        assert (theirs(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_written_config_reads_in_transformers_with_the_same_rope(tmp_path):
    cfg = nanoseek.preset("deepseek-v3")
    cfg.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_theta"] == 10000.0  # official dialect
    assert d["scoring_func"] == "sigmoid" and d["topk_method"] == "noaux_tc"
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"
    assert hf_cfg.rope_parameters["factor"] == 40
    assert hf_cfg.rope_parameters["rope_theta"] == 10000.0
    assert hf_cfg.qk_head_dim == 192 and hf_cfg.num_nextn_predict_layers == 1


def test_bf16_roundtrip_keeps_the_correction_bias_fp32(tmp_path):
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 2, bias_std=0.001)
    save_model(model, tmp_path, dtype="bf16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "BF16"
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)


def test_loading_is_lazy_peak_memory_near_model_size(tmp_path):
    """Peak RSS while loading stays near the final model size, not twice it (measured in a fresh process)."""
    model = nanoseek.load_model("bench")
    save_model(model, tmp_path)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    script = textwrap.dedent(f"""
        import torch, nanoseek

        def hwm():  # the process's peak resident set (ru_maxrss would include the forking parent's)
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024

        from nanoseek.checkpoint import load_config, _meta_model
        _meta_model(load_config({str(tmp_path)!r}))  # warm up lazy imports so they do not count
        base = hwm()
        m = nanoseek.load_model({str(tmp_path)!r}, dtype=torch.float32)
        peak = hwm()
        print(base, peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    growth = peak - base
    print(f"model {nbytes / 1e6:.0f} MB, peak RSS growth while loading {growth / 1e6:.0f} MB")
    assert 0.9 * nbytes < growth < 1.25 * nbytes, (growth, nbytes)


def test_hub_ids_are_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
    """A Hub id goes through snapshot_download (safetensors and JSON only); here it returns a local dir."""
    model = nanoseek.load_model("tiny")
    save_model(model, tmp_path)
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = nanoseek.load_model("deepseek-ai/some-model")
    assert calls["repo_id"] == "deepseek-ai/some-model"
    assert "*.safetensors" in calls["allow_patterns"] and not any(p.endswith(".bin") for p in calls["allow_patterns"])
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_failed_hub_download_says_the_local_path_was_missing_too(monkeypatch):
    import huggingface_hub

    from nanoseek.checkpoint import CheckpointError

    def offline(repo_id, **kw):
        raise OSError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"'runs/nothere' is not a local directory .*could not be downloaded: "
                                              r"Name or service not known$"):
        nanoseek.load_model("runs/nothere")
