"""FP8 GEMMs the DeepSeek-V3 way: a training linear whose three GEMMs take E4M3 inputs, and an
inference linear that keeps FP8 weights in memory.

Training (V3 report section 3.3, spec section 7)
------------------------------------------------
A Linear layer runs three GEMMs per step. With X [T, K] (tokens x in-features), W [N, K] and the
output gradient dY [T, N]:

    Fprop  Y  = X  @ W^T     inner dim K:  X in 1x128 tiles (per token, 128 channels), W in 128x128 blocks
    Dgrad  dX = dY @ W       inner dim N:  dY in 1x128 tiles (per token, 128 out-channels), the same W blocks
    Wgrad  dW = dY^T @ X     inner dim T:  dY and X both in 128x1 tiles (128 tokens, one channel)

Every scale is constant along a 128-long stretch of the GEMM's inner dimension, so a kernel can
multiply 128-element FP8 partial sums by (scale_a * scale_b) and accumulate them in FP32, which is
what V3's kernels (and cuBLAS' block-scaled FP8 GEMM on Hopper) do. A 128x128 weight block fits
both Fprop (inner K) and Dgrad (inner N), which is why weights use square blocks and are quantized
once per step. For Wgrad the inner dimension is the token dimension, so per-token 1x128 scales
would vary inside a 128-long inner stretch: X and dY are quantized again, per 128 tokens of one
channel (128x1 tiles, i.e. 1x128 tiles of X^T and dY^T). Everything is E4M3 (no E5M2), scales are
online (the current amax of each tile/block), accumulation is FP32, and the output is returned in
the autocast dtype (bf16) or the input dtype.

What nanoseek does differently from V3's production kernels (documented, deliberate):

* The Linear's input is saved for backward in its own precision (bf16 under autocast, else fp32)
  and quantized to 128x1 tiles in the backward pass. V3 caches it in FP8 (1x128) and converts;
  that is a memory optimization which adds a second rounding. The FP8 weight (1 byte + scales) is
  saved from the forward and reused by Dgrad, as in V3.
* No E5M6 special format for the o_proj input, no FP8 MoE dispatch, no SwiGLU recomputation:
  those are memory / communication tricks that do not change which GEMM inputs are FP8.
* Activation scales floor the amax at 1e-4 (as DeepSeek's kernels do); gradient scales have no
  floor (gradients are legitimately tiny; an all-zero tile gets scale 1 and stays zero).
* Special values follow `nanoseek.fp8`: NaN poisons its tile/block (so it propagates to every
  output the tile touches), +-inf saturates to the largest finite magnitude of its tile (so an inf
  input gives a large finite output, not inf), zeros stay exactly zero.
* Shapes that are not multiples of 128 are handled by zero padding (partial edge tiles/blocks
  get the amax of their real elements), which is exact.

Backends: ``emulate`` quantizes with E4M3 rounding, dequantizes to FP32 and runs an FP32 matmul
(no TF32), so the numbers are those of an FP8 GEMM with FP32 accumulation, up to FP32 summation
order; it runs anywhere. ``cuda`` feeds the FP8 tensors and scales to ``torch._scaled_mm`` with
1x128 / 128x128 block scales (cuBLAS >= 12.9 on sm90); where that is rejected (other GPUs, older
CUDA, or a result that disagrees with the emulation in a one-time self-check) it falls back to
one tensor-wise FP8 ``_scaled_mm`` per 128-wide inner chunk with the scales applied in FP32
between chunks (the promotion scheme of the V3 report; correct, slower). cuBLAS reads 128x128
scales with a K-block count rounded up to a multiple of 4, so such GEMMs pad K to 512.
``auto`` picks ``cuda`` only on a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell).

Which layers (`enable_fp8_training`): the Linear layers V3 runs in FP8, the same set its
checkpoints store in FP8: q_proj / q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj,
the dense and shared-expert MLPs (gate/up/down), and the routed experts' stacked weights (per
expert GEMMs inside `Experts.expert_ffn`). Embedding, lm_head, the router gate, norms, MTP's
eh_proj and the attention core (softmax(QK^T)V, and the absorbed decode path that reads
kv_b_proj's weight directly) stay in higher precision. Master weights and gradients stay in the
parameters' dtype (fp32); the optimizer is untouched.

Inference (`FP8InferenceLinear`, `FP8InferenceExperts`)
--------------------------------------------------------
Weights are held as float8_e4m3fn (1 byte) plus float32 128x128 block scales, exactly as stored in
DeepSeek's checkpoints, and dequantized block-wise inside forward, one layer (one expert) at a
time, into the input's dtype. That runs on CPUs and on GPUs without FP8 units. On a GPU with FP8
support the activation is quantized in 1x128 tiles and the product computed by the FP8 GEMM.
``.weight`` (and the experts' ``gate_up_proj`` / ``down_proj``) still work: they return a freshly
dequantized tensor, so code that reads weights directly (MLA's absorbed decode) is unchanged.
Load a checkpoint this way with ``nanoseek.load_model(path, keep_fp8=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import (
    BLOCK_SIZE,
    dequantize_activation_tiles,
    dequantize_weight_blockwise,
    fake_quantize_blockwise,
    fake_quantize_tiles,
    quantize_activation_tiles,
    quantize_weight_blockwise,
)
from .model.moe import Experts

log = logging.getLogger(__name__)

_FP8 = torch.float8_e4m3fn
BACKENDS = ("auto", "emulate", "cuda")
# Linear layers DeepSeek-V3 runs (and stores) in FP8; must equal nanoseek.checkpoint.FP8_LINEARS.
FP8_LINEAR_NAMES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FP8Recipe:
    """Quantization knobs. Defaults are DeepSeek-V3's: E4M3, online max-abs scales, 128 tiles."""

    power_of_two_scales: bool = False  # V3.1's "ue8m0": scales rounded up to powers of two
    act_eps: float = 1e-4  # amax floor of activation tiles (DeepSeek's act_quant)
    grad_eps: float = 0.0  # amax floor of gradient tiles (none)


