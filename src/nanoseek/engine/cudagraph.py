"""CUDA graphs for the decode step on a GPU (`Engine(cuda_graphs=...)`, on by default on CUDA).

A decode step of a small model is a few hundred tiny kernels. Launched one by one from Python,
the GPU waits for the host between them: on an H100 the `bench` model decoded ~60 tokens/s at
batch 1 in eager mode, whatever the batch size, a small fraction of what the hardware can do. A
CUDA graph records the step's kernels once and replays them with one launch.

A graph replays fixed kernels on fixed memory, so the recorded step must not read values back to
the host or branch on them. Three things make the step that way while it is being recorded:

* positions are always per-row tensors, and attention reads a fixed number of cache slots
  (`LatentCache.attend_len`, a bucket: the next power of two >= the furthest position, at least
  128), masking slots past each row's position, instead of slicing to the furthest row's end;
* the routed experts take `Experts._forward_static` (no data-dependent shapes or host reads);
* dtype conversions of weights run inside the graph rather than from a host-side cache.

Graphs are keyed by step kind, input shapes, attend_len and the latent cache's addresses and
layout (a graph records the addresses it writes): a server's cache pool keeps one graph per step
kind, batch size, tokens per step and span. `generate` builds a cache per call, and a new one
(smaller) whenever rows finish, so it records again unless the allocator hands back the same
memory laid out the same way. Each recording also synchronizes and empties PyTorch's cache (what
`torch.cuda.graph` does), a few milliseconds. The MAX_GRAPHS most recently used are kept. Recording takes a few milliseconds after one eager warm-up run of the same step (which
writes the same cache entries the replay writes). The graphs' inputs are copied in and their
outputs copied out, so callers never hold the graph's own memory. Weights are read in place, so
a model trained between calls is seen as it is; weights replaced by new tensors (`model.to(...)`,
`load_state_dict(..., assign=True)`) drop the graphs at the next generate call or prefill.
Anything that fails to record (an unsupported op) warns once and falls back to the plain step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..model.attention import LatentCache
from . import steps

MIN_ATTEND = 128  # smallest cache span a graph attends over


def attend_bucket(end: int, max_len: int) -> int:
    """Cache slots a graph attends over for positions below `end`: the next power of two >= end
    (at least MIN_ATTEND), capped at the cache length. Few graphs, at most 2x the slots needed."""
    span = MIN_ATTEND
    while span < end:
        span *= 2
    return min(span, max_len)


class CudaGraphDecode:
    """Recorded decode steps of one model. Each method returns None once recording has failed
    (warned once): the engine then runs its plain step."""

    MAX_GRAPHS = 64  # kept at once, least recently used dropped first

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.failed: str | None = None
        self._graphs: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._pool = None
        self._weights: tuple[int, ...] | None = None
        self.recorded = 0  # graphs recorded so far (tests and benchmarks read it)

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    # -- the steps -----------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, start_pos: int | torch.Tensor, cache: LatentCache,
                end: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [B, T, vocab], final hidden states [B, T, hidden]), as `steps.forward_step`.
        `end` (optional): the furthest row's position + T, if the caller knows it without asking
        the device."""
        return self._run("forward", steps.forward_step, (ids,), start_pos, ids.shape[1], cache, end)

    def mtp_step(self, next_tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int | torch.Tensor,
                 cache: LatentCache, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._run("mtp", steps.mtp_step, (next_tokens, hidden), start_pos, next_tokens.shape[1], cache, end)

    def greedy_verify(self, last: torch.Tensor, drafts: torch.Tensor, start_pos: int | torch.Tensor,
                      cache: LatentCache, end: int | None = None) -> tuple[torch.Tensor, ...] | None:
        return self._run("greedy_verify", steps.greedy_verify_step, (last, drafts), start_pos,
                         drafts.shape[1] + 1, cache, end)

    # -- recording and replay ------------------------------------------------------------------
    def _run(self, kind: str, fn: Callable, args: tuple[torch.Tensor, ...], start_pos: int | torch.Tensor,
             T: int, cache: LatentCache, end: int | None) -> tuple[torch.Tensor, ...] | None:
        if self.failed is not None:
            return None
        # streams, recording and replay belong to the current device: make it the model's
        with torch.cuda.device(args[0].device):
            return self._run_here(kind, fn, args, start_pos, T, cache, end)

    def _run_here(self, kind: str, fn: Callable, args: tuple[torch.Tensor, ...], start_pos: int | torch.Tensor,
                  T: int, cache: LatentCache, end: int | None) -> tuple[torch.Tensor, ...] | None:
        B = args[0].shape[0]
        if isinstance(start_pos, torch.Tensor):
            if end is None:
                end = int(start_pos.max()) + T  # waits for the device
            pos = start_pos
        else:
            end = start_pos + T
            pos = torch.full((B,), start_pos, dtype=torch.long, device=args[0].device)
        if end > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; cannot write position {end - 1}")
        span = attend_bucket(end, cache.max_len)
        inputs = (*args, pos)
        # The cache's addresses and layout are part of the key: a graph replayed on the same memory
        # laid out the same way reads and writes exactly the cache passed in, whichever call made it.
        key = (kind, span, *((t.shape, t.dtype, t.stride()) for t in inputs),
               *((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in cache.layers))
        entry = self._graphs.pop(key, None)
        if entry is None:
            try:
                entry = self._record(fn, inputs, span, cache)
            except Exception as e:  # noqa: BLE001 - any recording failure: the plain step, for good
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.reset()
                warnings.warn(f"CUDA graph recording failed ({self.failed}); decoding on the plain path",
                              RuntimeWarning, stacklevel=3)
                return None
            while len(self._graphs) >= self.MAX_GRAPHS:  # the least recently used goes
                self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = entry
        static_in, graph, static_out = entry
        for s, t in zip(static_in, inputs):
            s.copy_(t)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _record(self, fn: Callable, inputs: tuple[torch.Tensor, ...], span: int, cache: LatentCache):
        model = self.model
        static_in = tuple(t.clone() for t in inputs)
        *args, pos = static_in
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        cache.attend_len = span
        try:
            # Warm up on a side stream, as recording wants (lazy library handles, allocator state).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(model, *args, pos, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(model, *args, pos, cache)
        finally:
            cache.attend_len = None
        self.recorded += 1
        return static_in, graph, tuple(out)

    def refresh(self) -> None:
        """Drop every graph if a parameter or buffer now lives elsewhere (replaced, moved or cast:
        a graph would read the old memory). In-place updates (an optimizer step) need nothing.
        The engine calls this once per generate call and per prefill, not per step."""
        stamp = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        if stamp != self._weights:
            self.reset()
            self._weights = stamp

    def reset(self) -> None:
        """Drop every graph (and the memory they hold)."""
        self._graphs.clear()
        self._pool = None
