"""CPU fast path: linear layers on weights prepacked for oneDNN, with the plain path kept beside it.

At decode time a CPU forward is a chain of matrix-vector products over weights far larger than
the caches, so its speed is how fast the weights stream from memory. PyTorch's default
`F.linear` (MKL on a row-major weight) streams them at roughly 8-14 GB/s on the 2-core machines
this project measures on; the same product on a weight reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's freezing pass uses) runs
1.3-2.5x faster, at batch 1 and 8 alike, and at prefill sizes too (see docs/engine.md).

`pack_model(model)` keeps the model itself untouched -- same modules, same parameters, same
checkpoint -- and gives each `nn.Linear` and each routed expert a packed copy of its weight
(doubling weight memory: pass `fast=False` to the engine for models near the RAM size). The
packed product is used only when it is valid:

* no autograd (inference mode / no_grad), so training the same model object is unaffected;
* the weight has not changed since packing (its version counter and storage are checked on every
  call; `PackedModel.refresh()` repacks what an optimizer step changed, the engine calls it at
  the start of every generate);
* the input has the weight's dtype (no autocast mixing);
* not inside `torch.compile` (the compiled step, compiled.py, reads the plain weights and turns
  its few-row products into fused reductions, faster than the packed call).

Otherwise the call falls through to the plain `F.linear`: the reference path stays, and
`tests/test_engine.py` checks that both agree. Nothing here runs on other devices.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model.cast_cache import stamp_matches, weight_stamp
from ..model.moe import MLP, Experts


@functools.lru_cache(maxsize=None)
def onednn_supports(dtype: torch.dtype) -> bool:
    """True if this build and CPU can pack and run a oneDNN linear in `dtype` (fp16 needs AVX512-FP16)."""
    try:
        w = torch.randn(8, 4).to(dtype)
        p = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        x = torch.randn(2, 4).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except Exception:  # noqa: BLE001 - any failure means: use the plain path
        return False


# fp32 weights up to this many numbers run on the plain `F.linear` (MKL) when the input has at
# most PLAIN_MAX_ROWS rows (decode): for such small matrices the oneDNN primitive's fixed cost
# (~10 us per call on the 2-core machine, vs 3-6 us for MKL) outweighs its faster streaming
# (docs/engine.md). Prefill-sized inputs and bf16/fp16 weights (MKL's small bf16 GEMMs are slower
# still) always take the packed product.
PACK_MIN_FP32 = 131072
PLAIN_MAX_ROWS = 16


def prefer_plain(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Use plain F.linear for this [.., in] input on this [out, in] weight (small fp32, few rows)?"""
    return w.dtype == torch.float32 and w.numel() <= PACK_MIN_FP32 and x.numel() <= PLAIN_MAX_ROWS * x.shape[-1]


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)


# oneDNN builds (JIT-compiles) a primitive for each input row count and caches it (1,024 entries in
# oneDNN's cache and in ideep's), at about 0.5-1 MB each that is never given back: a server seeing
# a new prefill size, or a new expert token count, with every request grew by ~2 MB per prompt
# length (tiny preset: 350 MiB -> 1 GiB after 300 lengths). Row counts above EXACT_ROWS are padded
# up to one of ROW_STEPS_PER_OCTAVE sizes per power of two, so each weight sees at most ~56 sizes up
# to 16k rows: at most 25% more rows (~10% on average), none up to 16 rows (a batch of 17-32 decode
# rows is padded too, at no cost: decode reads weights, and the extra rows reuse what was read).
EXACT_ROWS = 16
ROW_STEPS_PER_OCTAVE = 4