DEFAULT_RECIPE = FP8Recipe()


# ---- backend selection ----------------------------------------------------------------------------

def cuda_fp8_available(device: torch.device | str | None = None) -> bool:
    """True on a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _auto_backend(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" and cuda_fp8_available(device) else "emulate"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """'auto' -> 'cuda' on an FP8-capable GPU (device None: the current GPU, if any), else 'emulate'.

    'cuda' is checked: it raises ValueError without an FP8-capable GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device is not None:
            return _auto_backend(torch.device(device))
        return "cuda" if cuda_fp8_available() else "emulate"
    if backend == "cuda" and not cuda_fp8_available():
        raise ValueError("FP8 backend 'cuda' needs a CUDA GPU with compute capability >= 8.9 "
                         "(Ada / Hopper / Blackwell); use backend='emulate' (runs anywhere)")
    return backend


# ---- GEMM on quantized operands ---------------------------------------------------------------
#
# Every GEMM here is  out[M, N] = A[M, K] @ B[N, K]^T  with A in 1x128 tiles along K (scales
# [M, ceil(K/128)]) and B either in 128x128 blocks (scales [ceil(N/128), ceil(K/128)], "blocked")
# or in 1x128 tiles along K (scales [N, ceil(K/128)]). Output: float32.

@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """No TF32 in the emulated GEMM on CUDA (it would round the FP8-exact operands)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    except AttributeError:  # older torch
        old = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def _dequant_b(bq: Tensor, sb: Tensor, blocked: bool) -> Tensor:
    if blocked:
        return dequantize_weight_blockwise(bq, sb, dtype=torch.float32)
    return dequantize_activation_tiles(bq, sb, dtype=torch.float32)


def gemm_emulated(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, blocked: bool) -> Tensor:
    """FP8 GEMM emulated in FP32: dequantize both operands (exact E4M3 values x scales), matmul."""
    a = dequantize_activation_tiles(aq, sa, dtype=torch.float32)
    b = _dequant_b(bq, sb, blocked)
    with _ieee_fp32_matmul(a.device):
        return a @ b.t()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_fp8(q: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad an fp8 matrix through a uint8 view (no fp8 arithmetic needed); contiguous result."""
    if tuple(q.shape) == (rows, cols) and q.is_contiguous():
        return q
    out = torch.zeros((rows, cols), dtype=torch.uint8, device=q.device)
    out[: q.shape[0], : q.shape[1]] = q.view(torch.uint8) if q.is_contiguous() else q.contiguous().view(torch.uint8)
    return out.view(_FP8)


