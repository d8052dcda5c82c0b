"""Batches from token shards: random training windows that need no state, ordered eval windows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .shards import TokenShards
from .sources import DataError


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}")


class BatchSampler:
    """Training batches of random windows, a pure function of (seed, step, micro).

    `get(step, micro)` returns int64 [batch_size, seq_len + extra]: with extra = 1 + MTP depth the
    trainer uses x[:, :seq_len] as inputs and x[:, 1 + k : seq_len + 1 + k] as the depth-k
    targets. Window starts are drawn uniformly over the whole shard (documents are packed, eos
    between them) by a numpy PCG64 generator seeded with (seed, step, micro), so a resumed run
    regenerates any step exactly without saving a data position, and data-parallel ranks can use
    distinct `micro` values (or seeds).
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, extra: int = 1, seed: int = 0) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size, extra=extra)
        self.shards = shards
        self.seq_len, self.batch_size, self.extra, self.seed = int(seq_len), int(batch_size), int(extra), int(seed)
        self.window = self.seq_len + self.extra
        n = len(shards)
        if n < self.window:
            raise DataError(f"the training data holds {n:,} tokens, fewer than one window of "
                            f"{self.window} (seq_len {seq_len} + {extra}); add data or shorten seq_len")
        self.n_starts = n - self.window + 1
        self._offsets = np.arange(self.window, dtype=np.int64)

    @property
    def epoch_tokens(self) -> int:
        """Tokens in one pass over the training data."""
        return len(self.shards)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per `get` call (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    def steps_per_epoch(self, grad_accum: int = 1) -> float:
        """Optimizer steps that consume about `epoch_tokens` input tokens."""
        return self.epoch_tokens / (self.tokens_per_batch * grad_accum)

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """The window start offsets of batch (step, micro)."""
        if step < 0 or micro < 0:
            raise DataError(f"step and micro must be >= 0, got step={step}, micro={micro}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(step), int(micro)])))
        return rng.integers(0, self.n_starts, size=self.batch_size, dtype=np.int64)

    def get(self, step: int, micro: int = 0) -> torch.Tensor:
        idx = self.starts(step, micro)[:, None] + self._offsets
        return torch.from_numpy(np.asarray(self.shards.tokens[idx], dtype=np.int64))

    def iter_eval(self, shards: TokenShards, seq_len: int | None = None, batch_size: int | None = None,
                  max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """`iter_eval` over other (validation) shards with this sampler's shape by default."""
        return iter_eval(shards, seq_len or self.seq_len, batch_size or self.batch_size, max_batches, self.extra)

    def __repr__(self) -> str:
        return (f"BatchSampler({len(self.shards):,} tokens, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"extra={self.extra}, seed={self.seed})")


def iter_eval(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None,
              extra: int = 1) -> Iterator[torch.Tensor]:
    """Non-overlapping windows of `seq_len + extra` tokens, from the start of `shards`, in order.

    Yields int64 [b, seq_len + extra] with b = batch_size except possibly for the last batch; at
    most `max_batches` batches; nothing when the shard is shorter than one window. The same call
    always yields the same batches. For bits per byte over exactly the evaluated targets, sum
    `tokenizer.token_byte_lengths()[batch[:, 1:seq_len + 1]]`, or use `shards.bytes_per_token`.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size, extra=extra)
    if max_batches is not None and max_batches < 0:
        raise DataError(f"max_batches must be >= 0, got {max_batches}")
    span = seq_len + extra
    n_windows = len(shards) // span
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    offsets = np.arange(span, dtype=np.int64)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * span
        yield torch.from_numpy(np.asarray(shards.tokens[starts[:, None] + offsets], dtype=np.int64))
