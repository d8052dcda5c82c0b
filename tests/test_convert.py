"""`nanoseek convert`: FP8 <-> BF16/FP16/FP32 at the tensor level, shard by shard, on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from conftest import hf_checkpoint, randomize
from nanoseek.checkpoint import (
    SAFE_INDEX, SAFE_SINGLE, CheckpointError, ShardWriter, is_fp8_weight_name, iter_state_tensors, save_model,
)
from nanoseek.cli import main
from nanoseek.convert import FP8_QUANTIZATION_CONFIG, convert, convert_checkpoint

QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# Dimensions that are not multiples of 128, so FP8 scale grids have partial edge blocks:
# gate/up [300, 160] -> [3, 2]; experts [136, 160] -> [2, 2]; kv_a [40, 160] -> [1, 2].
EDGE = dict(hidden_size=160, intermediate_size=300, moe_intermediate_size=136)

# FP8 logit bounds (tiny random models, init-scale weights; see docs/checkpoints.md). Over seeds 0-9
# the dense model measured max|dlogit|/std(logits) <= 0.38 and rel-RMS <= 0.050 (seed 0: 0.22, 0.048).
# In the MoE model the *max* is dominated by tokens whose expert choice flips (up to ~3.4 std), so it
# is bounded in RMS and top-1 terms: rel-RMS <= 0.23, top-1 agreement >= 0.73 (seed 0: 0.14, 0.90).
DENSE_MAX_OVER_STD = 0.5
DENSE_REL_RMS = 0.1
MOE_REL_RMS = 0.3
MOE_ARGMAX_AGREE = 0.7


# ---- helpers -------------------------------------------------------------------------------------

def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def _independent_dequant(q: torch.Tensor, s: torch.Tensor, b: int = 128) -> torch.Tensor:
    """W[m, n] = float(Wq[m, n]) * S[m // b, n // b], one explicit block at a time (no nanoseek.fp8)."""
    M, N = q.shape
    assert tuple(s.shape) == (math.ceil(M / b), math.ceil(N / b))
    out = torch.empty(M, N, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = q[i * b:(i + 1) * b, j * b:(j + 1) * b].to(torch.float32)
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = blk * s[i, j].item()
    return out


def _model(seed: int = 0, **overrides) -> nanoseek.DeepseekV3ForCausalLM:
    cfg = nanoseek.preset("tiny", **{**EDGE, **overrides})
    model = nanoseek.DeepseekV3ForCausalLM(cfg)
    randomize(model, seed, std=0.02, bias_std=0.05)  # init-scale weights, non-trivial norms and routing bias
    return model.eval()


def _logits(model, seed: int = 0, T: int = 48):
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def edge_src(tmp_path):
    """A float32 checkpoint (with MTP layer) whose dims give partial FP8 edge blocks."""
    model = _model()
    src = save_model(model, tmp_path / "src", dtype="float32")
    return src, model


# ---- --to fp8 ------------------------------------------------------------------------------------

def test_to_fp8_dtypes_scale_shapes_and_config(edge_src, tmp_path):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    before, after = _tensors(src), _tensors(dst)
    n_fp8 = 0
    partial = False
    for name, t in before.items():
        out = after[name]
        assert out.shape == t.shape
        if is_fp8_weight_name(name):
            n_fp8 += 1
            assert out.dtype == torch.float8_e4m3fn, name
            s = after[name + "_scale_inv"]
            M, N = t.shape
            assert s.dtype == torch.float32 and tuple(s.shape) == (math.ceil(M / 128), math.ceil(N / 128)), name
            partial |= M % 128 != 0 or N % 128 != 0
            # The quantization itself: every element within 2^-4 of its block's amax (E4M3, 3 mantissa bits).
            deq = _independent_dequant(out, s)
            amax = s.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N] * 448
            assert ((deq - t).abs() <= amax * 2**-4 + 1e-12).all(), name
        elif name.endswith("e_score_correction_bias"):
            assert out.dtype == torch.float32 and torch.equal(out, t)
        else:
            assert out.dtype == torch.bfloat16, name
            assert torch.equal(out, t.to(torch.bfloat16))
            assert name + "_scale_inv" not in after
    assert partial and n_fp8 > 0
    assert set(after) == set(before) | {n + "_scale_inv" for n in before if is_fp8_weight_name(n)}
    # MTP layer (index num_hidden_layers) Linear weights are FP8 too; its eh_proj / shared head stay bf16.
    L = nanoseek.preset("tiny").num_hidden_layers
    assert after[f"model.layers.{L}.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert after[f"model.layers.{L}.eh_proj.weight"].dtype == torch.bfloat16
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"] == QUANT == FP8_QUANTIZATION_CONFIG
    assert cfg["torch_dtype"] == "bfloat16"


def test_fp8_load_equals_independent_dequantization(edge_src, tmp_path):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    files = _tensors(dst)
    model = nanoseek.load_model(dst, dtype=torch.float32)
    checked = 0
    for name, param in iter_state_tensors(model):
        if name + "_scale_inv" in files:
            want = _independent_dequant(files[name], files[name + "_scale_inv"])
        else:
            want = files[name].to(torch.float32)
        assert torch.equal(param, want), name
        checked += 1
    assert checked == len(files) - sum(n.endswith("_scale_inv") for n in files)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_fp8_logits_stay_close(tmp_path, kind):
    overrides = dict(first_k_dense_replace=3) if kind == "dense" else {}
    model = _model(seed=0, **overrides)
    src = save_model(model, tmp_path / "src", dtype="float32")
    dst = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    ref = _logits(model)
    got = _logits(nanoseek.load_model(dst, dtype=torch.float32))
    diff = got - ref
    max_over_std = (diff.abs().max() / ref.std()).item()
    rel_rms = (diff.norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"fp8 logits ({kind}): max|d|/std = {max_over_std:.3f}, rel-RMS = {rel_rms:.4f}, "
          f"top-1 agreement = {agree:.3f}")
    if kind == "dense":
        assert max_over_std <= DENSE_MAX_OVER_STD and rel_rms <= DENSE_REL_RMS
    else:
        assert rel_rms <= MOE_REL_RMS and agree >= MOE_ARGMAX_AGREE
    # The same model in bf16 (8 mantissa bits instead of 3) is an order of magnitude closer.
    bf16 = convert_checkpoint(src, tmp_path / "bf16", "bf16")
    d16 = _logits(nanoseek.load_model(bf16, dtype=torch.float32)) - ref
    assert (d16.norm() / ref.norm()).item() < rel_rms


def test_fp8_source_to_fp8_is_copied_through_bit_exactly(edge_src, tmp_path):
    src, _ = edge_src
    a = convert_checkpoint(src, tmp_path / "a", "fp8")
    b = convert_checkpoint(a, tmp_path / "b", "fp8", max_shard_size="200KB")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype
        assert torch.equal(ta[k].view(torch.uint8) if ta[k].element_size() == 1 else ta[k],
                           tb[k].view(torch.uint8) if tb[k].element_size() == 1 else tb[k]), k
    assert json.loads((b / "config.json").read_text())["quantization_config"] == QUANT


# ---- FP8 -> BF16 / FP16 / FP32 ---------------------------------------------------------------------

def test_fp8_to_bf16_loads_in_transformers_with_nanoseek_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    src, _ = hf_checkpoint(tmp_path, seed=5)
    fp8 = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    bf16 = convert_checkpoint(fp8, tmp_path / "bf16", "bf16")
    t8, t16 = _tensors(fp8), _tensors(bf16)
    assert not any(k.endswith("_scale_inv") for k in t16)
    assert set(t16) == {k for k in t8 if not k.endswith("_scale_inv")}
    for k, t in t16.items():
        if k.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        else:
            assert t.dtype == torch.bfloat16, k
        if k + "_scale_inv" in t8:  # what fp8_cast_bf16.py computes: float32 product, rounded once to bf16
            assert torch.equal(t, _independent_dequant(t8[k], t8[k + "_scale_inv"]).to(torch.bfloat16)), k
    cfg = json.loads((bf16 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["torch_dtype"] == "bfloat16" and cfg.get("dtype", "bfloat16") == "bfloat16"

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(bf16, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ours = nanoseek.load_model(bf16, dtype=torch.float32)
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = hf(ids).logits
        b = ours(ids).logits
    diff = (a - b).abs().max().item()
    print(f"fp8 -> bf16: transformers vs nanoseek max|dlogit| = {diff:.2e}")
    assert diff <= 1e-2


def test_nanoseek_checkpoint_fp8_to_bf16_loads_in_transformers(edge_src, tmp_path):
    """A nanoseek-written checkpoint (official dialect, MTP layer stored) also round-trips for transformers."""
    transformers = pytest.importorskip("transformers")
    src, _ = edge_src
    bf16 = convert_checkpoint(convert_checkpoint(src, tmp_path / "fp8", "fp8"), tmp_path / "bf16", "bf16")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(bf16, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ours = nanoseek.load_model(bf16, dtype=torch.float32)
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-2


@pytest.mark.parametrize("to,dtype,name", [("fp16", torch.float16, "float16"), ("fp32", torch.float32, "float32"),
                                           ("bf16", torch.bfloat16, "bfloat16")])
def test_fp8_to_other_dtypes(edge_src, tmp_path, to, dtype, name):
    src, _ = edge_src
    fp8 = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    out = convert_checkpoint(fp8, tmp_path / to, to)
    t8, t = _tensors(fp8), _tensors(out)
    for k, v in t.items():
        assert v.dtype == (torch.float32 if k.endswith("e_score_correction_bias") else dtype), k
        if k + "_scale_inv" in t8:
            assert torch.equal(v, _independent_dequant(t8[k], t8[k + "_scale_inv"]).to(dtype))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == name and "quantization_config" not in cfg
    nanoseek.load_model(out)  # loads in its own dtype


def test_unquantized_cast(edge_src, tmp_path):
    src, _ = edge_src
    out = convert_checkpoint(src, tmp_path / "bf16", "bf16")
    before, after = _tensors(src), _tensors(out)
    assert before.keys() == after.keys()
    for k in before:
        want = before[k] if k.endswith("e_score_correction_bias") else before[k].to(torch.bfloat16)
        assert after[k].dtype == want.dtype and torch.equal(after[k], want)


# ---- layout --------------------------------------------------------------------------------------

def test_sharded_output_has_a_complete_index(edge_src, tmp_path):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "fp8", "fp8", max_shard_size="150KB")
    index = json.loads((dst / SAFE_INDEX).read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 3 and SAFE_SINGLE not in shards
    wm = index["weight_map"]
    on_disk, total = {}, 0
    for f in shards:
        assert f.startswith("model-") and f.endswith(f"-of-{len(shards):05d}.safetensors")
        with safe_open(str(dst / f), framework="pt") as h:
            nbytes = 0
            for k in h.keys():
                on_disk[k] = f
                t = h.get_tensor(k)
                nbytes += t.numel() * t.element_size()
            # At the limit, unless one tensor alone is larger (the 1024 x 160 bf16 embedding is 328 KB).
            assert nbytes <= 150_000 or len(h.keys()) == 1, (f, nbytes)
            total += nbytes
    assert wm == on_disk
    assert set(wm.values()) == set(shards)
    assert index["metadata"]["total_size"] == total
    single = convert_checkpoint(src, tmp_path / "fp8-single", "fp8")
    assert _tensors(single).keys() == wm.keys()
    a = nanoseek.load_model(dst, dtype=torch.float32)
    b = nanoseek.load_model(single, dtype=torch.float32)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n


def test_sharded_source_with_scales_in_another_shard(edge_src, tmp_path):
    """Weights and their scales may live in different shards; the converter reads across shards."""
    src, _ = edge_src
    fp8 = convert_checkpoint(src, tmp_path / "fp8", "fp8", max_shard_size="20KB")
    wm = json.loads((fp8 / SAFE_INDEX).read_text())["weight_map"]
    assert any(wm[k] != wm[k + "_scale_inv"] for k in wm if k + "_scale_inv" in wm)
    out = convert_checkpoint(fp8, tmp_path / "bf16", "bf16")
    single = convert_checkpoint(convert_checkpoint(src, tmp_path / "fp8-1", "fp8"), tmp_path / "bf16-1", "bf16")
    ta, tb = _tensors(out), _tensors(single)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_copies_text_files_but_not_code_or_pickles(edge_src, tmp_path):
    src, _ = edge_src
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    (src / "config.json").write_text(json.dumps(cfg))
    files = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}",
             "README.md": "# m", "LICENSE": "MIT", "modeling_deepseek.py": "import os",
             "configuration_deepseek.py": "x = 1", "pytorch_model.bin": "pickle", "optimizer.pt": "pickle",
             ".hidden.json": "{}"}
    for name, text in files.items():
        (src / name).write_text(text)
    (src / "figures").mkdir()
    (src / "figures" / "x.json").write_text("{}")
    dst = convert_checkpoint(src, tmp_path / "out", "fp8")
    got = sorted(p.name for p in dst.iterdir())
    assert got == sorted(["config.json", "generation_config.json", SAFE_SINGLE, "tokenizer.json",
                          "tokenizer_config.json", "chat_template.jinja", "README.md", "LICENSE"])
    assert (dst / "chat_template.jinja").read_text() == "{{ x }}"
    assert "auto_map" not in json.loads((dst / "config.json").read_text())


def test_transformers_dialect_config_keys_are_kept(tmp_path):
    src, _ = hf_checkpoint(tmp_path, seed=2)
    dst = convert_checkpoint(src, tmp_path / "fp8", "fp8")
    a = json.loads((src / "config.json").read_text())
    b = json.loads((dst / "config.json").read_text())
    assert b.pop("quantization_config") == QUANT
    assert b.pop("dtype") == "bfloat16" and b.pop("torch_dtype") == "bfloat16"
    a.pop("dtype")
    assert a == b


# ---- safety ---------------------------------------------------------------------------------------

def test_refuses_dst_equal_to_or_inside_src(edge_src):
    src, _ = edge_src
    with pytest.raises(CheckpointError, match="is the source directory"):
        convert_checkpoint(src, src, "bf16", overwrite=True)
    with pytest.raises(CheckpointError, match="inside the source directory"):
        convert_checkpoint(src, src / "sub" / "out", "bf16")
    assert not (src / "sub").exists()


def test_existing_destination_needs_overwrite(edge_src, tmp_path):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "out", "fp8", max_shard_size="100KB")
    old_shards = set(p.name for p in dst.glob("model-*.safetensors"))
    assert len(old_shards) > 1
    with pytest.raises(CheckpointError, match="--overwrite"):
        convert_checkpoint(src, dst, "bf16")
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == QUANT  # untouched
    convert_checkpoint(src, dst, "bf16", overwrite=True)
    assert sorted(p.name for p in dst.glob("*.safetensors")) == [SAFE_SINGLE]  # old shards gone
    assert not (dst / SAFE_INDEX).exists()
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    nanoseek.load_model(dst)
    # An existing directory that holds no model is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    convert_checkpoint(src, tmp_path / "empty", "bf16")


def test_source_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out", "bf16")
    (tmp_path / "noconfig").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "noconfig" / SAFE_SINGLE))
    with pytest.raises(CheckpointError, match="has no config.json"):
        convert_checkpoint(tmp_path / "noconfig", tmp_path / "out", "bf16")
    pick = tmp_path / "pickled"
    pick.mkdir()
    nanoseek.preset("tiny").save(pick)
    (pick / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickle"):
        convert_checkpoint(pick, tmp_path / "out", "bf16")
    with pytest.raises(nanoseek.ConfigError, match="unknown conversion target"):
        convert_checkpoint(pick, tmp_path / "out", "int4")
    assert not (tmp_path / "out").exists()


def test_cli(edge_src, tmp_path, capsys):
    src, _ = edge_src
    dst = tmp_path / "cli"
    assert main(["convert", str(src), str(dst), "--to", "fp8", "--shard-size", "300KB"]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "fp8" in out and str(dst) in out and " s;" in out
    assert (dst / SAFE_INDEX).exists()

    assert main(["convert", str(src), str(dst), "--to", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "nanoseek convert: error:" in err and "--overwrite" in err
    assert main(["convert", str(src), str(src), "--to", "bf16"]) == 2
    assert "source directory" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "bf16"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--to", "bf16", "--overwrite"]) == 0


# ---- interrupted writes ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing_behind(edge_src, tmp_path, monkeypatch, exc, existing):
    src, _ = edge_src
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    real_flush = ShardWriter._flush
    calls = []

    def flaky_flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", flaky_flush)
    with pytest.raises(type(exc)):
        convert_checkpoint(src, dst, "fp8", max_shard_size="100KB")
    assert len(calls) == 3
    if existing:
        left = sorted(p.name for p in dst.rglob("*"))
        assert left == ["notes.txt"], left
    else:
        assert not dst.exists()


def test_interrupted_overwrite_never_looks_complete(edge_src, tmp_path, monkeypatch):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "out", "fp8")

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    monkeypatch.setattr(ShardWriter, "close", boom)
    assert main(["convert", str(src), str(dst), "--to", "bf16", "--overwrite"]) == 130
    # the old model is only replaced once the new one is complete: an interrupted overwrite keeps it
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not list(dst.rglob("*partial*")) and not list(dst.glob(".nanoseek-convert-*"))


def test_a_failed_overwrite_keeps_the_old_model(edge_src, tmp_path):
    src, _ = edge_src
    dst = convert_checkpoint(src, tmp_path / "out", "bf16")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    bad = convert_checkpoint(src, tmp_path / "bad", "fp8")  # a source whose FP8 weight lost its scale
    tensors = load_file(bad / "model.safetensors")
    scale = next(n for n in tensors if n.endswith("_scale_inv"))
    del tensors[scale]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        convert_checkpoint(bad, dst, "bf16", overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before


def test_stats(edge_src, tmp_path):
    src, _ = edge_src
    st = convert(src, tmp_path / "fp8", "fp8")
    n_fp8 = sum(is_fp8_weight_name(k) for k in _tensors(src))
    assert st.tensors_out == st.tensors_in + n_fp8
    assert st.bytes_in == sum(t.numel() * t.element_size() for t in _tensors(src).values())
    assert st.bytes_out == sum(t.numel() * t.element_size() for t in _tensors(st.dst).values())
    assert st.bytes_out < st.bytes_in / 2
    print(st.summary())


def test_progress_bar_on_stderr(edge_src, tmp_path, capsys):
    src, _ = edge_src
    convert_checkpoint(src, tmp_path / "out", "bf16", progress=True)
    cap = capsys.readouterr()
    assert "convert" in cap.err and "B/s" in cap.err and "100%" in cap.err  # bytes, rate, ETA
    assert cap.out == ""
