"""Optional `torch.compile` of the decode pieces that have static control flow.

The routed-expert dispatch is data dependent (which experts, how many tokens each) and stays
eager; attention (MLA, both paths), the dense/shared-expert MLPs and the router are compiled per
module with dynamic shapes, which fuses their many small element-wise ops (norms, RoPE, masking,
softmax) into a few kernels. The first calls compile (tens of seconds on 2 CPU cores); the plain
modules stay the reference. Measured effect: docs/engine.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import MLA
from ..model.moe import MLP, Gate


def compile_decode(model: nn.Module) -> bool:
    """Compile attention, MLPs and routers in place (per instance); returns True if anything was compiled."""
    done = False
    for m in model.modules():
        if isinstance(m, (MLA, MLP, Gate)):
            m.forward = torch.compile(m.forward, dynamic=True)
            done = True
    return done