def _pad_scale(s: Tensor, rows: int, cols: int) -> Tensor:
    if tuple(s.shape) == (rows, cols):
        return s.float().contiguous()
    out = torch.ones((rows, cols), dtype=torch.float32, device=s.device)
    out[: s.shape[0], : s.shape[1]] = s
    return out


def _expand_rows(sb: Tensor, n: int, blocked: bool) -> Tensor:
    """B's scales as one row per output column: [n, nK]."""
    return sb.repeat_interleave(BLOCK_SIZE, 0)[:n] if blocked else sb


def _scaled_mm_blockwise(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, blocked: bool) -> Tensor:
    """cuBLAS block-scaled FP8 GEMM (sm90, CUDA >= 12.9) via torch._scaled_mm; dims zero-padded.

    cuBLASLt gets the scales as bare pointers and reads them in fixed layouts (cuBLAS docs,
    "scaling factors layouts"; PyTorch PR #166752): with L = K/128 and L4 = L rounded up to 4,
    1x128 scales are outer-dim-major ([M, L], stride [1, M]; B's likewise [N, L], stride [1, N]),
    and B's 128x128 scales are K-block-major with leading dimension L4 ([L4, N/128], stride [1, L4]).
    torch._scaled_mm (the v1 API) checks the 128x128 scales against stride L, not L4, and pads
    nothing, so an L that is not a multiple of 4 is accepted and silently multiplied with misread
    scales. In the blocked case K is therefore zero-padded to a multiple of 512 (L == L4; padded
    columns are zero with scale 1): that one layout satisfies torch's checks and cuBLAS.
    `_scaled_mm`'s scales multiply (dequantize), as ours do.
    """
    M, K = aq.shape
    N = bq.shape[0]
    k_mult = 4 * BLOCK_SIZE if blocked else BLOCK_SIZE  # blocked: ceil(K/128) % 4 == 0, see above
    Mp, Np, Kp = _round_up(M, 128), _round_up(N, 128), _round_up(K, k_mult)
    nk = Kp // 128
    a = _pad_fp8(aq, Mp, Kp)
    b = _pad_fp8(bq, Np, Kp)
    scale_a = _pad_scale(sa, Mp, nk).t().contiguous().t()  # [Mp, nk], stride [1, Mp]
    if blocked:
        scale_b = _pad_scale(sb, Np // 128, nk).t()  # [nk, Np/128], stride [1, nk]; nk == L4
    else:
        scale_b = _pad_scale(sb, Np, nk).t().contiguous()  # [nk, Np], stride [Np, 1]: its .t() is N-major
    out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32,
                           use_fast_accum=False)
    return out[:M, :N]


