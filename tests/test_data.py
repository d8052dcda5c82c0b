"""Data: the stdlib corpus, input formats and their errors, splits, cached token shards, samplers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.data import (BatchSampler, DataError, TokenShards, build_token_shards, iter_eval, prepare_data,
                           read_documents, resolve_inputs, split_files, stdlib_files, token_dtype)
from nanoseek.data import shards as shards_mod
from nanoseek.tokenizer import Tokenizer, train_tokenizer

DOCS = ["def add(a, b):\n    return a + b\n", "Hello, world! Ünïcode 🙂 日本語\n", "x = [i * i for i in range(10)]\n",
        "The quick brown fox jumps over the lazy dog.\n", "# Title\n\nSome *markdown* text.\n"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(DOCS * 30, 320, show_progress=False)


def write_tree(root: Path) -> dict[str, Path]:
    """A small corpus with one file of each type."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "txt": root / "a.txt", "py": root / "pkg" / "b.py", "md": root / "c.md",
        "jsonl": root / "d.jsonl", "parquet": root / "e.parquet",
    }
    paths["py"].parent.mkdir(exist_ok=True)
    paths["txt"].write_text(DOCS[1], encoding="utf-8")
    paths["py"].write_text(DOCS[0], encoding="utf-8")
    paths["md"].write_text(DOCS[4], encoding="utf-8")
    paths["jsonl"].write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n",
                              encoding="utf-8")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[2:4], "n": [1, 2]}), paths["parquet"])
    return paths


# ---- the standard library corpus --------------------------------------------------------------------
def test_stdlib_corpus_is_real_sized_and_deterministic():
    files = stdlib_files()
    assert files == stdlib_files() == sorted(files)
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    for f in files:
        parts = set(f.parts)
        assert not parts & {"site-packages", "dist-packages", "__pycache__", "idle_test", "tests"}, f
    size = sum(f.stat().st_size for f in files)
    assert 8e6 < size < 40e6, size  # 10.8 MB on CPython 3.11
    names = {f.name for f in files}
    assert {"os.py", "json", "argparse.py"} & names
    assert resolve_inputs(None) == resolve_inputs([]) == files


def test_stdlib_files_tokenize_identically_in_chunks(tok, tmp_path, monkeypatch):
    """A few real stdlib files through the shard builder; long documents cut at line starts (for
    parallel encoding) give exactly the ids of the whole document."""
    files = [f for f in stdlib_files() if f.name in ("argparse.py", "typing.py", "ast.py")]
    assert files
    whole = build_token_shards(files, tok, tmp_path / "a", "s", show_progress=False)
    monkeypatch.setattr(shards_mod, "_CHUNK_CHARS", 3000)
    chunked = build_token_shards(files, tok, tmp_path / "b", "s", show_progress=False)
    assert np.array_equal(np.asarray(whole.tokens), np.asarray(chunked.tokens))
    expected = []
    for f in files:
        expected += tok.encode(f.read_text(encoding="utf-8")) + [tok.eos_id]
    assert np.asarray(whole.tokens).tolist() == expected
    # bytes per token is exact: token byte lengths summed over the shard give the text's bytes
    assert int(tok.token_byte_lengths()[np.asarray(whole.tokens)].sum()) == whole.manifest["n_bytes"]
    assert whole.bytes_per_token == pytest.approx(whole.manifest["n_bytes"] / len(whole))


# ---- inputs ------------------------------------------------------------------------------------------
def test_resolve_inputs_files_dirs_globs(tmp_path, caplog):
    paths = write_tree(tmp_path / "corpus")
    (tmp_path / "corpus" / "notes.csv").write_text("a,b\n")  # unsupported: ignored inside a directory
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "corpus" / "pkg" / "__init__.py").write_text("")  # empty: skipped with a warning
    every = sorted(p.resolve() for p in paths.values())
    with caplog.at_level(logging.WARNING):
        assert resolve_inputs([str(tmp_path / "corpus")]) == every
    assert "__init__.py" in caplog.text
    assert resolve_inputs([str(tmp_path / "corpus" / "**" / "*.py")]) == [paths["py"].resolve()]
    assert resolve_inputs([str(paths["txt"]), str(paths["txt"]), str(tmp_path / "corpus" / "*.md")]) == sorted(
        [paths["txt"].resolve(), paths["md"].resolve()])


def test_resolve_inputs_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match="input not found: .*nope.txt"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="no files match"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir holds no"):
        resolve_inputs([str(tmp_path / "empty_dir")])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="table.csv: unsupported file type '.csv'"):
        resolve_inputs([str(tmp_path / "table.csv")])
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty input files"):
        resolve_inputs([str(tmp_path / "only_empty")])


