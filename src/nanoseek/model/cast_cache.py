"""A weight converted to another dtype, kept while the weight is unchanged.

Inference of a bf16 model on CPU runs a few small pieces in fp32 (the router, MLA's absorbed
attention core). Converting their weights on every decode step costs more than the step's own
arithmetic, so under no-grad the converted copy is cached on the module, keyed by the weight's
version counter and storage, and checked against a sample of 16 of its values: an optimizer step
or a reload invalidates it, as in GRPO, where the same model is trained and sampled in turn. (The
sample is there because some in-place updates leave the version counter alone: fused AdamW,
`p.data.mul_`, `p.data.copy_`.) With grad enabled it always converts, so autograd sees the
conversion. Inside `torch.compile` it converts in the graph too (with frozen
weights the conversion is folded into a constant at compile time).
"""

from __future__ import annotations

import torch
from torch import nn


SAMPLE = 16  # values compared on each use


def _sample(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)]


def weight_stamp(w: torch.Tensor) -> tuple:
    """What identifies a weight's current values cheaply: version counter, storage, dtype and a
    sample of its values (some in-place updates leave the version counter alone)."""
    return (w._version, w.data_ptr(), w.dtype, _sample(w).clone())


def stamp_matches(stamp: tuple | None, w: torch.Tensor, sampled: bool = True) -> bool:
    """Is `w` still what `stamp` was taken of? sampled=False: version, storage and dtype only
    (for checks on every call, where comparing values would cost more than the call)."""
    if stamp is None or stamp[:3] != (w._version, w.data_ptr(), w.dtype):
        return False
    # on a GPU the comparison would wait for the device at every use: the version counter only there
    return not sampled or w.device.type != "cpu" or torch.equal(stamp[3], _sample(w))


def cast_cached(owner: nn.Module, slot: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w.to(dtype)`, cached in `owner.__dict__[slot]` under no-grad while `w` is unchanged."""
    if w.dtype == dtype or torch.is_grad_enabled() or torch.compiler.is_compiling() or w.is_inference() \
            or (w.is_cuda and torch.cuda.is_current_stream_capturing()):
        # (a CUDA graph converts at every replay: a cached copy would go stale unseen when the
        # weight changes, since the graph never calls back here)
        # (an inference tensor has no version counter; here it is usually computed afresh anyway,
        # e.g. the dequantized weight of an FP8 module)
        return w.to(dtype)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[1] != dtype or not stamp_matches(cached[0], w):
        cached = (weight_stamp(w), dtype, w.detach().to(dtype))
        owner.__dict__[slot] = cached  # a plain attribute: not a buffer, never saved or moved
    return cached[2]