def _scaled_mm_chunked(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, blocked: bool) -> Tensor:
    """One tensor-wise FP8 GEMM per 128-wide K chunk, scales applied and summed in FP32.

    This is the promotion scheme of the V3 report (FP8 MMA over 128 elements, then scale and
    accumulate on CUDA cores), built from the tensor-wise `_scaled_mm` every sm89+ GPU supports.
    """
    M, K = aq.shape
    N = bq.shape[0]
    Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), _round_up(K, 128)
    a = _pad_fp8(aq, Mp, Kp)
    b = _pad_fp8(bq, Np, Kp)
    sa_full = sa.float()
    sb_rows = _expand_rows(sb.float(), N, blocked)  # [N, nK]
    one = torch.ones((), dtype=torch.float32, device=aq.device)
    out = torch.zeros((M, N), dtype=torch.float32, device=aq.device)
    for c in range(Kp // 128):
        part = torch._scaled_mm(a[:, c * 128:(c + 1) * 128], b[:, c * 128:(c + 1) * 128].t(),
                                scale_a=one, scale_b=one, out_dtype=torch.float32)
        out.addcmul_(part[:M, :N], sa_full[:, c:c + 1] * sb_rows[:, c][None, :])
    return out


_CUDA_MODE: dict[int, str] = {}  # device index -> "blockwise" | "chunked"


def _cuda_mode(device: torch.device) -> str:
    """Pick the CUDA GEMM once per device: blockwise if it runs and agrees with emulation."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _CUDA_MODE:
        return _CUDA_MODE[idx]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(200, 384, device=device, generator=g)
    b = torch.randn(320, 384, device=device, generator=g)
    aq, sa = quantize_activation_tiles(a)
    # K = 384 (3 K-blocks, not a multiple of 4) on purpose: the layout cuBLAS is most picky about.
    # Both GEMM kinds are checked: 128x128 weight blocks (Fprop/Dgrad) and 1x128 tiles (Wgrad).
    cases = ((*quantize_weight_blockwise(b), True), (*quantize_activation_tiles(b), False))
    mode = "chunked"
    try:
        errs = []
        for bq, sb, blocked in cases:
            ref = gemm_emulated(aq, sa, bq, sb, blocked)
            got = _scaled_mm_blockwise(aq, sa, bq, sb, blocked)
            errs.append(((got - ref).norm() / ref.norm()).item())
        if all(e < 1e-3 for e in errs):  # False for NaN too
            mode = "blockwise"
        else:
            log.warning("FP8 block-scaled _scaled_mm disagrees with emulation (rel. error %s); "
                        "using the per-128-chunk tensor-wise GEMM", ", ".join(f"{e:.2e}" for e in errs))
    except (RuntimeError, NotImplementedError, ValueError) as e:
        log.info("FP8 block-scaled _scaled_mm unavailable (%s); using the per-128-chunk GEMM", str(e).split("\n")[0])
    _CUDA_MODE[idx] = mode
    return mode


def gemm_cuda(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, blocked: bool) -> Tensor:
    if _cuda_mode(aq.device) == "blockwise":
        return _scaled_mm_blockwise(aq, sa, bq, sb, blocked)
    return _scaled_mm_chunked(aq, sa, bq, sb, blocked)


def fp8_gemm(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, blocked: bool, backend: str) -> Tensor:
    """out[M, N] = deq(A) @ deq(B)^T in FP32; A 1x128 tiles, B 128x128 blocks or 1x128 tiles."""
    if backend == "cuda":
        return gemm_cuda(aq, sa, bq, sb, blocked)
    return gemm_emulated(aq, sa, bq, sb, blocked)


# ---- the training linear ----------------------------------------------------------------------

def _out_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _fp8_transpose(q: Tensor) -> Tensor:
    """Contiguous transpose of an fp8 matrix (a byte copy)."""
    return q.view(torch.uint8).t().contiguous().view(_FP8)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, recipe: FP8Recipe) -> Tensor:
        out_dtype = _out_dtype(x)
        N, K = weight.shape
        p2 = recipe.power_of_two_scales
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, K)
            if backend == "cuda":
                xq, sx = quantize_activation_tiles(x2, power_of_two=p2, eps=recipe.act_eps)
                wq, sw = quantize_weight_blockwise(weight.detach(), power_of_two=p2)
                y = gemm_cuda(xq, sx, wq, sw, True)
                saved_w = (wq, sw)
            else:
                # Emulation: the same E4M3 values and scales (bit for bit), fused quantize -> dequantize.
                wd = fake_quantize_blockwise(weight.detach(), power_of_two=p2)
                with _ieee_fp32_matmul(x.device):
                    y = fake_quantize_tiles(x2, power_of_two=p2, eps=recipe.act_eps) @ wd.t()
                saved_w = (wd,)
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x, *saved_w)
        ctx.backend, ctx.recipe = backend, recipe
        ctx.has_bias = bias is not None
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.wshape = (N, K)
        return y.to(out_dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, *saved_w = ctx.saved_tensors
        backend, r = ctx.backend, ctx.recipe
        p2 = r.power_of_two_scales
        N, K = ctx.wshape
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            g = dy.reshape(-1, N)
            if ctx.needs_input_grad[0]:
                # Dgrad: dX = dY @ W; dY per token in 1x128 tiles along N, W^T in the same 128x128 blocks.
                if backend == "cuda":
                    wq, sw = saved_w
                    gq, sg = quantize_activation_tiles(g, power_of_two=p2, eps=r.grad_eps)
                    dx = gemm_cuda(gq, sg, _fp8_transpose(wq), sw.t().contiguous(), True)
                else:
                    with _ieee_fp32_matmul(g.device):
                        dx = fake_quantize_tiles(g, power_of_two=p2, eps=r.grad_eps) @ saved_w[0]
                dx = dx.to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                # Wgrad: dW = dY^T @ X, inner dim = tokens; both in 128x1 tiles (1x128 tiles of the transposes).
                gt, xt = g.t(), x.reshape(-1, K).t()
                if backend == "cuda":
                    gtq, sgt = quantize_activation_tiles(gt, power_of_two=p2, eps=r.grad_eps)
                    xtq, sxt = quantize_activation_tiles(xt, power_of_two=p2, eps=r.act_eps)
                    dw = gemm_cuda(gtq, sgt, xtq, sxt, False)
                else:
                    with _ieee_fp32_matmul(g.device):
                        dw = (fake_quantize_tiles(gt, power_of_two=p2, eps=r.grad_eps)
                              @ fake_quantize_tiles(xt, power_of_two=p2, eps=r.act_eps).t())
                dw = dw.to(ctx.w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = g.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "emulate",
               recipe: FP8Recipe = DEFAULT_RECIPE) -> Tensor:
    """``F.linear(x, weight, bias)`` with FP8 Fprop, Dgrad and Wgrad (see the module docstring)."""
    if backend == "auto":
        backend = _auto_backend(x.device)
    return _FP8LinearFn.apply(x, weight, bias, backend, recipe)


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in FP8 (E4M3, fine-grained scales).

    Same parameters and state dict as nn.Linear (master weights stay in their dtype), so a model's
    Linear layers can be switched in place (`enable_fp8_training`) and checkpoints do not change.
    """

    fp8_backend: str = "auto"
    fp8_recipe: FP8Recipe = DEFAULT_RECIPE

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto", recipe: FP8Recipe = DEFAULT_RECIPE) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_backend = backend if backend == "auto" else resolve_backend(backend)
        self.fp8_recipe = recipe

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fp8_backend, self.fp8_recipe)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8_backend}"