def rows_bucket(m: int) -> int:
    """The row count a product of `m` rows runs at on the packed path (>= m)."""
    if m <= EXACT_ROWS:
        return m
    step = max(1, (1 << (m.bit_length() - 1)) // ROW_STEPS_PER_OCTAVE)  # (the power of two <= m) / 4
    return -(-m // step) * step


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    b = rows_bucket(m)
    if b != m:
        x2 = torch.cat((x2, x2.new_zeros(b - m, x2.shape[1])))
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return (y[:m] if b != m else y).reshape(*x.shape[:-1], y.shape[-1])


class _Packed:
    """A packed copy of one weight and what it was packed from."""

    __slots__ = ("source", "stamp", "packed")

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        self.pack()

    def pack(self) -> None:
        self.stamp = weight_stamp(self.source)
        self.packed = _pack(self.source)

    @property
    def dtype(self) -> torch.dtype:
        return self.stamp[2]

    def fresh(self, w: torch.Tensor, thorough: bool = False) -> bool:
        """Same weight as packed? Per call: version, storage and dtype; `refresh` also compares
        sampled values (updates that bypass the version counter: fused AdamW, `.data`)."""
        return stamp_matches(self.stamp, w, sampled=thorough)


class PackedModel:
    """Packed weights for every linear layer and routed expert of a model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linears: list[tuple[nn.Linear, _Packed]] = []
        self.experts: list[tuple[Experts, list[tuple[_Packed, _Packed]]]] = []
        self.mlps: list[tuple[MLP, _PackedPair]] = []
        fused = set()
        for m in model.modules():
            if type(m) is MLP and type(m.gate_proj) is type(m.up_proj) is nn.Linear \
                    and m.gate_proj.weight.device.type == "cpu" and onednn_supports(m.gate_proj.weight.dtype):
                # (not an MLP of FP8 modules: their `.weight` is dequantized afresh at each use)
                # gate and up read the same input: one packed [2I, H] product instead of two
                pair = _PackedPair(m.gate_proj.weight, m.up_proj.weight)
                self.mlps.append((m, pair))
                m.forward = functools.partial(_packed_mlp_forward, m, pair)
                fused.update((id(m.gate_proj), id(m.up_proj)))
        for m in model.modules():
            if type(m) is nn.Linear and id(m) not in fused and m.weight.device.type == "cpu" \
                    and onednn_supports(m.weight.dtype):
                entry = _Packed(m.weight)
                self.linears.append((m, entry))
                m.forward = functools.partial(_packed_linear_forward, m, entry)  # instance attribute
            elif type(m) is Experts and m.gate_up_proj.device.type == "cpu" and onednn_supports(m.gate_up_proj.dtype):
                entries = [(_PackedSlice(m.gate_up_proj, e), _PackedSlice(m.down_proj, e)) for e in range(m.n_experts)]
                self.experts.append((m, entries))
                m.expert_ffn = functools.partial(_packed_expert_ffn, m, entries)

    def refresh(self) -> int:
        """Repack weights that changed (optimizer steps, reloads); returns how many were repacked."""
        n = 0
        for m, entry in self.linears:
            if not entry.fresh(m.weight, thorough=True):
                entry.source = m.weight
                entry.pack()
                n += 1
        for m, pair in self.mlps:
            if not pair.fresh(m.gate_proj.weight, m.up_proj.weight, thorough=True):
                pair.sources = (m.gate_proj.weight, m.up_proj.weight)
                pair.pack()
                n += 1
        for m, entries in self.experts:
            # every slice of a stack carries the same stamp: check each stack once, repack all its slices
            for which, src in ((0, m.gate_up_proj), (1, m.down_proj)):
                if not entries[0][which].fresh(src, thorough=True):
                    for pair in entries:
                        pair[which].source = src
                        pair[which].pack()
                        n += 1
        return n

    def remove(self) -> None:
        """Back to the plain modules (drops the packed copies)."""
        for m, _ in self.linears:
            m.__dict__.pop("forward", None)
        for m, _ in self.experts:
            m.__dict__.pop("expert_ffn", None)
        for m, _ in self.mlps:
            m.__dict__.pop("forward", None)
        self.linears, self.experts, self.mlps = [], [], []

    def nbytes(self) -> int:
        total = sum(e.source.numel() * e.source.element_size() for _, e in self.linears)
        total += sum(sum(t.numel() * t.element_size() for t in p.sources) for _, p in self.mlps)
        for m, _ in self.experts:
            total += sum(t.numel() * t.element_size() for t in (m.gate_up_proj, m.down_proj))
        return total


def unpack(model: nn.Module) -> None:
    """Remove any packed fast path from a model's modules (whichever engine installed it)."""
    for m in model.modules():
        if type(m) in (nn.Linear, MLP):
            m.__dict__.pop("forward", None)
        elif type(m) is Experts:
            m.__dict__.pop("expert_ffn", None)


class _PackedSlice(_Packed):
    """Packed expert e of a stacked [E, out, in] parameter; freshness is tracked on the stack."""

    __slots__ = ("expert",)

    def __init__(self, source: torch.Tensor, expert: int) -> None:
        self.expert = expert
        super().__init__(source)

    def pack(self) -> None:
        self.stamp = weight_stamp(self.source)
        self.packed = _pack(self.source[self.expert])


class _PackedPair:
    """Two weights [n1, in], [n2, in] packed as one [n1 + n2, in] product (an MLP's gate and up)."""

    __slots__ = ("sources", "stamps", "packed")

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.sources = (a, b)
        self.pack()

    def pack(self) -> None:
        a, b = self.sources
        self.stamps = (weight_stamp(a), weight_stamp(b))
        self.packed = _pack(torch.cat((a.detach(), b.detach())))

    @property
    def dtype(self) -> torch.dtype:
        return self.stamps[0][2]

    def fresh(self, a: torch.Tensor, b: torch.Tensor, thorough: bool = False) -> bool:
        return stamp_matches(self.stamps[0], a, thorough) and stamp_matches(self.stamps[1], b, thorough)


def _packed_mlp_forward(m: MLP, pair: _PackedPair, x: torch.Tensor) -> torch.Tensor:
    g, u = m.gate_proj.weight, m.up_proj.weight
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (g.requires_grad or x.requires_grad)) or x.dtype != pair.dtype \
            or not pair.fresh(g, u) or prefer_plain(g, x):
        return MLP.forward(m, x)
    gate, up = _linear(x, pair.packed, None).chunk(2, dim=-1)
    return m.down_proj(F.silu(gate) * up)


def _packed_linear_forward(m: nn.Linear, entry: _Packed, x: torch.Tensor) -> torch.Tensor:
    w = m.weight
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or x.dtype != entry.dtype \
            or not entry.fresh(w) or prefer_plain(w, x):
        return F.linear(x, w, m.bias)
    return _linear(x, entry.packed, m.bias)


def _packed_expert_ffn(m: Experts, entries: list[tuple[_Packed, _Packed]], e: int, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return Experts.expert_ffn(m, e, x)
    gu, dn = entries[e]
    if (torch.is_grad_enabled() and (m.gate_up_proj.requires_grad or x.requires_grad)) or x.dtype != gu.dtype \
            or not gu.fresh(m.gate_up_proj) or not dn.fresh(m.down_proj):
        return Experts.expert_ffn(m, e, x)
    w_gu = m.gate_up_proj[e]
    gate, up = (F.linear(x, w_gu) if prefer_plain(w_gu, x) else _linear(x, gu.packed, None)).chunk(2, dim=-1)
    h = F.silu(gate) * up
    w_dn = m.down_proj[e]
    return F.linear(h, w_dn) if prefer_plain(w_dn, h) else _linear(h, dn.packed, None)