def test_read_documents_each_format(tmp_path):
    paths = write_tree(tmp_path)
    assert list(read_documents(paths["txt"])) == [DOCS[1]]
    assert list(read_documents(paths["py"])) == [DOCS[0]]
    assert list(read_documents(paths["md"])) == [DOCS[4]]
    assert list(read_documents(paths["jsonl"])) == DOCS
    assert list(read_documents(paths["parquet"])) == DOCS[2:4]
    alt = tmp_path / "alt.jsonl"
    alt.write_text('{"body": "one"}\n{"body": ""}\n{"body": null}\n\n{"body": "two"}\n')
    assert list(read_documents(alt, text_field="body")) == ["one", "two"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello".encode("utf-8"))
    assert list(read_documents(bom)) == ["hello"]


def test_read_documents_errors_name_file_line_and_column(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        list(read_documents(bad_json))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:2: no 'text' field \(fields: 'content'\)"):
        list(read_documents(no_field))
    not_str = tmp_path / "num.jsonl"
    not_str.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"num.jsonl:1: field 'text' must be a string"):
        list(read_documents(not_str))
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"list.jsonl:1: expected a JSON object"):
        list(read_documents(not_obj))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        list(read_documents(latin1))
    bad_line = tmp_path / "badline.jsonl"
    bad_line.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"badline.jsonl:2: not valid UTF-8"):
        list(read_documents(bad_line))
    for name, content in (("empty.txt", ""), ("blank.md", "  \n\n"), ("empty.jsonl", "\n\n"),
                          ("nulls.jsonl", '{"text": null}\n{"text": ""}\n')):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=rf"{name}: the file is empty"):
            list(read_documents(tmp_path / name))
    with pytest.raises(DataError, match="gone.txt: cannot read"):
        list(read_documents(tmp_path / "gone.txt"))


def test_parquet_errors(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"t.parquet: no column 'text' \(columns: content\)"):
        list(read_documents(path))
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=r"t.parquet: column 'text' has type int64"):
        list(read_documents(path))
    pq.write_table(pa.table({"text": pa.array([None, ""], type=pa.string())}), path)
    with pytest.raises(DataError, match=r"t.parquet: the file is empty"):
        list(read_documents(path))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"corrupt.parquet: not a readable Parquet file"):
        list(read_documents(corrupt))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"corrupt.parquet: .*pip install pyarrow"):
        list(read_documents(corrupt))


# ---- split -------------------------------------------------------------------------------------------
def test_split_files_deterministic_by_relative_path(tmp_path):
    files = []
    for i in range(200):
        p = tmp_path / "tree" / f"d{i % 7}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"doc {i}")
        files.append(p)
    train, val = split_files(files, 0.1, seed=0)
    assert (train, val) == split_files(list(reversed(files)), 0.1, seed=0)
    assert sorted(train + val) == sorted(files) and not set(train) & set(val)
    assert 5 <= len(val) <= 40
    assert split_files(files, 0.1, seed=1)[1] != val
    # The same tree elsewhere splits the same way (hash of the path relative to the common root).
    shutil.copytree(tmp_path / "tree", tmp_path / "copy")
    _, val2 = split_files([tmp_path / "copy" / f.relative_to(tmp_path / "tree") for f in files], 0.1, seed=0)
    assert [f.relative_to(tmp_path / "copy") for f in val2] == [f.relative_to(tmp_path / "tree") for f in val]
    # At least one file on each side, whatever the fraction.
    for frac in (0.0001, 0.9999):
        tr, va = split_files(files[:2], frac)
        assert len(tr) == len(va) == 1
    assert split_files(files[:1], 0.5) == (files[:1], [])
    assert split_files(files, 0.0) == (sorted(files), [])
    with pytest.raises(DataError, match="val_fraction"):
        split_files(files, 1.0)


# ---- token shards ------------------------------------------------------------------------------------
def test_build_token_shards_content_and_manifest(tok, tmp_path):
    paths = write_tree(tmp_path / "c")
    files = [paths["txt"], paths["jsonl"], paths["parquet"]]
    shard = build_token_shards(files, tok, tmp_path / "cache", "train", show_progress=False)
    expected = []
    for d in [DOCS[1]] + DOCS + DOCS[2:4]:
        expected += tok.encode(d) + [tok.eos_id]
    assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
    assert np.asarray(shard.tokens).tolist() == expected and len(shard) == len(expected)
    m = json.loads(shard.path.with_suffix(".json").read_text())
    assert m["n_tokens"] == len(expected) and m["dtype"] == "uint16" and m["n_documents"] == 8
    assert m["tokenizer_sha256"] == tok.fingerprint and [f["path"] for f in m["files"]] == [
        str(f.resolve()) for f in files]
    assert all(f["size"] > 0 and f["mtime_ns"] > 0 for f in m["files"])
    n_bytes = sum(len(d.encode()) for d in [DOCS[1]] + DOCS + DOCS[2:4])
    assert m["n_bytes"] == n_bytes and shard.bytes_per_token == pytest.approx(n_bytes / len(expected))
    assert TokenShards.load(shard.path.with_suffix(".json")).tokens.tolist() == expected
    with_bos = build_token_shards([paths["txt"]], tok, tmp_path / "cache", "train", show_progress=False, add_bos=True)
    assert np.asarray(with_bos.tokens).tolist() == [tok.bos_id] + tok.encode(DOCS[1]) + [tok.eos_id]