class FP8Experts(Experts):
    """Routed experts whose per-expert GEMMs (gate|up, down) run through `fp8_linear`.

    Weights stay the stacked fp32 parameters; each expert's [2I, H] and [H, I] slices are quantized
    in 128x128 blocks. Gate and up are quantized as separate matrices (as they are stored) when I is
    not a multiple of 128, so no block straddles the two.
    """

    fp8_backend: str = "auto"
    fp8_recipe: FP8Recipe = DEFAULT_RECIPE

    def _pairs_pay(self, x: Tensor, picks: int) -> bool:
        return False  # the paired fp32 products read the weights directly: evaluation would skip FP8

    def expert_ffn(self, e: int, x: Tensor) -> Tensor:
        b, r = self.fp8_backend, self.fp8_recipe
        w = self.gate_up_proj[e]
        I = self.inter
        if I % BLOCK_SIZE == 0:
            gate, up = fp8_linear(x, w, None, b, r).chunk(2, dim=-1)
        else:
            gate, up = fp8_linear(x, w[:I], None, b, r), fp8_linear(x, w[I:], None, b, r)
        return fp8_linear(F.silu(gate) * up, self.down_proj[e], None, b, r)


def _fp8_target(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and name.rsplit(".", 1)[-1] in FP8_LINEAR_NAMES


def enable_fp8_training(model: nn.Module, backend: str = "auto", recipe: FP8Recipe = DEFAULT_RECIPE) -> int:
    """Run the GEMMs DeepSeek-V3 runs in FP8 through FP8 linears; returns how many modules switched.

    Switches, in place, every nn.Linear named q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa /
    kv_b_proj / o_proj / gate_proj / up_proj / down_proj (attention projections, dense and shared
    MLPs, in the main layers and the MTP blocks) to `FP8Linear` and every routed `Experts` to
    `FP8Experts`. Parameters are the same objects (optimizer state, checkpoints and hooks are
    unaffected), so it may be called before or after building the optimizer, but before
    `torch.compile`. Embedding, lm_head, router gate, norms, MTP eh_proj and the attention core
    stay as they are. backend: "auto" (cuda on an FP8 GPU, else emulate), "emulate" or "cuda".
    """
    if backend != "auto":  # validate now; "auto" is resolved per call from the input's device
        backend = resolve_backend(backend)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}")
    n = 0
    for name, m in model.named_modules():
        if _fp8_target(name, m):
            m.__class__ = FP8Linear
        elif type(m) is Experts:
            m.__class__ = FP8Experts
        elif not isinstance(m, (FP8Linear, FP8Experts)):
            continue
        m.fp8_backend, m.fp8_recipe = backend, recipe
        n += 1
    log.info("FP8 training (backend %s): %d modules", backend, n)
    return n


