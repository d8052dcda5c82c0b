"""Block-scaled FP8 (E4M3) quantization, as used by DeepSeek-V3.

The idea
--------
float8_e4m3fn has 4 exponent bits and 3 mantissa bits: it covers only
|x| <= 448 with about 2 significant decimal digits, and has no infinity.
A raw bf16 weight does not fit that range, so DeepSeek-V3 stores every
weight ``W`` of shape [M, N] as two tensors:

* ``Wq``  -- float8_e4m3fn, same shape as ``W``;
* ``S``   -- float32 ``weight_scale_inv`` of shape [ceil(M/128), ceil(N/128)],
  one scale per 128x128 block (edge blocks may be partial).

and reconstructs ``W[m, n] = float(Wq[m, n]) * S[m // 128, n // 128]``.
Quantizing a block picks ``s = amax(|W_blk|) / 448`` so that the largest
element lands exactly on the top of the E4M3 range, then ``Wq = e4m3(W_blk/s)``.
A per-block scale keeps one outlier from destroying the precision of the
whole matrix, while costing only 4 bytes per 16384 weights.

Activations in the training recipe are scaled per 1x128 tile along the last
(contraction) dimension instead, because outliers in activations cluster per
token/channel; the official inference kernel floors the amax at 1e-4.
DeepSeek-V3.1 optionally rounds scales up to a power of two ("ue8m0"), so
that scaling is an exact exponent shift; rounding *up* guarantees the tile
still fits in +-448.

Error bound
-----------
E4M3 rounds to nearest with 3 mantissa bits: for a normal value y in
[2^e, 2^(e+1)) the spacing is 2^(e-3), so |y - e4m3(y)| <= 2^-4 |y|; below
the smallest normal (2^-6) the spacing is 2^-9, an absolute error of at most
2^-10. Scaling back by s gives, per element,

    |x - deq(q(x))| <= 2^-4 |x| + 2^-10 * s     (+ float32 rounding, ~2^-23 |x|)

with s = amax/448 (or at most 2*amax/448 with power-of-two scales). In
particular every element of a block is within amax_block * 2^-4 (+ tiny).

Special values (a deliberate policy)
------------------------------------
* NaN: the block/tile amax is NaN, so its scale is NaN and the whole block
  dequantizes to NaN. Other blocks are untouched. A NaN weight means a broken
  checkpoint; poisoning exactly its block makes that visible in the scales.
* +-inf: the amax is taken over *finite* values only, and +-inf saturates to
  +-448, i.e. dequantizes to +-(finite block amax) (or +-448 when the block
  has no non-zero finite value). This never creates a NaN where the input had
  none, and never lets one inf flatten the rest of its block to zero.
* zeros: an all-zero block would give s = 0 and 0/0 = NaN, so a zero scale
  (including amax so small that amax/448 underflows) is replaced by 1.0;
  zeros stay exactly zero.
* Values are clamped to +-448 before the cast: float8_e4m3fn has no inf,
  and depending on the torch version/device an out-of-range cast yields NaN
  rather than saturating.

All arithmetic is done in float32. On CPU, float8 dtypes, casts and views
work, but arithmetic on float8 tensors does not, so every fp8 tensor is
cast to float32 before it is touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_E4M3_MAX = 448.0
BLOCK_SIZE = 128

# Elements per chunk of block rows. Bounds the float32 temporaries to a few
# times 16 MiB, so an 18432x7168 bf16 weight (~132M elements) never needs
# several full-size float32 copies alive at once.
_CHUNK_ELEMS = 1 << 22

_FP8 = torch.float8_e4m3fn


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up_pow2(s: Tensor) -> Tensor:
    # frexp/ldexp instead of exp2(ceil(log2(s))): exact for every float32,
    # including subnormals, with no libm rounding on exact powers of two.
    mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)  # already a power of two
    p2 = torch.ldexp(torch.ones_like(s), exp)
    return torch.where(torch.isfinite(s) & (s > 0), p2, s)  # keep NaN as NaN


def _scale_from_amax(amax: Tensor, power_of_two: bool) -> Tensor:
    s = amax / FP8_E4M3_MAX
    # Guard s == 0 (not just amax == 0): a subnormal amax can underflow here.
    s = torch.where(s == 0, torch.ones_like(s), s)
    if power_of_two:
        s = _round_up_pow2(s)
    return s


def _finite_abs(x: Tensor) -> Tensor:
    # |x| with +-inf mapped to 0 so the scale comes from finite values;
    # NaN is kept so amax (which propagates NaN) poisons only its block.
    a = x.abs()
    return a.masked_fill(torch.isinf(a), 0.0)


def _to_fp8(y: Tensor) -> Tensor:
    # clamp also turns +-inf into +-448; NaN passes through clamp unchanged.
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8)


def _rows_per_chunk(block_size: int, n_cols: int) -> int:
    """Block rows per chunk, at least one."""
    return max(1, _CHUNK_ELEMS // max(1, block_size * n_cols))


def quantize_weight_blockwise(
    w: Tensor, block_size: int = BLOCK_SIZE, power_of_two: bool = False
) -> tuple[Tensor, Tensor]:
    """Quantize a 2-D weight to float8_e4m3fn with one scale per block.

    Returns ``(w_fp8, scale_inv)``: ``w_fp8`` has ``w``'s shape and
    ``scale_inv`` is float32 of shape [ceil(M/b), ceil(N/b)], such that
    ``w ~= w_fp8.float() * scale_inv`` expanded blockwise.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    b = block_size
    M, N = w.shape
    nbr, nbc = _ceil_div(M, b), _ceil_div(N, b)
    out = torch.empty((M, N), dtype=_FP8, device=w.device)
    scale_inv = torch.empty((nbr, nbc), dtype=torch.float32, device=w.device)
    if M == 0 or N == 0:  # amax over an empty block is undefined
        return out, scale_inv

    step = _rows_per_chunk(b, N)
    for br0 in range(0, nbr, step):
        br1 = min(nbr, br0 + step)
        r0, r1 = br0 * b, min(M, br1 * b)
        x = w[r0:r1].float()
        # Zero padding cannot raise |x|'s amax, so partial edge blocks get
        # the amax of their real elements; the padding is dropped below.
        pad_r, pad_c = (br1 - br0) * b - (r1 - r0), nbc * b - N
        if pad_r or pad_c:
            x = F.pad(x, (0, pad_c, 0, pad_r))
        blocks = x.view(br1 - br0, b, nbc, b)
        amax = _finite_abs(blocks).amax(dim=(1, 3))
        s = _scale_from_amax(amax, power_of_two)
        q = _to_fp8(blocks / s[:, None, :, None])
        out[r0:r1] = q.view((br1 - br0) * b, nbc * b)[: r1 - r0, :N]
        scale_inv[br0:br1] = s
    return out, scale_inv


