"""What the trainer trains on: a source of (tokens, loss mask) batches indexed by (step, micro).

* `PretrainSource`: windows of the token shards; every token is a target (mask None).
* `SFTSource`: chat conversations (OpenAI-style `messages`), rendered with the chat template,
  packed greedily into rows of seq_len + 1 tokens without splitting a conversation (a longer one
  is truncated), padded; the mask is 1 only on what the assistant wrote (its content and the
  closing end-of-sentence token), so the loss never trains on prompts or padding. Packed
  conversations share a row without a block-diagonal attention mask, as in pretraining; each
  starts with its own begin-of-sentence token.

Both draw rows from a RNG seeded by (seed, step, micro): resuming at step s reproduces the batches.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor | None]


class PretrainSource:
    def __init__(self, train, val, seq_len: int, batch_size: int, seed: int) -> None:
        from ..data import BatchSampler

        self.train, self.val = train, val
        self.sampler = BatchSampler(train, seq_len, batch_size, extra=1, seed=seed)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.bytes_per_token = getattr(val, "bytes_per_token", None)
        self.n_train_tokens = len(train)

    def get(self, step: int, micro: int) -> Batch:
        return self.sampler.get(step, micro), None

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        from ..data import iter_eval

        for b in iter_eval(self.val, self.seq_len, self.batch_size, max_batches, extra=1):
            yield b, None


class SFTSource:
    def __init__(self, path: str | Path, tokenizer, seq_len: int, batch_size: int, seed: int,
                 val_fraction: float = 0.05) -> None:
        self.path = Path(path)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        convs = _read_conversations(self.path)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if getattr(tokenizer, "chat_template", None):
            warnings.warn(f"{tokenizer.source} has a chat template of its own; SFT formats conversations with "
                          "DeepSeek-V3's (nanoseek's built-in), whose assistant turns it can mask", stacklevel=2)
        encoded = [tokenizer.encode_chat(m) for m in convs]
        n_val = int(len(encoded) * val_fraction) if len(encoded) >= 20 else 0
        self.rows, self.masks = _pack(encoded[: len(encoded) - n_val], seq_len + 1, pad)
        self.val_rows, self.val_masks = _pack(encoded[len(encoded) - n_val:], seq_len + 1, pad) if n_val else (None, None)
        if self.masks.sum() == 0:
            raise ConfigError(f"{self.path}: no assistant tokens to learn from")
        self.n_train_tokens = int(self.masks.sum())
        self.n_conversations = len(encoded)
        self.bytes_per_token = None

    def get(self, step: int, micro: int) -> Batch:
        rng = np.random.default_rng([self.seed, step, micro])
        pick = rng.integers(0, len(self.rows), size=self.batch_size)
        return torch.from_numpy(self.rows[pick]), torch.from_numpy(self.masks[pick])

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        if self.val_rows is None:
            return
        for i in range(0, min(len(self.val_rows), max_batches * self.batch_size), self.batch_size):
            yield (torch.from_numpy(self.val_rows[i:i + self.batch_size]),
                   torch.from_numpy(self.val_masks[i:i + self.batch_size]))


def _read_conversations(path: Path) -> list[list[dict]]:
    if not path.is_file():
        raise ConfigError(f"SFT data {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in messages):
                raise TypeError("messages must be a list of {role, content}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{i}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}} ({e})") from e
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{path}:{i}: the conversation has no assistant message to learn from")
        out.append(messages)
    if not out:
        raise ConfigError(f"{path} holds no conversations")
    return out


def _pack(encoded: list[tuple[list[int], list[int]]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    rows, masks = [], []
    cur, cur_mask = [], []
    for ids, mask in encoded:
        ids, mask = ids[:width], mask[:width]
        if len(cur) + len(ids) > width:
            rows.append(cur)
            masks.append(cur_mask)
            cur, cur_mask = [], []
        cur, cur_mask = cur + ids, cur_mask + mask
    if cur:
        rows.append(cur)
        masks.append(cur_mask)
    R = np.full((len(rows), width), pad, dtype=np.int64)
    M = np.zeros((len(rows), width), dtype=np.int64)
    for i, (r, m) in enumerate(zip(rows, masks)):
        R[i, : len(r)] = r
        M[i, : len(m)] = m
    return R, M
