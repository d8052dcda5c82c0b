"""Token shards: each input set tokenized once into a flat memory-mapped array, cached on disk.

A shard is two files in the cache folder:

    <name>-<key>.bin    the token ids of every document, each followed by eos, back to back
                        (uint16 when the vocabulary fits in 65536 ids, else uint32)
    <name>-<key>.json   the manifest: dtype, n_tokens, n_bytes, bytes_per_token, the files with
                        their sizes and mtimes, the tokenizer's hash, how long tokenization took

`key` hashes everything the tokens depend on (file paths, sizes, mtimes, the tokenizer's JSON,
the text field, bos on/off, the format version), so a second run with the same inputs and
tokenizer maps the cached array in milliseconds, and a changed file or tokenizer gets a new
shard. Both files are written to a temporary name and renamed, the .bin first: a manifest exists
only beside a complete array, and a tokenization killed halfway leaves nothing that looks usable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io_utils import atomic_write, atomic_write_text
from .sources import DataError, input_keys, iter_documents, split_files

if TYPE_CHECKING:
    import torch

    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BATCH_CHARS = 4 << 20  # text handed to the tokenizer's parallel batch encoder at once
_BATCH_DOCS = 8192
_CHUNK_CHARS = 1 << 20  # documents longer than this are cut at line starts for parallel encoding
_LINE_START = re.compile(r"\n(?=\S)")


def default_cache_dir() -> Path:
    """`$NANOSEEK_CACHE/tokens`, by default `~/.cache/nanoseek/tokens`."""
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek")) / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenShards:
    """A 1-D token array (a read-only `np.memmap` of the .bin) and its manifest."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any], tokens: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        if tokens is None:
            n = int(manifest["n_tokens"])
            tokens = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,)) if n
                      else np.zeros(0, dtype=self.dtype))
        self.tokens = tokens

    @classmethod
    def load(cls, manifest_path: str | os.PathLike) -> "TokenShards":
        """Open a shard from its manifest (.json) path."""
        manifest_path = Path(manifest_path)
        manifest = _read_manifest(manifest_path)
        if manifest is None:
            raise DataError(f"{manifest_path}: not a complete token shard manifest")
        return cls(manifest_path.with_name(manifest["bin"]), manifest)

    @classmethod
    def empty(cls, dtype: np.dtype | str = np.uint16, name: str = "empty") -> "TokenShards":
        manifest = {"format": FORMAT_VERSION, "name": name, "dtype": np.dtype(dtype).name, "n_tokens": 0,
                    "n_bytes": 0, "n_documents": 0, "bytes_per_token": 0.0, "files": []}
        return cls(Path(os.devnull), manifest, np.zeros(0, dtype=dtype))

    # ---- facts -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return len(self)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of document text per token (eos included) over the whole shard: for bits per
        byte, bpb = loss_nats / ln(2) / bytes_per_token."""
        return float(self.manifest.get("bytes_per_token", 0.0))

    @property
    def n_bytes(self) -> int:
        return int(round(self.bytes_per_token * len(self)))

    @property
    def n_documents(self) -> int:
        return int(self.manifest.get("n_documents", 0))

    @property
    def files(self) -> list[str]:
        return [f["path"] for f in self.manifest.get("files", [])]

    @property
    def eos_id(self) -> int | None:
        return self.manifest.get("eos_id")

    def __repr__(self) -> str:
        return (f"TokenShards({len(self):,} tokens, {self.dtype.name}, {len(self.files)} files, "
                f"{self.bytes_per_token:.3f} bytes/token, path={str(self.path)!r})")

    # ---- views -------------------------------------------------------------------------------------
    def slice(self, start: int, stop: int) -> "TokenShards":
        """Tokens [start, stop) as a shard sharing the same memory map (and bytes_per_token)."""
        return TokenShards(self.path, {**self.manifest, "n_tokens": max(0, stop - start),
                                       "slice": [int(start), int(stop)]}, self.tokens[start:stop])

    def split_tail(self, fraction: float) -> tuple["TokenShards", "TokenShards"]:
        """(head, tail) with the last `fraction` of tokens in the tail, which starts at a document
        boundary (just after an eos) when one falls inside the tail."""
        n = len(self)
        if fraction <= 0 or n == 0:
            return self, self.slice(n, n)
        cut = min(max(1, int(round(n * (1 - fraction)))), n - 1)
        eos = self.eos_id
        if eos is not None:
            hits = np.flatnonzero(np.asarray(self.tokens[cut:]) == eos)
            if hits.size and cut + int(hits[0]) + 1 < n:
                cut = cut + int(hits[0]) + 1
        return self.slice(0, cut), self.slice(cut, n)

    def iter_eval(self, seq_len: int, batch_size: int, max_batches: int | None = None,
                  extra: int = 1) -> Iterator["torch.Tensor"]:
        """Non-overlapping windows of `seq_len + extra` tokens from the start, in order, as int64
        [b, seq_len + extra] tensors (the last batch may be smaller). Deterministic."""
        from .sampler import iter_eval

        return iter_eval(self, seq_len, batch_size, max_batches, extra)


# ---- building -----------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest when it and its complete .bin exist, else None (a cache miss)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            return None
        bin_path = path.with_name(manifest["bin"])
        expected = int(manifest["n_tokens"]) * np.dtype(manifest["dtype"]).itemsize
        if bin_path.stat().st_size != expected:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_stats(files: Sequence[Path]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror or e})") from None
        out.append({"path": str(Path(f).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _chunks(doc: str) -> list[str]:
    """Cut a long document at line starts (a newline followed by a non-space character): the
    pre-tokenizer always ends a piece there, so encoding the chunks gives the same ids."""
    if len(doc) <= _CHUNK_CHARS:
        return [doc]
    out, start = [], 0
    while len(doc) - start > _CHUNK_CHARS:
        m = _LINE_START.search(doc, start + _CHUNK_CHARS)
        if m is None:
            break
        out.append(doc[start:m.end()])
        start = m.end()
    out.append(doc[start:])
    return out


def build_token_shards(files: Sequence[str | os.PathLike], tokenizer: "Tokenizer", cache_dir: str | os.PathLike,
                       name: str, text_field: str = "text", show_progress: bool = True, *,
                       add_bos: bool = False) -> TokenShards:
    """Tokenize `files` (each document followed by eos, preceded by bos if `add_bos`) into a cached
    memory-mapped shard, or reuse the cached one. See the module docstring for the format."""
    from tqdm.auto import tqdm

    files = [Path(f) for f in files]
    if not files:
        raise DataError(f"no input files for the {name!r} token shard")
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "tokens"
    stats = _file_stats(files)
    dtype = token_dtype(tokenizer.vocab_size)
    key_src = {"format": FORMAT_VERSION, "files": stats, "tokenizer": tokenizer.fingerprint,
               "text_field": text_field, "add_bos": bool(add_bos), "dtype": dtype.name}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode("utf-8")).hexdigest()
    cache_dir = Path(cache_dir)
    stem = f"{safe_name}-{key[:20]}"
    bin_path, manifest_path = cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"
    manifest = _read_manifest(manifest_path)
    if manifest is not None and manifest.get("key") == key:
        log.info("token cache hit: %s (%s tokens)", manifest_path, f"{manifest['n_tokens']:,}")
        return TokenShards(bin_path, manifest)

    eos, bos = tokenizer.eos_id, (tokenizer.bos_id if add_bos else None)
    if add_bos and bos is None:
        raise DataError("add_bos=True but the tokenizer has no begin-of-sentence token")
    counts = {"tokens": 0, "bytes": 0, "docs": 0}
    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out, tqdm(total=sum(s["size"] for s in stats), unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=f"tokenizing {name}", disable=not show_progress,
                                          dynamic_ncols=True, leave=False) as bar:
            pieces: list[str] = []  # chunks of documents; ends[i] = True when piece i ends a document
            ends: list[bool] = []
            pending_chars = pending_bytes = 0

            def flush() -> None:
                nonlocal pending_chars, pending_bytes
                if not pieces:
                    return
                flat: list[int] = []
                at_start = True
                for ids, last in zip(tokenizer.encode_batch(pieces), ends):
                    if at_start and bos is not None:
                        flat.append(bos)
                    flat.extend(ids)
                    if last:
                        flat.append(eos)
                    at_start = last
                np.asarray(flat, dtype=dtype).tofile(out)
                counts["tokens"] += len(flat)
                bar.update(pending_bytes)
                pieces.clear()
                ends.clear()
                pending_chars = pending_bytes = 0

            for path in files:
                for doc, source_bytes in iter_documents(path, text_field):
                    chunks = _chunks(doc)
                    pieces.extend(chunks)
                    ends.extend([False] * (len(chunks) - 1) + [True])
                    counts["docs"] += 1
                    counts["bytes"] += len(doc.encode("utf-8"))
                    pending_chars += len(doc)
                    pending_bytes += source_bytes
                    if pending_chars >= _BATCH_CHARS or len(pieces) >= _BATCH_DOCS:
                        flush()
            flush()
        if counts["docs"] == 0:
            raise DataError(f"no documents in {', '.join(map(str, files[:3]))}"
                            + (f" and {len(files) - 3} more files" if len(files) > 3 else ""))

    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(bin_path, write)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT_VERSION, "key": key, "name": name, "bin": bin_path.name, "dtype": dtype.name,
        "n_tokens": counts["tokens"], "n_bytes": counts["bytes"], "n_documents": counts["docs"],
        "bytes_per_token": counts["bytes"] / max(1, counts["tokens"]),
        "eos_id": eos, "bos_id": bos, "add_bos": bool(add_bos), "text_field": text_field,
        "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.fingerprint, "files": stats,
        "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    log.info("tokenized %s: %d files, %.1f MB -> %s tokens in %.1f s (%.2f MB/s)", name, len(files),
             counts["bytes"] / 1e6, f"{counts['tokens']:,}", seconds, counts["bytes"] / 1e6 / max(seconds, 1e-9))
    return TokenShards(bin_path, manifest)


def prepare_data(inputs: Sequence[str | os.PathLike] | None, tokenizer: "Tokenizer", cache_dir: str | os.PathLike,
                 val_fraction: float = 0.02, seed: int = 0, text_field: str = "text",
                 show_progress: bool = True, add_bos: bool = False) -> tuple[TokenShards, TokenShards]:
    """Resolve `inputs` (None/[] = the standard library), split by file, tokenize both sides.

    `add_bos` starts every document with the tokenizer's bos, as the engine starts every prompt.

    Returns (train, val). With a single input file, the last `val_fraction` of its tokens (from a
    document boundary when possible) is the validation set. `val_fraction=0` gives an empty
    validation shard.
    """
    keyed = input_keys(inputs)
    files = list(keyed)
    shards = functools.partial(build_token_shards, tokenizer=tokenizer, cache_dir=cache_dir, text_field=text_field,
                               show_progress=show_progress, add_bos=add_bos)
    if len(files) >= 2:
        train_files, val_files = split_files(keyed, val_fraction, seed)
        train = shards(train_files, name="train")
        val = shards(val_files, name="val") if val_files else TokenShards.empty(train.dtype, "val")
        return train, val
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    whole = shards(files, name="all")
    return whole.split_tail(val_fraction)