def test_token_dtype_follows_vocab_size(tok, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(129280) == np.uint32
    big = Tokenizer.from_str(tok.to_str())
    big.vocab_size = 129280  # as DeepSeek-V3's config: ids need 32 bits
    (tmp_path / "a.txt").write_text(DOCS[0])
    shard = build_token_shards([tmp_path / "a.txt"], big, tmp_path / "cache", "t", show_progress=False)
    assert shard.dtype == np.uint32 and shard.path.stat().st_size == 4 * len(shard)
    assert np.asarray(shard.tokens).tolist() == tok.encode(DOCS[0]) + [tok.eos_id]


class CountingTokenizer:
    """Wraps a Tokenizer, counting encode_batch calls; optionally failing on the n-th call."""

    def __init__(self, tok: Tokenizer, fail_on: int | None = None):
        self.tok, self.calls, self.fail_on = tok, 0, fail_on

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_batch(self, texts, add_bos=False):
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.tok.encode_batch(texts, add_bos)


def test_cache_is_reused_and_invalidated(tok, tmp_path):
    paths = write_tree(tmp_path / "c")
    files = [paths["txt"], paths["py"], paths["jsonl"]]
    counting = CountingTokenizer(tok)
    first = build_token_shards(files, counting, tmp_path / "cache", "train", show_progress=False)
    assert counting.calls == 1
    mtime = first.path.stat().st_mtime_ns
    second = build_token_shards(files, counting, tmp_path / "cache", "train", show_progress=False)
    assert counting.calls == 1 and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
    # Another text field, tokenizer or file content: a new shard.
    other = Tokenizer.from_str(train_tokenizer(DOCS * 30, 330, show_progress=False).to_str())
    assert build_token_shards(files, other, tmp_path / "cache", "train", show_progress=False).path != first.path
    paths["txt"].write_text(DOCS[1] + "more text\n")
    os.utime(paths["txt"], ns=(mtime + 10**9, mtime + 10**9))
    third = build_token_shards(files, counting, tmp_path / "cache", "train", show_progress=False)
    assert counting.calls == 2 and third.path != first.path
    # A damaged cache file (truncated .bin) is a miss, rebuilt, never read.
    with open(third.path, "r+b") as f:
        f.truncate(10)
    fourth = build_token_shards(files, counting, tmp_path / "cache", "train", show_progress=False)
    assert counting.calls == 3 and len(fourth) == len(third) and fourth.path.stat().st_size == 2 * len(third)


def test_interrupted_tokenization_leaves_no_cache_hit(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "_BATCH_DOCS", 1)  # one encode_batch call per document
    paths = write_tree(tmp_path / "c")
    files = [paths["jsonl"]]
    cache = tmp_path / "cache"
    failing = CountingTokenizer(tok, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        build_token_shards(files, failing, cache, "train", show_progress=False)
    assert list(cache.iterdir()) == []  # no .bin, no manifest, no temporary file
    counting = CountingTokenizer(tok)
    shard = build_token_shards(files, counting, cache, "train", show_progress=False)
    assert counting.calls == len(DOCS) and shard.n_documents == len(DOCS)
    # A .bin without its manifest (killed between the two renames) is not a hit either.
    shard.path.with_suffix(".json").unlink()
    again = build_token_shards(files, counting, cache, "train", show_progress=False)
    assert counting.calls == 2 * len(DOCS) and np.array_equal(np.asarray(again.tokens), np.asarray(shard.tokens))


def test_bad_input_fails_while_building_and_caches_nothing(tok, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        build_token_shards([good, bad], tok, tmp_path / "cache", "train", show_progress=False)
    assert not list((tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="no input files"):
        build_token_shards([], tok, tmp_path / "cache", "train", show_progress=False)


# ---- samplers ----------------------------------------------------------------------------------------
def make_shard(tmp_path: Path, n: int, name: str = "s") -> TokenShards:
    path = tmp_path / f"{name}-{n}.bin"
    (np.arange(n) % 60000).astype(np.uint16).tofile(path)
    return TokenShards(path, {"dtype": "uint16", "n_tokens": n, "bytes_per_token": 3.5})


def test_batch_sampler_is_a_pure_function_of_step_and_micro(tmp_path):
    shard = make_shard(tmp_path, 10_000)
    sampler = BatchSampler(shard, seq_len=32, batch_size=4, extra=2, seed=7)
    x = sampler.get(5, 1)
    assert x.shape == (4, 34) and x.dtype == torch.int64
    assert torch.equal(x, sampler.get(5, 1))
    resumed = BatchSampler(make_shard(tmp_path, 10_000, "copy"), 32, 4, extra=2, seed=7)
    assert torch.equal(x, resumed.get(5, 1))  # a fresh sampler (a resumed run) regenerates the batch
    assert not torch.equal(x, sampler.get(6, 1))
    assert not torch.equal(x, sampler.get(5, 0))
    assert not torch.equal(x, BatchSampler(shard, 32, 4, extra=2, seed=8).get(5, 1))
    for row in x:  # each row is a contiguous window of the token stream
        start = int(row[0])
        assert row.tolist() == list(range(start, start + 34))
    starts = np.concatenate([sampler.starts(s) for s in range(200)])
    assert starts.min() >= 0 and starts.max() <= 10_000 - 34
    assert starts.max() > 9_000 and starts.min() < 1_000  # covers the whole shard
    assert sampler.epoch_tokens == 10_000 and sampler.tokens_per_batch == 128
    with pytest.raises(DataError, match="fewer than one window"):
        BatchSampler(make_shard(tmp_path, 20), seq_len=32, batch_size=2)
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(shard, seq_len=0, batch_size=2)


def test_iter_eval_windows_are_ordered_and_disjoint(tmp_path):
    shard = make_shard(tmp_path, 1000)
    batches = list(iter_eval(shard, seq_len=15, batch_size=4))  # 62 windows of 16
    assert [b.shape[0] for b in batches] == [4] * 15 + [2]
    flat = torch.cat(batches).reshape(-1)
    assert flat.tolist() == list(range(62 * 16))
    again = list(shard.iter_eval(15, 4))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert len(list(shard.iter_eval(15, 4, max_batches=3))) == 3
    assert list(iter_eval(make_shard(tmp_path, 10), 15, 4)) == []
    sampler = BatchSampler(shard, 15, 4)
    assert torch.equal(next(iter(sampler.iter_eval(shard))), batches[0])


# ---- prepare_data ------------------------------------------------------------------------------------
def test_prepare_data_splits_by_file(tok, tmp_path):
    root = tmp_path / "corpus"
    for i in range(30):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}.txt").write_text(DOCS[i % len(DOCS)] * (1 + i % 4))
    train, val = prepare_data([str(root)], tok, tmp_path / "cache", val_fraction=0.1, seed=3, show_progress=False)
    assert train.files and val.files and not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(str(p.resolve()) for p in root.rglob("*.txt"))
    t2, v2 = prepare_data([str(root)], tok, tmp_path / "cache", val_fraction=0.1, seed=3, show_progress=False)
    assert (t2.path, v2.path) == (train.path, val.path)
    _, none = prepare_data([str(root)], tok, tmp_path / "cache", val_fraction=0.0, show_progress=False)
    assert len(none) == 0 and list(none.iter_eval(8, 2)) == []


def test_prepare_data_single_file_holds_out_its_tail(tok, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"text": d * 3}) for d in DOCS * 8) + "\n")
    train, val = prepare_data([str(path)], tok, tmp_path / "cache", val_fraction=0.1, show_progress=False)
    whole = np.concatenate([np.asarray(train.tokens), np.asarray(val.tokens)])
    expected = []
    for d in DOCS * 8:
        expected += tok.encode(d * 3) + [tok.eos_id]
    assert whole.tolist() == expected
    assert 0.05 * len(whole) < len(val) < 0.15 * len(whole)
    assert int(train.tokens[-1]) == tok.eos_id  # validation starts at a document boundary
    assert val.bytes_per_token == train.bytes_per_token > 0
    # as the trainer asks for it: every document starts with bos, as every engine prompt does
    train, val = prepare_data([str(path)], tok, tmp_path / "cache", val_fraction=0.1, show_progress=False, add_bos=True)
    whole = np.concatenate([np.asarray(train.tokens), np.asarray(val.tokens)])
    assert whole.tolist() == [t for d in DOCS * 8 for t in [tok.bos_id] + tok.encode(d * 3) + [tok.eos_id]]
    assert int(val.tokens[0]) == tok.bos_id


def test_prepare_data_zero_documents_is_an_error(tok, tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prepare_data([str(tmp_path / "missing")], tok, tmp_path / "cache", show_progress=False)
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="e.jsonl: the file is empty"):
        prepare_data([str(tmp_path / "e.jsonl")], tok, tmp_path / "cache", show_progress=False)
