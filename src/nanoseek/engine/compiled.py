"""Optional whole-step `torch.compile` of decoding (`Engine(compile=True)`, `--compile`).

A batch-1 CPU decode step is ~50 matrix-vector products and a few hundred small tensor ops. In
eager mode each op pays Python and dispatcher overhead (3-5 us), and MKL's matrix-vector product
streams weights at only 7-10 GB/s. Compiling the *whole* step into one graph fixes both:

* no Python between ops: Inductor fuses the element-wise work (norms, RoPE, SiLU x up, softmax)
  into generated C++ loops;
* matrix products with at most `Experts.TRACED_MAX_TOKENS` (8) rows are rewritten as multiply-and-sum
  reductions (Inductor's `decompose_mm_pass`, enabled here for CPU), which Inductor turns into
  one vectorized, multi-threaded loop per weight: 12-25 GB/s instead of MKL's 7-10 (measured,
  docs/engine.md);
* the routed experts: at <= TRACED_MAX_TOKENS tokens the MoE runs `Experts._forward_traced`, where each
  chosen expert index is a graph scalar (`.item()`), so `gate_up_proj[e]` is a view and the step
  still reads only the chosen experts' weights;
* the cache position is a Python int traced as a symbolic size (`dynamic=True`), or, for rows at
  different positions (a server's batch), a tensor whose largest value becomes a graph scalar:
  one graph serves every position and cache length.

Weights stay graph inputs (no freezing), so a model trained between generate calls is read as it
is. Steps of up to TRACED_MAX_TOKENS tokens in all (batch-1 decode, speculative verification and
MTP drafting, batches of up to 8 rows) are compiled; larger ones and prefill run the eager path,
as does everything after a compile failure (no C++ compiler, an unsupported op), with one
warning. The first step of each new shape (batch size, tokens per step, int or per-row positions)
compiles for 20-60 s on a 2-core CPU; Inductor caches the result on disk, so later processes
start faster.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from ..model.attention import LatentCache
from ..model.moe import Experts
from . import steps


def _small_matmuls_as_reductions() -> dict:
    """Inductor options that rewrite CPU matmuls of <= TRACED_MAX_TOKENS rows as multiply-sum reductions.

    The pass reads its CPU size limits from module globals (set from the config at import), so
    they are set here too; other compiled graphs are affected only for matmuls that small.
    """
    limits = {"cpu_max_first_dimension_decomposition": Experts.TRACED_MAX_TOKENS,
              "cpu_max_other_dimension_decomposition": 1 << 30}
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass

        for name, value in limits.items():
            if not hasattr(mm_pass, name):
                return {}  # another torch version: compile without the rewrite
            setattr(mm_pass, name, value)
    except ImportError:
        return {}
    return {"post_grad_fusion_options": {"decompose_mm_pass": {**limits, "skip_dynamic_shape_dim_check": True}}}


def _fresh(fn):
    """The same function on a new code object. torch.compile caches graphs per code object (and
    stops compiling a code object after 8 variants): each engine gets its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledDecode:
    """Compiled `model(ids, start_pos, cache)` and MTP-step callables. Each returns None once
    compiling has failed (warned once): the engine then runs its own eager path."""

    def __init__(self, model: nn.Module) -> None:
        self.failed: str | None = None
        # Graphs per function: 1, 2, 3-4 and 5-8 rows (see Experts._forward_traced), each with int
        # or per-row positions; dynamo's default limit of 8 would leave no room to spare.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)

        def forward(ids: torch.Tensor, start_pos: int | torch.Tensor, cache: LatentCache):
            return steps.forward_step(model, ids, start_pos, cache)

        def mtp(next_tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int | torch.Tensor, cache: LatentCache):
            return steps.mtp_step(model, next_tokens, hidden, start_pos, cache)

        def greedy_verify(last: torch.Tensor, drafts: torch.Tensor, start_pos: int | torch.Tensor, cache: LatentCache):
            return steps.greedy_verify_step(model, last, drafts, start_pos, cache)

        opts = {"dynamic": True, "fullgraph": True, "options": _small_matmuls_as_reductions()}
        self._forward = torch.compile(_fresh(forward), **opts)
        self._mtp = torch.compile(_fresh(mtp), **opts)
        self._greedy_verify = torch.compile(_fresh(greedy_verify), **opts)

    def usable(self, ids: torch.Tensor | int) -> bool:
        """Can a step on these token ids (or this many tokens in all) run compiled?"""
        n = ids if isinstance(ids, int) else ids.numel()
        return self.failed is None and n <= Experts.TRACED_MAX_TOKENS

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure: back to eager for good
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile failed ({self.failed}); decoding on the plain path",
                          RuntimeWarning, stacklevel=3)
            return None

    def forward(self, ids: torch.Tensor, start_pos: int | torch.Tensor,
                cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [B, T, vocab], final hidden states [B, T, hidden]) of the tokens ids at start_pos."""
        return self._call(self._forward, ids, start_pos, cache)

    def greedy_verify(self, last: torch.Tensor, drafts: torch.Tensor, start_pos: int | torch.Tensor,
                      cache: LatentCache) -> tuple[torch.Tensor, ...] | None:
        """A greedy speculative step in one graph: the main model on [last, drafts] (logits [B, k+1, V]),
        `greedy_accept`'s emitted tokens [B, k+1] and accepted draft count n_acc [B], and the MTP
        module run on the argmaxes, with its hidden state [B, 1, H] and logits [B, V] at each row's
        position n_acc."""
        return self._call(self._greedy_verify, last, drafts, start_pos, cache)

    def mtp_step(self, next_tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int | torch.Tensor,
                 cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`model.mtp_step(0, ...)` with logits at every position."""
        return self._call(self._mtp, next_tokens, hidden, start_pos, cache)
