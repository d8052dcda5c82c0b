"""Tests for nanoseek.fp8: DeepSeek-V3 block-scaled FP8 (E4M3) quantization.

Error bound used (derived in the module docstring): with s the block scale,
E4M3 round-to-nearest with 3 mantissa bits gives |y - e4m3(y)| <= 2^-4 |y| for
normal y and <= 2^-10 below the smallest normal 2^-6, hence per element

    |x - deq(q(x))| <= 2^-4 |x| + 2^-10 * s + ~2^-22 |x|   (float32 rounding)

and therefore every element of a block is within amax_block * 2^-4 (+ tiny).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import nanoseek.fp8 as fp8
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import nanoseek.fp8 as fp8

from nanoseek.fp8 import (
    BLOCK_SIZE,
    FP8_E4M3_MAX,
    dequantize_activation_tiles,
    dequantize_weight_blockwise,
    quantize_activation_tiles,
    quantize_weight_blockwise,
)

F8 = torch.float8_e4m3fn


def _expand(s: torch.Tensor, b: int, M: int, N: int) -> torch.Tensor:
    return s.float().repeat_interleave(b, 0)[:M].repeat_interleave(b, 1)[:, :N]


def _reference_dequant(q: torch.Tensor, s: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    M, N = q.shape
    return (q.float() * s.repeat_interleave(b, 0)[:M].repeat_interleave(b, 1)[:, :N]).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns so that NaN == NaN and -0 != +0.
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_within_bound(x: torch.Tensor, deq: torch.Tensor, s_full: torch.Tensor) -> None:
    x, deq = x.float(), deq.float()
    err = (x - deq).abs()
    bound = 2.0**-4 * x.abs() + 2.0**-10 * s_full + 2.0**-20 * x.abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


def test_constants():
    assert FP8_E4M3_MAX == 448.0 == torch.finfo(F8).max
    assert BLOCK_SIZE == 128


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (1, 1), (129, 127), (576, 140)])
def test_scale_shapes(shape):
    M, N = shape
    w = torch.randn(M, N, dtype=torch.bfloat16)
    q, s = quantize_weight_blockwise(w)
    assert q.dtype == F8 and q.shape == w.shape
    assert s.dtype == torch.float32
    assert s.shape == (math.ceil(M / 128), math.ceil(N / 128))


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("shape", [(256, 256), (200, 300)])
def test_round_trip_error_bound(shape, power_of_two):
    g = torch.Generator().manual_seed(0)
    M, N = shape
    # Very different magnitudes per block, plus a heavy tail inside blocks.
    w = torch.randn(M, N, generator=g) * torch.rand(M, N, generator=g) ** 4
    w *= torch.logspace(-6, 6, M)[:, None]
    q, s = quantize_weight_blockwise(w, power_of_two=power_of_two)
    deq = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    s_full = _expand(s, 128, M, N)
    _assert_within_bound(w, deq, s_full)

    # Coarser block-level form: every element within amax_block * 2^-4.
    amax_full = _expand(
        torch.nn.functional.pad(w.abs(), (0, -N % 128, 0, -M % 128))
        .view(math.ceil(M / 128), 128, math.ceil(N / 128), 128)
        .amax(dim=(1, 3)),
        128, M, N,
    )
    assert torch.all((w - deq).abs() <= amax_full * 2.0**-4 * (1 + 1e-6))

    if not power_of_two:
        # The largest element of each block maps to (almost exactly) 448.
        top = (q.float().abs() == FP8_E4M3_MAX).view(-1)
        assert top.any()


def test_partial_edge_block_uses_only_real_elements():
    # A 130x130 weight: the edge blocks are 2 wide; their scale must come from
    # their own 2 columns/rows, not from the zero padding or a neighbour.
    w = torch.zeros(130, 130)
    w[:128, :128] = 1000.0
    w[:128, 128:] = 3.0
    w[128:, :128] = 0.5
    w[128:, 128:] = -7.0
    q, s = quantize_weight_blockwise(w)
    expected = torch.tensor([[1000.0, 3.0], [0.5, 7.0]]) / FP8_E4M3_MAX
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    assert torch.equal(dequantize_weight_blockwise(q, s, dtype=torch.float32), w)


def test_quantize_matches_naive_per_block_loop():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    q, s = quantize_weight_blockwise(w)
    for i in range(2):
        for j in range(3):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            sb = blk.abs().amax() / 448.0
            assert s[i, j].item() == sb.item()
            qb = (blk / sb).clamp(-448, 448).to(F8)
            assert torch.equal(_bits(q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]), _bits(qb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (129, 1)])
def test_dequant_matches_repeat_interleave_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(2)
    M, N = shape
    q = (torch.randn(M, N, generator=g) * 100).clamp(-448, 448).to(F8)
    s = torch.rand(math.ceil(M / 128), math.ceil(N / 128), generator=g) * 1e-2 + 1e-5
    got = dequantize_weight_blockwise(q, s, dtype=dtype)
    ref = _reference_dequant(q, s, 128, dtype)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(ref))


def test_chunking_does_not_change_results(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(700, 300, generator=g) * torch.logspace(-3, 3, 700)[:, None]).to(torch.bfloat16)
    w[5, 7] = float("nan")
    w[400, 20] = float("inf")
    q_one, s_one = quantize_weight_blockwise(w)
    d_one = dequantize_weight_blockwise(q_one, s_one)
    # Force one block row per chunk (and an odd number of chunks).
    monkeypatch.setattr(fp8, "_CHUNK_ELEMS", 1)
    q_many, s_many = quantize_weight_blockwise(w)
    d_many = dequantize_weight_blockwise(q_many, s_many)
    assert torch.equal(_bits(q_one), _bits(q_many))
    assert torch.equal(_bits(s_one), _bits(s_many))
    assert torch.equal(_bits(d_one), _bits(d_many))
    assert torch.equal(_bits(d_many), _bits(_reference_dequant(q_many, s_many, 128, torch.bfloat16)))


def test_shape_mismatch_error_message():
    q = torch.zeros(200, 300, dtype=F8)
    with pytest.raises(ValueError, match=r"expected \(2, 3\)") as e:
        dequantize_weight_blockwise(q, torch.ones(2, 2))
    assert "(2, 2)" in str(e.value) and "block_size=128" in str(e.value)
    with pytest.raises(ValueError, match=r"expected \(4, 5\)"):
        dequantize_weight_blockwise(q, torch.ones(2, 3), block_size=64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_blockwise(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected \(2, 3, 3\)"):
        dequantize_activation_tiles(torch.zeros(2, 3, 300, dtype=F8), torch.ones(2, 3, 2))


def test_extreme_finite_inputs_no_nan():
    w = torch.zeros(256, 384)
    w[128:, :128] = 1e30
    w[:128, 128:256] = 1e-30
    w[128:, 128:256] = torch.where(torch.arange(128) % 2 == 0, 1e30, 1e-30)[:, None]
    w[:128, 256:] = 1e-44  # subnormal: amax / 448 underflows to 0
    for p2 in (False, True):
        q, s = quantize_weight_blockwise(w, power_of_two=p2)
        assert not torch.isnan(q.float()).any() and not torch.isnan(s).any()
        assert torch.all(s > 0) and torch.all(torch.isfinite(s))
        deq = dequantize_weight_blockwise(q, s, dtype=torch.float32)
        assert not torch.isnan(deq).any()
        assert torch.all(deq[:128, :128] == 0)  # zeros stay zeros
        assert s[0, 0] == 1.0  # scale guard for the all-zero block
        _assert_within_bound(w, deq, _expand(s, 128, 256, 384))


def test_inf_saturates_without_nan():
    w = torch.randn(256, 256)
    w[3, 4] = float("inf")
    w[5, 6] = -float("inf")
    w[128:, 128:] = 0.0
    w[250, 250] = float("inf")  # inf alone in an otherwise zero block
    q, s = quantize_weight_blockwise(w)
    deq = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    assert not torch.isnan(deq).any() and not torch.isnan(s).any()
    finite_amax = w[:128, :128][torch.isfinite(w[:128, :128])].abs().max()
    assert s[0, 0] == finite_amax / 448.0  # scale ignores the inf
    assert deq[3, 4] == q[3, 4].float() * s[0, 0] and q[3, 4].float() == 448.0
    assert q[5, 6].float() == -448.0
    assert q[250, 250].float() == 448.0 and s[1, 1] == 1.0
    # The rest of the inf blocks is still quantized accurately.
    mask = torch.isfinite(w)
    _assert_within_bound(w[mask], deq[mask], _expand(s, 128, 256, 256)[mask])


def test_nan_confined_to_its_block():
    w = torch.randn(300, 300).to(torch.bfloat16)
    w[130, 10] = float("nan")  # block (1, 0)
    q, s = quantize_weight_blockwise(w)
    deq = dequantize_weight_blockwise(q, s)
    nan_blocks = torch.isnan(s)
    assert nan_blocks.tolist() == [[False] * 3, [True, False, False], [False] * 3]
    expected_nan = _expand(nan_blocks.float(), 128, 300, 300).bool()
    assert torch.equal(torch.isnan(deq), expected_nan)
    assert torch.equal(torch.isnan(q.float()), expected_nan)


def test_power_of_two_scales_are_exact_powers():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(384, 256, generator=g) * torch.logspace(-20, 20, 384)[:, None]
    w[:128, :128] = 448.0 * 2.0**-5  # amax/448 is already a power of two
    q, s = quantize_weight_blockwise(w, power_of_two=True)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)
    assert s[0, 0] == 2.0**-5  # not rounded up a further step
    _, s_plain = quantize_weight_blockwise(w)
    assert torch.all(s >= s_plain) and torch.all(s < 2 * s_plain)
    # Rounding up means nothing needed clamping.
    assert q.float().abs().max() <= 448.0


def test_activation_tiles_3d():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 300, generator=g, dtype=torch.float32) * 10
    x[0, 1, 5] = 1e4  # an outlier only affects its own tile
    q, s = quantize_activation_tiles(x)
    assert q.shape == x.shape and q.dtype == F8
    assert s.shape == (2, 3, 3) and s.dtype == torch.float32
    expected_s = torch.nn.functional.pad(x.abs(), (0, 84)).view(2, 3, 3, 128).amax(-1).clamp(min=1e-4) / 448
    assert torch.equal(s, expected_s)
    deq = dequantize_activation_tiles(q, s)
    assert deq.dtype == torch.float32
    _assert_within_bound(x, deq, s.repeat_interleave(128, -1)[..., :300])
    ref = q.float() * s.repeat_interleave(128, -1)[..., :300]
    assert torch.equal(deq, ref)

    q2, s2 = quantize_activation_tiles(x.to(torch.bfloat16), tile=64, power_of_two=True)
    assert s2.shape == (2, 3, 5)
    assert torch.all(torch.frexp(s2).mantissa == 0.5)
    assert dequantize_activation_tiles(q2, s2, tile=64, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_activation_special_values():
    x = torch.zeros(4, 256)
    x[1, 3] = float("inf")
    x[2, 200] = float("nan")
    x[3, :] = 1e-30
    q, s = quantize_activation_tiles(x)
    deq = dequantize_activation_tiles(q, s)
    # eps floor: zero tiles get s = 1e-4 / 448, and stay zero.
    assert s[0, 0] == torch.tensor(1e-4) / 448 and torch.all(deq[0] == 0)
    assert deq[1, 3] == 448 * s[1, 0] and not torch.isnan(deq[1]).any()
    assert torch.isnan(deq[2, 128:]).all() and not torch.isnan(deq[2, :128]).any()
    assert not torch.isnan(deq[3]).any() and not torch.isnan(deq[[0, 1, 3]]).any()
