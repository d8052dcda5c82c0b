"""Whether a torch device exists on this machine, asked before any loading or training starts.

The engine and the trainer both refuse a device the machine lacks, each with its own error type;
the reason is worked out once, here.
"""

from __future__ import annotations

import torch


def device_unavailable(device: torch.device) -> str | None:
    """Why `device` cannot be used on this machine, or None if it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (f"no CUDA here (this torch {torch.__version__} "
                    f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} GPU(s) here"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None
