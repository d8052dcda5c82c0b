"""Multi-token prediction: layout, causality and the official concatenation order."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import save_model
from conftest import randomize


def _model():
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 9, bias_std=0.05)
    return model


def test_mtp_logits_shape_and_causality():
    model = _model()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, return_mtp=True)
        (mtp,) = out.mtp_logits
        assert mtp.shape == (2, 15, 1024)
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 1024
        mtp2 = model(ids2, return_mtp=True).mtp_logits[0]
    # Position i of depth 1 sees tokens <= i + 1: changing token 10 leaves positions < 9 untouched
    # (up to BLAS blocking: expert batches change size, so not bit-exact).
    assert torch.allclose(mtp[:, :9], mtp2[:, :9], atol=1e-5)
    assert not torch.allclose(mtp[:, 9], mtp2[:, 9])


def test_mtp_matches_a_hand_written_reference():
    """h' = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]), block, shared_head.norm, head (embedding first)."""
    model = _model()
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(1))
    mtp = model.model.mtp_layers[0]
    with torch.no_grad():
        out = model(ids, return_mtp=True, return_hidden=True)
        h = out.hidden_states  # post final norm, as vLLM feeds it
        emb = model.model.embed_tokens(ids[:, 1:])

        def rms(x, w, eps=1e-6):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        x = torch.cat([rms(emb, mtp.enorm.weight), rms(h[:, :-1], mtp.hnorm.weight)], -1) @ mtp.eh_proj.weight.T
        positions = torch.arange(11)[None]
        cos, sin = model.model.rotary(positions, x.dtype)
        y = mtp(x, cos, sin)  # the decoder block itself is covered by the transformers parity tests
        ref = rms(y, mtp.shared_head.norm.weight) @ model.lm_head.weight.T
    assert (out.mtp_logits[0] - ref).abs().max() < 1e-4


def test_mtp_weights_use_official_names_and_shared_embedding(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    L = model.config.num_hidden_layers
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                 "shared_head.norm.weight", "shared_head.head.weight", "self_attn.kv_b_proj.weight",
                 "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{L}.{name}" in tensors, name
    assert torch.equal(tensors[f"model.layers.{L}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert tensors[f"model.layers.{L}.eh_proj.weight"].shape == (128, 256)

    # Editing the stored eh_proj changes MTP logits only; the main logits do not move.
    tensors[f"model.layers.{L}.eh_proj.weight"] = tensors[f"model.layers.{L}.eh_proj.weight"] * 0.5
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    edited = nanoseek.load_model(tmp_path)
    ids = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        a, b = model(ids, return_mtp=True), edited(ids, return_mtp=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert not torch.allclose(a.mtp_logits[0], b.mtp_logits[0], atol=1e-4)


def test_mtp_copy_that_differs_from_the_main_embedding_is_untied(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    L = model.config.num_hidden_layers
    tensors[f"model.layers.{L}.shared_head.head.weight"] = torch.randn(1024, 128) * 0.05
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = nanoseek.load_model(tmp_path)
    mtp = loaded.model.mtp_layers[0]
    assert mtp.shared_head.head is not loaded.lm_head
    assert torch.equal(mtp.shared_head.head.weight, tensors[f"model.layers.{L}.shared_head.head.weight"])
    assert torch.equal(loaded.lm_head.weight, tensors["lm_head.weight"])
