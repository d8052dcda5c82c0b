"""nanoseek.fp8.fake_quantize_*: the fused quantize -> dequantize used by FP8 emulation equals the
two-step functions bit for bit (NaN payloads aside), special values included."""

from __future__ import annotations

import pytest
import torch

from nanoseek.fp8 import (
    dequantize_activation_tiles,
    dequantize_weight_blockwise,
    fake_quantize_blockwise,
    fake_quantize_tiles,
    quantize_activation_tiles,
    quantize_weight_blockwise,
)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    fin = ~torch.isnan(a)
    assert torch.equal(a[fin].view(torch.int32), b[fin].view(torch.int32))  # -0 vs +0 counts


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (1, 1), (129, 127), (7, 3, 130)])
@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_two_step(shape, power_of_two, eps, dtype):
    g = torch.Generator().manual_seed(hash((shape, power_of_two, eps)) % 2**31)
    x = torch.randn(*shape, generator=g) * torch.exp(3 * torch.randn(*shape, generator=g))
    flat = x.view(-1)
    flat[0] = float("inf")
    if flat.numel() > 6:
        flat[3], flat[5], flat[-1] = float("-inf"), float("nan"), 0.0
    x = x.to(dtype)
    _same(fake_quantize_tiles(x, power_of_two=power_of_two, eps=eps),
          dequantize_activation_tiles(*quantize_activation_tiles(x, power_of_two=power_of_two, eps=eps)))
    if x.dim() == 2:
        _same(fake_quantize_blockwise(x, power_of_two=power_of_two),
              dequantize_weight_blockwise(*quantize_weight_blockwise(x, power_of_two=power_of_two), dtype=torch.float32))