def disable_fp8_training(model: nn.Module) -> int:
    """Undo `enable_fp8_training` (back to nn.Linear / Experts); returns how many modules reverted."""
    n = 0
    for m in model.modules():
        if type(m) is FP8Linear:
            m.__class__ = nn.Linear
        elif type(m) is FP8Experts:
            m.__class__ = Experts
        else:
            continue
        for attr in ("fp8_backend", "fp8_recipe"):
            m.__dict__.pop(attr, None)
        n += 1
    return n


def fp8_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that run FP8 GEMMs (training or inference modules)."""
    kinds = (FP8Linear, FP8Experts, FP8InferenceLinear, FP8InferenceExperts)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


# ---- inference: FP8 weights in memory -----------------------------------------------------------

class _KeepsFP8Buffers:
    """Mixin: `.to(dtype)` / `.half()` move FP8 weights and float32 scales without casting them."""

    _fp8_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers.pop(n) for n in self._fp8_buffers if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in kept.items():
                moved = fn(t)
                if moved.dtype != t.dtype:
                    moved = torch.empty_like(t, device=moved.device) if t.is_meta else t.to(device=moved.device)
                self._buffers[n] = moved
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype `.weight` dequantizes to: the dtype the model was last cast to."""
        return self._dtype_probe.dtype


def _dev_supports_scaled_mm(x: Tensor) -> bool:
    return x.device.type == "cuda" and cuda_fp8_available(x.device)


def _fp8_inference_matmul(x: Tensor, wq: Tensor, ws: Tensor, bias: Tensor | None, block: int) -> Tensor:
    """y = x @ deq(W)^T: FP8 GEMM on an FP8 GPU, else dequantize W block-wise into x's dtype."""
    N, K = wq.shape
    if block == BLOCK_SIZE and _dev_supports_scaled_mm(x):
        x2 = x.reshape(-1, K)
        xq, sx = quantize_activation_tiles(x2)
        y = gemm_cuda(xq, sx, wq, ws, True)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)
    w = dequantize_weight_blockwise(wq, ws, block_size=block, dtype=x.dtype)
    return F.linear(x, w, bias)