def dequantize_weight_blockwise(
    w_fp8: Tensor,
    scale_inv: Tensor,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Reconstruct ``W[m, n] = float(Wq[m, n]) * S[m // b, n // b]`` in ``dtype``.

    Bit-identical to
    ``(w_fp8.float() * scale_inv.repeat_interleave(b, 0)[:M]
    .repeat_interleave(b, 1)[:, :N]).to(dtype)``, computed over chunks of
    block rows so that only a chunk-sized float32 temporary exists at a time.
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"expected a 2-D fp8 weight, got shape {tuple(w_fp8.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    b = block_size
    M, N = w_fp8.shape
    expected = (_ceil_div(M, b), _ceil_div(N, b))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
            f"= (ceil({M}/{b}), ceil({N}/{b})) for a weight of shape ({M}, {N}) "
            f"with block_size={b}"
        )
    # float32 * bf16/f16 promotes to float32 exactly, so converting the scale
    # first does not change a single bit of the product.
    s_all = scale_inv.to(device=w_fp8.device, dtype=torch.float32)
    if torch.compiler.is_compiling() and M > 0 and N > 0:
        # Inside a compiled graph (the engine's decode step), the scales broadcast to [M, N] through
        # an expand + reshape: a plain 2-D elementwise product that Inductor fuses into the matmul
        # that reads it, so the FP8 bytes are converted in registers and no dequantized copy is
        # written. (The block view below made Inductor write the whole fp32 weight first: a step
        # then read 9 bytes per weight instead of 1.) Same float32 products, same rounding.
        nb0, nb1 = expected
        if M % b == 0 and N % b == 0:
            s = s_all[:, None, :, None].expand(nb0, b, nb1, b).reshape(M, N)
            return (w_fp8.to(torch.float32) * s).to(dtype)
        # Partial blocks: padded to whole blocks, scaled on the block view, converted, cut back.
        # (torch 2.13's Inductor miscompiled the other orders tried for weights of one block row:
        # scales broadcast onto the unpadded weight by expand, repeat_interleave or a gather, and
        # cutting back before the conversion to bf16; all-zero or garbage outputs.)
        w = F.pad(w_fp8.to(torch.float32), (0, nb1 * b - N, 0, nb0 * b - M))
        return (w.view(nb0, b, nb1, b) * s_all[:, None, :, None]).to(dtype).view(nb0 * b, nb1 * b)[:M, :N]
    step = _rows_per_chunk(b, N)
    if expected[0] <= step and M % b == 0 and N % b == 0 and M > 0 and N > 0:
        # Whole blocks in one chunk (most layers): broadcast the scales over block views, no
        # expanded scale matrix and no extra copy. Same float32 products, same rounding.
        q = w_fp8.to(torch.float32, memory_format=torch.contiguous_format)
        return q.view(M // b, b, N // b, b).mul_(s_all[:, None, :, None]).view(M, N).to(dtype)
    out = torch.empty((M, N), dtype=dtype, device=w_fp8.device)
    for br0 in range(0, expected[0], step):
        br1 = min(expected[0], br0 + step)
        r0, r1 = br0 * b, min(M, br1 * b)
        s = s_all[br0:br1].repeat_interleave(b, 0)[: r1 - r0]
        s = s.repeat_interleave(b, 1)[:, :N]
        out[r0:r1] = (w_fp8[r0:r1].float() * s).to(dtype)
    return out


def quantize_activation_tiles(
    x: Tensor, tile: int = BLOCK_SIZE, power_of_two: bool = False, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Quantize per 1 x ``tile`` tile along the last dim of an N-D tensor.

    Returns ``(x_fp8, scales)`` with ``x_fp8`` shaped like ``x`` and float32
    ``scales`` of shape ``x.shape[:-1] + (ceil(K / tile),)``; the scale is
    ``max(amax, eps) / 448`` as in the official inference kernel.
    """
    if x.dim() < 1:
        raise ValueError("expected a tensor with at least one dimension")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    K = x.shape[-1]
    nt = _ceil_div(K, tile)
    xf = x.reshape(-1, K).float()
    if nt * tile != K:
        xf = F.pad(xf, (0, nt * tile - K))  # zeros never raise the amax
    tiles = xf.view(-1, nt, tile)
    # clamp(min=eps) keeps NaN, so a NaN tile still gets a NaN scale.
    amax = _finite_abs(tiles).amax(dim=-1).clamp(min=eps)
    s = _scale_from_amax(amax, power_of_two)
    q = _to_fp8(tiles / s[..., None]).view(-1, nt * tile)[:, :K]
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], nt)


def dequantize_activation_tiles(
    x_fp8: Tensor, scales: Tensor, tile: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_activation_tiles`: ``x[..., k] = q[..., k] * s[..., k // tile]``."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    K = x_fp8.shape[-1]
    expected = (*x_fp8.shape[:-1], _ceil_div(K, tile))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales has shape {tuple(scales.shape)}, expected {expected} for an "
            f"activation of shape {tuple(x_fp8.shape)} with tile={tile}"
        )
    s = scales.to(device=x_fp8.device, dtype=torch.float32).repeat_interleave(tile, -1)[..., :K]
    return (x_fp8.float() * s).to(dtype)


def _amax_finite(a: Tensor, dim) -> Tensor:
    """amax of |x| (given as ``a``) over ``dim`` with +-inf ignored and NaN kept, as _finite_abs.

    The masked pass only runs when some amax is infinite (rare), so the usual cost is one reduction.
    """
    amax = a.amax(dim=dim)
    if torch.isinf(amax).any():
        amax = a.masked_fill(torch.isinf(a), 0.0).amax(dim=dim)
    return amax


def fake_quantize_tiles(
    x: Tensor, tile: int = BLOCK_SIZE, power_of_two: bool = False, eps: float = 1e-4
) -> Tensor:
    """``dequantize_activation_tiles(*quantize_activation_tiles(x, ...))`` in float32, bit for bit,
    with fewer passes (no scale expansion, one float32 temporary). For FP8 emulation."""
    if x.dim() < 1:
        raise ValueError("expected a tensor with at least one dimension")
    K = x.shape[-1]
    nt = _ceil_div(K, tile)
    xf = x.reshape(-1, K).float()
    if nt * tile != K:
        xf = F.pad(xf, (0, nt * tile - K))
    tiles = xf.view(-1, nt, tile)
    amax = _amax_finite(tiles.abs(), -1).clamp(min=eps)
    s = _scale_from_amax(amax, power_of_two)[..., None]
    q = (tiles / s).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8)
    y = q.float().mul_(s).view(-1, nt * tile)
    if nt * tile != K:
        y = y[:, :K]
    return y.reshape(x.shape)


def fake_quantize_blockwise(w: Tensor, block_size: int = BLOCK_SIZE, power_of_two: bool = False) -> Tensor:
    """``dequantize_weight_blockwise(*quantize_weight_blockwise(w, ...), dtype=float32)`` bit for bit,
    in one go (no chunking: meant for the weights of one layer during FP8 emulation)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    b = block_size
    M, N = w.shape
    nbr, nbc = _ceil_div(M, b), _ceil_div(N, b)
    xf = w.float()
    if nbr * b != M or nbc * b != N:
        xf = F.pad(xf, (0, nbc * b - N, 0, nbr * b - M))
    blocks = xf.view(nbr, b, nbc, b)
    s = _scale_from_amax(_amax_finite(blocks.abs(), (1, 3)), power_of_two)[:, None, :, None]
    q = (blocks / s).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8)
    y = q.float().mul_(s).view(nbr * b, nbc * b)
    if nbr * b != M or nbc * b != N:
        y = y[:M, :N]
    return y


__all__ = [
    "FP8_E4M3_MAX",
    "BLOCK_SIZE",
    "quantize_weight_blockwise",
    "dequantize_weight_blockwise",
    "quantize_activation_tiles",
    "dequantize_activation_tiles",
    "fake_quantize_tiles",
    "fake_quantize_blockwise",
]
