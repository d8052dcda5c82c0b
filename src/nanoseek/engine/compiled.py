"""Optional `torch.compile` of the decode pieces that have static control flow (`Engine(compile=True)`).

The routed-expert dispatch is data dependent (which experts, how many tokens each) and stays
eager; attention (MLA), the dense / shared-expert MLPs and the routers are compiled per module with
dynamic shapes, to fuse their many small element-wise ops (norms, RoPE, masking, softmax). If
compiling fails (no C++ compiler, an unsupported op), the module falls back to its plain forward
with a warning: the plain path is always there.

Measured on the 2-core CPU machine (docs/engine.md): no gain -- the compiled bench-preset decode
step was 0-20% *slower* than eager with prepacked weights, after ~30 s of compiling. It is kept as
an option for GPUs, where fusing launches matters more; CUDA graphs are not implemented.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..model.attention import MLA
from ..model.moe import MLP, Gate


def _with_fallback(module: nn.Module, compiled):
    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure: back to eager
            warnings.warn(f"torch.compile failed for {type(module).__name__} ({type(e).__name__}: {e}); "
                          "using the plain forward", RuntimeWarning, stacklevel=2)
            module.__dict__.pop("forward", None)
            return module(*args, **kwargs)
    return forward


def compile_decode(model: nn.Module) -> bool:
    """Compile attention, MLPs and routers in place (per instance); returns True if anything was set up."""
    done = False
    for m in model.modules():
        if isinstance(m, (MLA, MLP, Gate)):
            m.forward = _with_fallback(m, torch.compile(m.forward, dynamic=True))
            done = True
    return done


def uncompile(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (MLA, MLP, Gate)):
            m.__dict__.pop("forward", None)