class FP8InferenceLinear(_KeepsFP8Buffers, nn.Module):
    """A Linear holding its weight as float8_e4m3fn + float32 128x128 `weight_scale_inv`.

    Buffers: `qweight` [out, in] fp8 and `weight_scale_inv` [ceil(out/b), ceil(in/b)] f32 (the
    checkpoint's tensors). forward dequantizes into the input's dtype (or uses the FP8 GEMM on an
    FP8 GPU). `.weight` returns the dequantized weight in the model's dtype. Inference only: the
    FP8 weight has no gradient.
    """

    _fp8_buffers = ("qweight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        nb = (math.ceil(out_features / block_size), math.ceil(in_features / block_size))
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=_FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(nb, dtype=torch.float32, device=device))
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE) -> "FP8InferenceLinear":
        """Quantize an existing Linear's weight (128x128 blocks, as `save_model(fp8=True)` does)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                dtype=w.dtype, block_size=block_size)
        q, s = quantize_weight_blockwise(w.float(), block_size=block_size)
        m.qweight.copy_(q)
        m.weight_scale_inv.copy_(s)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @property
    def weight(self) -> Tensor:
        return dequantize_weight_blockwise(self.qweight, self.weight_scale_inv, self.block_size, self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _fp8_inference_matmul(x, self.qweight, self.weight_scale_inv, self.bias, self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 e4m3 {self.block_size}x{self.block_size} blocks")


class FP8InferenceExperts(_KeepsFP8Buffers, Experts):
    """Routed experts with FP8 weights: gate|up [E, 2I, H] and down [E, H, I] as float8 + scales.

    Scales: `gate_up_scale_inv` [E, 2*ceil(I/b), ceil(H/b)] (gate's block rows, then up's: they are
    separate matrices on disk, so with I not a multiple of b no block straddles them) and
    `down_scale_inv` [E, ceil(H/b), ceil(I/b)]. Only the experts tokens were routed to are
    dequantized, one at a time. `gate_up_proj` / `down_proj` dequantize the whole stack (slow;
    for code that reads them directly).
    """

    _fp8_buffers = ("gate_up_qweight", "gate_up_scale_inv", "down_qweight", "down_scale_inv")

    def __init__(self, n_experts: int, hidden: int, inter: int, device=None, dtype: torch.dtype = torch.bfloat16,
                 block_size: int = BLOCK_SIZE) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: no full-precision parameters
        self.n_experts, self.inter, self.hidden, self.block_size = n_experts, inter, hidden, block_size
        b = block_size
        nbi, nbh = math.ceil(inter / b), math.ceil(hidden / b)
        E, H, I = n_experts, hidden, inter
        self.register_buffer("gate_up_qweight", torch.empty(E, 2 * I, H, dtype=_FP8, device=device))
        self.register_buffer("gate_up_scale_inv", torch.empty(E, 2 * nbi, nbh, dtype=torch.float32, device=device))
        self.register_buffer("down_qweight", torch.empty(E, H, I, dtype=_FP8, device=device))
        self.register_buffer("down_scale_inv", torch.empty(E, nbh, nbi, dtype=torch.float32, device=device))
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_experts(cls, experts: Experts, block_size: int = BLOCK_SIZE) -> "FP8InferenceExperts":
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        E, twoI, H = gu.shape
        m = cls(E, H, twoI // 2, device=gu.device, dtype=gu.dtype, block_size=block_size)
        for e in range(E):
            m.set_expert(e, "gate", gu[e, : m.inter])
            m.set_expert(e, "up", gu[e, m.inter:])
            m.set_expert(e, "down", dn[e])
        return m

    def _pairs_pay(self, x: Tensor, picks: int) -> bool:
        return False  # pairing reads the stacked weights, which here would dequantize every expert

    def _slot(self, e: int, which: str) -> tuple[Tensor, Tensor]:
        """(fp8 weight view, scale view) of expert e's gate, up or down matrix."""
        I, nbi = self.inter, math.ceil(self.inter / self.block_size)
        # select(0, e), not [e, :I]: in the compiled decode step e is a graph scalar, which
        # tuple indexing does not take
        if which == "gate":
            return self.gate_up_qweight.select(0, e)[:I], self.gate_up_scale_inv.select(0, e)[:nbi]
        if which == "up":
            return self.gate_up_qweight.select(0, e)[I:], self.gate_up_scale_inv.select(0, e)[nbi:]
        if which == "down":
            return self.down_qweight.select(0, e), self.down_scale_inv.select(0, e)
        raise ValueError(f"unknown expert matrix {which!r}")

    @torch.no_grad()
    def set_expert(self, e: int, which: str, w: Tensor, scale_inv: Tensor | None = None) -> None:
        """Fill expert e's gate/up/down from an fp8 tensor + scales, or quantize a float tensor."""
        q_dst, s_dst = self._slot(e, which)
        if scale_inv is None:
            w, scale_inv = quantize_weight_blockwise(w.float(), block_size=self.block_size)
        q_dst.view(torch.uint8).copy_(w.to(_FP8).view(torch.uint8))
        s_dst.copy_(scale_inv)

    def _matmul(self, x: Tensor, e: int, which: str) -> Tensor:
        q, s = self._slot(e, which)
        return _fp8_inference_matmul(x, q, s, None, self.block_size)

    def expert_ffn(self, e: int, x: Tensor) -> Tensor:
        return self._matmul(F.silu(self._matmul(x, e, "gate")) * self._matmul(x, e, "up"), e, "down")

    def _dequant(self, e: int, which: str) -> Tensor:
        q, s = self._slot(e, which)
        return dequantize_weight_blockwise(q, s, self.block_size, self.compute_dtype)

    @property
    def gate_up_proj(self) -> Tensor:
        return torch.stack([torch.cat((self._dequant(e, "gate"), self._dequant(e, "up")))
                            for e in range(self.n_experts)])

    @property
    def down_proj(self) -> Tensor:
        return torch.stack([self._dequant(e, "down") for e in range(self.n_experts)])

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, "
                f"fp8 e4m3 {self.block_size}x{self.block_size} blocks")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def convert_to_fp8_inference(model: nn.Module, quantize: bool = True, block_size: int = BLOCK_SIZE) -> int:
    """Replace the FP8-stored Linear layers and routed experts by FP8 inference modules.

    quantize=True quantizes the current weights (128x128 blocks, as a checkpoint would be stored);
    quantize=False only builds empty modules of the right shape (on the weights' device, e.g. meta,
    for a loader that fills them from a file). Returns how many modules were replaced.
    """
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)):
            continue
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in FP8_LINEAR_NAMES:
            w = m.weight
            if quantize:
                new = FP8InferenceLinear.from_linear(m, block_size)
            else:
                new = FP8InferenceLinear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                                         dtype=w.dtype, block_size=block_size)
        elif isinstance(m, Experts) and not isinstance(m, FP8InferenceExperts):
            if quantize:
                new = FP8InferenceExperts.from_experts(m, block_size)
            else:
                E, twoI, H = m.gate_up_proj.shape
                new = FP8InferenceExperts(E, H, twoI // 2, device=m.gate_up_proj.device,
                                          dtype=m.gate_up_proj.dtype, block_size=block_size)
        else:
            continue
        _set_submodule(model, name, new)
        n += 1
    return n


