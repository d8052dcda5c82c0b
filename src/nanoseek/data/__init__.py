"""Training data: corpora -> documents -> cached memory-mapped token shards -> batches.

    files = resolve_inputs(None)                 # the standard library; or files/dirs/globs
    train, val = prepare_data(None, tokenizer, default_cache_dir(), val_fraction=0.02, seed=0)
    sampler = BatchSampler(train, seq_len=256, batch_size=16, extra=2, seed=0)
    x = sampler.get(step, micro)                 # int64 [16, 258], same for the same (step, micro)
    for batch in val.iter_eval(256, 16, max_batches=8): ...

See docs/data.md.
"""

from .sampler import BatchSampler, iter_eval
from .shards import TokenShards, build_token_shards, default_cache_dir, prepare_data, token_dtype
from .sources import (SUFFIXES, DataError, input_keys, iter_documents, read_documents, resolve_inputs, split_files,
                      stdlib_files)

__all__ = [
    "BatchSampler", "DataError", "SUFFIXES", "TokenShards", "build_token_shards", "default_cache_dir",
    "input_keys", "iter_documents", "iter_eval", "prepare_data", "read_documents", "resolve_inputs", "split_files",
    "stdlib_files", "token_dtype",
]
