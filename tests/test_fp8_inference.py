"""FP8 weights kept in FP8 at inference (nanoseek.fp8_linear inference modules, load_model(keep_fp8=True))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanoseek
from conftest import random_experts
from nanoseek.checkpoint import save_model
from nanoseek.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from nanoseek.fp8_linear import (
    FP8InferenceExperts,
    FP8InferenceLinear,
    convert_to_fp8_inference,
    cuda_fp8_available,
    fp8_module_names,
)
from nanoseek.model.moe import Experts

F8 = torch.float8_e4m3fn


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("shape", [(192, 320), (576, 140), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_linear_equals_dequantized_linear(shape, dtype):
    N, K = shape
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=gen)
    m = FP8InferenceLinear.from_linear(lin)
    assert m.qweight.dtype == F8 and m.weight_scale_inv.shape == ((N + 127) // 128, (K + 127) // 128)
    q, s = quantize_weight_blockwise(lin.weight.float())
    w = dequantize_weight_blockwise(q, s, dtype=dtype)
    assert torch.equal(m.weight, w)  # .weight dequantizes (MLA's absorbed path reads it)
    x = torch.randn(3, 5, K, generator=gen).to(dtype)
    assert torch.equal(m(x), F.linear(x, w, lin.bias))  # the CPU path: block dequantization + F.linear
    rel = ((m(x).float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert rel < 0.06  # weight-only E4M3 error


def test_dtype_moves_keep_fp8_buffers():
    m = FP8InferenceLinear.from_linear(nn.Linear(256, 128, bias=False))
    m = m.to(torch.bfloat16)
    assert m.qweight.dtype == F8 and m.weight_scale_inv.dtype == torch.float32
    assert m.compute_dtype == torch.bfloat16 and m.weight.dtype == torch.bfloat16
    m.float()
    assert m.qweight.dtype == F8 and m.weight.dtype == torch.float32
    assert set(m.state_dict()) == {"qweight", "weight_scale_inv"}


def test_inference_experts_match_dequantized_experts():
    cfg = nanoseek.preset("tiny")  # moe_intermediate_size 64: gate and up blocks are partial
    gen = torch.Generator().manual_seed(1)
    ex = random_experts(cfg, gen, 0.05)
    fx = FP8InferenceExperts.from_experts(ex)
    I = cfg.moe_intermediate_size
    ref = Experts(cfg)
    with torch.no_grad():
        for e in range(cfg.n_routed_experts):
            for rows in ((0, I), (I, 2 * I)):  # gate and up are quantized as the separate matrices they are on disk
                ref.gate_up_proj[e, rows[0]:rows[1]] = dequantize_weight_blockwise(
                    *quantize_weight_blockwise(ex.gate_up_proj[e, rows[0]:rows[1]]), dtype=torch.float32)
            ref.down_proj[e] = dequantize_weight_blockwise(*quantize_weight_blockwise(ex.down_proj[e]),
                                                           dtype=torch.float32)
    assert torch.equal(fx.gate_up_proj, ref.gate_up_proj) and torch.equal(fx.down_proj, ref.down_proj)
    x = torch.randn(30, cfg.hidden_size, generator=gen)
    idx = torch.randint(0, cfg.n_routed_experts, (30, 2), generator=gen)
    w = torch.rand(30, 2, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fx(x, idx, w)[0], ref(x, idx, w)[0], rtol=1e-6, atol=1e-6)


def test_fp8_experts_never_dequantize_the_whole_stack(monkeypatch):
    # a prefill-sized batch once took the paired fp32 path, which reads the stacked weights: for FP8
    # experts that dequantized all of them, for every pair (a 64-token prompt on `bench` took 45 s)
    cfg = nanoseek.preset("tiny")
    gen = torch.Generator().manual_seed(2)
    ex = random_experts(cfg, gen, 0.05)
    fx = FP8InferenceExperts.from_experts(ex)
    ref = Experts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(fx.gate_up_proj)
        ref.down_proj.copy_(fx.down_proj)

    def whole_stack(self):
        raise AssertionError("dequantized every expert")

    monkeypatch.setattr(FP8InferenceExperts, "gate_up_proj", property(whole_stack))
    monkeypatch.setattr(FP8InferenceExperts, "down_proj", property(whole_stack))
    for n in (3, 8, 48, 200):  # few-token, grouped, pairing-sized, large
        x = torch.randn(n, cfg.hidden_size, generator=gen)
        idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:2] for _ in range(n)])
        w = torch.rand(n, 2, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(fx(x, idx, w)[0], ref(x, idx, w)[0], rtol=1e-5, atol=1e-6)


def _have_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile needs a C++ compiler")
def test_compiled_decode_runs_fp8_weights(fp8_dir):
    # the compiled step converts the FP8 bytes inside the matmuls (no fallback to the eager path, whose
    # per-step dequantization makes CPU decode ~100x slower); same greedy tokens as eager
    from nanoseek.engine import Engine

    d, _ = fp8_dir
    model = nanoseek.load_model(d, dtype="fp32", keep_fp8=True)
    kw = dict(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11]]  # batch 2 too: tiny's [128, 352] down_proj was once miscompiled there
    ref = Engine(model).generate(prompts, **kw)
    comp = Engine(model, compile=True)
    got = comp.generate(prompts, **kw)
    assert not comp.compiled.failed, comp.compiled.failed
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile needs a C++ compiler")
def test_compiled_dequantization_is_bitwise_eager():
    from nanoseek.engine.compiled import _small_matmuls_as_reductions

    gen = torch.Generator().manual_seed(3)
    # whole blocks; partial blocks, including one block row with a partial column block (torch
    # 2.13's Inductor miscompiled a broadcast of the scales there)
    for shape in ((256, 384), (200, 130), (128, 352), (64, 130)):
        q, s = quantize_weight_blockwise(torch.randn(*shape, generator=gen))
        for dtype in (torch.float32, torch.bfloat16):
            torch._dynamo.reset()  # a static graph for each shape, as the decode step's weights get
            f = torch.compile(lambda q, s: dequantize_weight_blockwise(q, s, dtype=dtype), fullgraph=True)
            assert torch.equal(f(q, s), dequantize_weight_blockwise(q, s, dtype=dtype)), (shape, dtype)
        # inside a 2-row product, as the compiled decode step runs it
        x = torch.randn(2, shape[1], generator=gen)
        lin = torch.compile(lambda x, q, s: F.linear(x, dequantize_weight_blockwise(q, s, dtype=torch.float32)),
                            fullgraph=True, options=_small_matmuls_as_reductions())
        torch.testing.assert_close(lin(x, q, s), F.linear(x, dequantize_weight_blockwise(q, s, dtype=torch.float32)),
                                   rtol=1e-4, atol=1e-4)  # (summation order; the miscompile gave zeros)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    model = nanoseek.load_model("tiny")
    d = tmp_path_factory.mktemp("fp8ckpt")
    save_model(model, d, fp8=True)
    bf = tmp_path_factory.mktemp("bf16ckpt")
    save_model(model, bf, dtype="bf16")
    return d, bf


def test_keep_fp8_load_is_exact_and_half_the_bytes(fp8_dir):
    d, _ = fp8_dir
    deq = nanoseek.load_model(d, dtype="bf16")
    kept = nanoseek.load_model(d, dtype="bf16", keep_fp8=True)
    names = fp8_module_names(kept)
    assert len(names) == 35 and "lm_head" not in names
    mods = dict(kept.named_modules())
    assert isinstance(mods["model.layers.0.self_attn.kv_b_proj"], FP8InferenceLinear)
    assert isinstance(mods["model.layers.1.mlp.experts"], FP8InferenceExperts)
    assert type(mods["lm_head"]) is nn.Linear and type(mods["model.layers.3.eh_proj"]) is nn.Linear
    # bytes of the FP8-stored weights: 1 byte + a float32 scale per 128x128 block vs 2 bytes (bf16)
    deq_mods = dict(deq.named_modules())
    fp8_bytes = _nbytes(t for n in names for t in mods[n].buffers() if t.dtype in (F8, torch.float32))
    bf16_bytes = _nbytes(p for n in names for p in deq_mods[n].parameters())
    assert fp8_bytes / bf16_bytes < 0.52
    total_kept = _nbytes(list(kept.parameters()) + list(kept.buffers()))
    total_deq = _nbytes(list(deq.parameters()) + list(deq.buffers()))
    assert total_kept < 0.7 * total_deq  # embedding and head (bf16) are a large share of `tiny`
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # same dequantized values, same bf16 rounding: identical logits
        assert torch.equal(kept(ids).logits, deq(ids).logits)
        # and decode on the latent cache (absorbed path reads kv_b_proj.weight) agrees with the full forward
        full = kept(ids).logits
        cache = kept.new_cache(2, 32)
        kept(ids[:, :20], cache=cache)
        step = kept(ids[:, 20:21], start_pos=20, cache=cache).logits
        torch.testing.assert_close(step[:, 0].float(), full[:, 20].float(), atol=0.05, rtol=0.05)


def test_a_model_kept_in_fp8_saves_and_reloads(fp8_dir, tmp_path):
    d, _ = fp8_dir
    kept = nanoseek.load_model(d, dtype="bf16", keep_fp8=True)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(2))
    save_model(kept, tmp_path / "bf16")  # weights dequantized: the same values in bf16
    save_model(kept, tmp_path / "fp8", fp8=True)  # requantized with the same blocks: the same codes
    with torch.no_grad():
        ref = kept(ids).logits
        assert torch.equal(nanoseek.load_model(tmp_path / "bf16", dtype="bf16")(ids).logits, ref)
        assert torch.equal(nanoseek.load_model(tmp_path / "fp8", dtype="bf16", keep_fp8=True)(ids).logits, ref)


@pytest.mark.parametrize("fast", [True, False])
def test_the_engine_runs_a_model_kept_in_fp8(fp8_dir, fast):
    from nanoseek.engine import Engine

    d, _ = fp8_dir
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    kw = dict(max_tokens=6, temperature=0, ignore_eos=True)
    ref = Engine(nanoseek.load_model(d, dtype="bf16"), fast=fast).generate(prompts, **kw)
    kept = Engine(nanoseek.load_model(d, dtype="bf16", keep_fp8=True), fast=fast)
    for spec in (0, 1):
        assert [r.token_ids for r in kept.generate(prompts, **kw, speculative=spec)] == [r.token_ids for r in ref]


def test_generate_and_engine_take_keep_fp8(fp8_dir, capsys):
    import json

    from nanoseek.cli import main
    from nanoseek.engine import Engine
    from nanoseek.engine.sampling import SamplingError

    d, _ = fp8_dir
    eng = Engine(d, dtype="fp32", keep_fp8=True, tokenizer=None)
    assert isinstance(eng.model.model.layers[1].mlp.experts, FP8InferenceExperts)
    ref = eng.generate([5, 6, 7], max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    assert main(["generate", str(d), "5 6 7", "--ids", "--max-tokens", "5", "--json", "--quiet", "--dtype", "fp32",
                 "--keep-fp8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ref.token_ids and out["logprobs"] == pytest.approx(ref.logprobs, abs=1e-6)
    with pytest.raises(SamplingError, match="keep_fp8"):
        Engine(nanoseek.load_model("tiny"), keep_fp8=True)


def test_keep_fp8_fp32_equals_dequantized_fp32(fp8_dir, monkeypatch):
    d, _ = fp8_dir
    # FP8 experts never take the paired fp32 path (it sums in another order, ~1e-7): compare like with like
    monkeypatch.setattr(Experts, "PAIR_MAX_ROWS", 0)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = nanoseek.load_model(d, dtype="fp32")(ids).logits
        b = nanoseek.load_model(d, dtype="fp32", keep_fp8=True)(ids).logits
    assert torch.equal(a, b)


def test_keep_fp8_from_bf16_checkpoint_quantizes_on_load(fp8_dir):
    d, bf = fp8_dir
    from_fp8 = nanoseek.load_model(d, dtype="fp32", keep_fp8=True)
    from_bf16 = nanoseek.load_model(bf, dtype="fp32", keep_fp8=True)
    a = dict(from_fp8.named_buffers())
    b = dict(from_bf16.named_buffers())
    # the bf16 checkpoint holds the weights rounded to bf16, so a few blocks may differ; most agree bit for bit
    q1, q2 = a["model.layers.0.self_attn.q_b_proj.qweight"], b["model.layers.0.self_attn.q_b_proj.qweight"]
    assert q2.dtype == F8
    agree = (q1.view(torch.uint8) == q2.view(torch.uint8)).float().mean().item()
    assert agree > 0.9


def test_convert_in_memory_model():
    model = nanoseek.load_model("tiny")
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        n = convert_to_fp8_inference(model)
        got = model(ids).logits
    assert n == 35
    assert ((got - ref).norm() / ref.norm()).item() < 0.15
    assert convert_to_fp8_inference(model) == 0  # already converted


@pytest.mark.skipif(not cuda_fp8_available(), reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")
def test_inference_linear_scaled_mm_on_gpu():
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(512, 384, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=gen)
    m = FP8InferenceLinear.from_linear(lin).cuda().to(torch.bfloat16)
    x = torch.randn(64, 512, generator=gen).cuda().to(torch.bfloat16)
    ref = F.linear(x.float(), m.weight.float())
    assert ((m(x).float() - ref).norm() / ref.norm()).item() < 0.06  # activation E4M3 error on top