# ---- checkpoint loading support (used by nanoseek.checkpoint with keep_fp8=True) ---------------

def fp8_param_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Checkpoint parameter name (as `checkpoint_entries` uses) -> (FP8 module, which part)."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, m in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(m, FP8InferenceLinear):
            out[prefix + "weight"] = (m, "weight")
        elif isinstance(m, FP8InferenceExperts):
            out[prefix + "gate_up_proj"] = (m, "gate_up")
            out[prefix + "down_proj"] = (m, "down")
    return out


def _entry_slot(target: tuple[nn.Module, str], expert: int | None,
                rows: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """(fp8 weight, scales) of one checkpoint tensor inside an FP8 module (see fp8_param_targets)."""
    module, part = target
    if part == "weight":
        return module.qweight, module.weight_scale_inv
    which = "down" if part == "down" else ("gate" if rows is None or rows[0] == 0 else "up")
    return module._slot(expert, which)


def fp8_entry(target: tuple[nn.Module, str], expert: int | None,
              rows: tuple[int, int] | None) -> tuple[Tensor, Tensor, int, torch.dtype]:
    """One checkpoint tensor of an FP8 module as (fp8 codes, scales, block size, compute dtype): what
    saving writes as it is, or dequantizes."""
    q, s = _entry_slot(target, expert, rows)
    return q, s, target[0].block_size, target[0].compute_dtype


@torch.no_grad()
def load_fp8_entry(target: tuple[nn.Module, str], tensor_name: str, reader, expert: int | None,
                   rows: tuple[int, int] | None, block: tuple[int, int]) -> None:
    """Fill one checkpoint tensor into an FP8 module: FP8 + scales read as stored (no dequant);
    a bf16/fp32 tensor is quantized on the way in."""
    module = target[0]
    if block[0] != block[1] or block[0] != module.block_size:
        raise ValueError(f"{tensor_name}: FP8 block size {list(block)} does not match the module's "
                         f"{module.block_size}x{module.block_size}")
    q_dst, s_dst = _entry_slot(target, expert, rows)
    if reader.dtype(tensor_name) == _FP8:
        scale_name = tensor_name + "_scale_inv"
        if scale_name not in reader.map:
            raise ValueError(f"{tensor_name} is stored in FP8 but {scale_name} is missing")
        if q_dst.is_contiguous() and q_dst.device.type == "cpu":
            reader.load_into(tensor_name, q_dst, block)  # same dtype: read straight into place
        else:
            q_dst.copy_(reader.get(tensor_name).to(q_dst.device))
        s = reader.get(scale_name)
        if tuple(s.shape) != tuple(s_dst.shape):
            raise ValueError(f"{scale_name} has shape {list(s.shape)}, expected {list(s_dst.shape)}")
        s_dst.copy_(s)
    else:
        q, s = quantize_weight_blockwise(reader.get_dequantized(tensor_name, torch.float32, block),
                                         block_size=module.block_size)
        q_dst.view(torch.uint8).copy_(q.view(torch.uint8))
        s_dst.copy_(s)


__all__ = [
    "BACKENDS",
    "FP8_LINEAR_NAMES",
    "FP8Recipe",
    "FP8Linear",
    "FP8Experts",
    "FP8InferenceLinear",
    "FP8InferenceExperts",
    "cuda_fp8_available",
    "resolve_backend",
    "fp8_gemm",
    "fp8_linear",
    "enable_fp8_training",
    "disable_fp8_training",
    "fp8_module_names",
    "convert_to_fp8_inference",
]
