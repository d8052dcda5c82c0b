"""`nanoseek convert`: re-encode a checkpoint directory tensor by tensor (FP8 <-> BF16/FP16/FP32).

This never builds the model. It walks the source shards one at a time, transforms each tensor and
streams the result into a `ShardWriter`, which flushes a new shard whenever the size limit is
reached, so peak memory is about one output shard plus one tensor, on CPU alone (no GPU, no
Triton). That makes it the CPU replacement for DeepSeek's `inference/fp8_cast_bf16.py`, which
needs a GPU for its Triton dequantization kernel.

--to fp8
    Every Linear weight DeepSeek stores in FP8 (`is_fp8_weight_name`: q/q_a/q_b/kv_a/kv_b/o
    projections, dense/shared/routed expert gate/up/down) becomes float8_e4m3fn plus a float32
    `<name>_scale_inv` with one scale per 128x128 block (edge blocks partial). Everything else
    becomes bf16, except `e_score_correction_bias`, which is float32 as in the official release.
    Tensors that are already FP8 (they have a `_scale_inv` partner) are copied through unchanged,
    so converting an FP8 checkpoint to FP8 re-shards it bit-exactly.
--to bf16 | fp16 | fp32
    FP8 tensors are dequantized block-wise, `W = float(Wq) * S[m // 128, n // 128]`, computed in
    float32 and rounded once to the target dtype (what fp8_cast_bf16.py does); the `_scale_inv`
    tensors are dropped and `quantization_config` is removed from config.json. Other floating
    tensors are cast; `e_score_correction_bias` stays float32.

Safety: DST may not be SRC or lie inside it; a DST that already holds a model is refused unless
`overwrite=True`; the source must have config.json and safetensors weights (pickles are refused by
`nanoseek.checkpoint`). Output is written to a hidden staging directory inside DST and moved into
place at the end, config.json last, so an interrupted conversion never looks complete and leaves
no partial shards behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE, CheckpointError, ShardWriter, TensorReader, is_fp8_weight_name,
    load_config, parse_size, resolve_model_dir,
)
from .config import ConfigError, ModelConfig
from .fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from .io_utils import atomic_write_text

log = logging.getLogger(__name__)

FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}
TARGETS = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
            "float8": "fp8", "e4m3": "fp8", "float8_e4m3fn": "fp8"}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
STAGING_PREFIX = ".nanoseek-convert-"

# Small text files copied from SRC to DST. Never code (*.py: `auto_map` is dropped instead) and never
# pickles; `tokenizer.model` is a sentencepiece protobuf, not a pickle.
_COPY_SUFFIXES = {".json", ".jinja", ".md", ".txt", ".model", ".tiktoken", ".yaml", ".yml"}
_COPY_STEMS = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|README)([-._].*)?$", re.I)
_NEVER_COPY = {"config.json", SAFE_INDEX}


@dataclass
class ConvertStats:
    dst: Path
    tensors_in: int
    tensors_out: int
    bytes_in: int
    bytes_out: int
    seconds: float
    source_format: str
    target: str
    files_copied: list[str]

    def summary(self) -> str:
        return (f"converted {self.tensors_in} tensors ({self.source_format}) -> {self.tensors_out} tensors "
                f"({self.target}): {_fmt_bytes(self.bytes_in)} -> {_fmt_bytes(self.bytes_out)} "
                f"in {self.seconds:.1f} s; wrote {self.dst}")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _normalize_target(to: str) -> str:
    key = str(to).lower()
    key = _ALIASES.get(key, key)
    if key not in TARGETS:
        raise ConfigError(f"unknown conversion target {to!r}; use one of {', '.join(TARGETS)}")
    return key


# ---- checks ----------------------------------------------------------------------------------------

def _resolve_source(src: str | os.PathLike) -> Path:
    p = Path(src).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise CheckpointError(f"source {p} is a file; expected a model directory holding config.json")
    s = str(src)
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s):
        # Not a local directory but shaped like a Hub id: download it (safetensors + JSON only).
        return resolve_model_dir(s).resolve()
    raise CheckpointError(f"source model directory {p} does not exist")


def _holds_model(d: Path) -> bool:
    return ((d / "config.json").exists() or (d / SAFE_INDEX).exists() or (d / SAFE_SINGLE).exists()
            or any(d.glob("model-*-of-*.safetensors")))


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst == src:
        raise CheckpointError(f"destination {dst} is the source directory; choose a new directory")
    if src in dst.parents:
        raise CheckpointError(f"destination {dst} lies inside the source directory {src}; choose a directory "
                              "outside it")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and _holds_model(dst) and not overwrite:
        raise CheckpointError(f"destination {dst} already holds a model (config.json or safetensors weights); "
                              "pass --overwrite (overwrite=True) to replace it")


def _remove_stale_staging(dst: Path) -> None:
    for stale in dst.glob(STAGING_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _remove_old_model(dst: Path) -> None:
    """With --overwrite, once the new model is staged: config.json first (DST stops looking
    complete), then the weights."""
    (dst / "config.json").unlink(missing_ok=True)
    (dst / SAFE_INDEX).unlink(missing_ok=True)
    for f in [dst / SAFE_SINGLE, *dst.glob("model-*-of-*.safetensors")]:
        f.unlink(missing_ok=True)


def _files_to_copy(src: Path) -> list[Path]:
    out = []
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or f.name in _NEVER_COPY or not f.is_file():  # is_file follows HF-cache links
            continue
        if f.suffix in PICKLE_SUFFIXES or f.suffix in (".safetensors", ".py"):
            continue
        if f.suffix.lower() in _COPY_SUFFIXES or _COPY_STEMS.match(f.name):
            out.append(f)
    return out


# ---- the tensor transform ------------------------------------------------------------------------

class _Plan:
    """Decides, per source tensor name, what the destination holds."""

    def __init__(self, reader: TensorReader, cfg: ModelConfig, target: str) -> None:
        self.reader = reader
        self.target = target
        self.names = reader.names()
        q = cfg.quantization_config or {}
        block = tuple(q.get("weight_block_size", [_BLOCK, _BLOCK]))
        if block[0] != block[1]:
            raise CheckpointError(f"only square FP8 blocks are supported, got weight_block_size {list(block)}")
        self.src_block = int(block[0])
        self.src_quant = cfg.quantization_config
        self.power_of_two = q.get("scale_fmt") == "ue8m0"
        self.scaled = {n[: -len(SCALE_SUFFIX)] for n in self.names
                       if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self.names}
        if target == "fp8" and self.scaled and self.src_block != _BLOCK:
            raise CheckpointError(
                f"the source is FP8 with {self.src_block}x{self.src_block} blocks; copying it into a "
                f"{_BLOCK}x{_BLOCK}-block FP8 checkpoint would mislabel its scales. Convert it to bf16 first.")

    @property
    def source_format(self) -> str:
        return "fp8" if self.scaled or self.src_quant else "unquantized"

    def output_quantization_config(self) -> dict | None:
        if self.target != "fp8":
            return None
        if self.src_quant and self.scaled:
            return dict(self.src_quant)  # copy-through keeps e.g. V3.1's scale_fmt
        return dict(FP8_QUANTIZATION_CONFIG)

    def transform(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """The destination tensors for source tensor `name` (empty for scales handled with their weight)."""
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in self.scaled:
            return []  # written (fp8) or consumed (dequantize) together with its weight
        t = self.reader.get(name)
        if name in self.scaled:
            scale = self.reader.get(name + SCALE_SUFFIX)
            if self.target == "fp8":
                return [(name, t), (name + SCALE_SUFFIX, scale)]  # already FP8: unchanged
            if t.dim() != 2:
                raise CheckpointError(f"{name} has a scale but shape {list(t.shape)}; expected a 2-D weight")
            try:
                w = dequantize_weight_blockwise(t, scale, block_size=self.src_block, dtype=TARGETS[self.target])
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from e
            return [(name, w)]
        if t.dtype in _FP8_DTYPES:
            raise CheckpointError(f"{name} is stored in FP8 but {name}{SCALE_SUFFIX} is missing")
        if not t.is_floating_point():
            return [(name, t)]
        if name.endswith("e_score_correction_bias"):
            return [(name, t.float())]
        if self.target == "fp8":
            if is_fp8_weight_name(name):
                if t.dim() != 2:
                    raise CheckpointError(f"{name} should be a 2-D Linear weight, got shape {list(t.shape)}")
                q, s = quantize_weight_blockwise(t.float(), block_size=_BLOCK, power_of_two=self.power_of_two)
                return [(name, q), (name + SCALE_SUFFIX, s)]
            return [(name, t.to(torch.bfloat16))]
        return [(name, t.to(TARGETS[self.target]))]


def _output_config(src: Path, target: str, quant: dict | None) -> dict:
    """The source's config.json as written (either dialect, unknown keys kept), re-labelled."""
    d = json.loads((src / "config.json").read_text(encoding="utf-8"))
    dtype_name = "bfloat16" if target == "fp8" else _DTYPE_NAMES[TARGETS[target]]
    d.pop("quantization_config", None)
    if quant is not None:
        d["quantization_config"] = quant
    d["torch_dtype"] = dtype_name
    if "dtype" in d:  # transformers >= 5 writes `dtype`
        d["dtype"] = dtype_name
    # `auto_map` points at modeling_*.py / configuration_*.py, which are never copied (code).
    d.pop("auto_map", None)
    ModelConfig.from_dict(d)  # the result must still be a valid config
    return d


def _tensor_nbytes(reader: TensorReader, name: str) -> int:
    sl = reader._handle(reader.map[name]).get_slice(name)
    n = 1
    for s in sl.get_shape():
        n *= s
    size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}.get(sl.get_dtype(), 4)
    return n * size


def _progress(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", file=sys.stderr,
                dynamic_ncols=True, disable=(None if enabled is None else not enabled), smoothing=0.1)


# ---- entry points ----------------------------------------------------------------------------------

def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, max_shard_size: str | int = "5GB",
            overwrite: bool = False, progress: bool | None = None) -> ConvertStats:
    """`convert_checkpoint`, returning statistics (tensor counts, bytes in/out, seconds)."""
    t0 = time.perf_counter()
    target = _normalize_target(to)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ConfigError(f"shard size must be positive, got {max_shard_size!r}")
    src_dir = _resolve_source(src)
    dst_dir = Path(dst).expanduser().resolve()
    _check_destination(src_dir, dst_dir, overwrite)
    cfg = load_config(src_dir)          # CheckpointError without config.json; ConfigError if invalid
    reader = TensorReader(src_dir)      # CheckpointError for pickle-only or missing weights
    plan = _Plan(reader, cfg, target)
    out_cfg = _output_config(src_dir, target, plan.output_quantization_config())
    extra = _files_to_copy(src_dir)

    files: dict[str, list[str]] = {}
    for name, f in reader.map.items():
        files.setdefault(f, []).append(name)
    sizes = {n: _tensor_nbytes(reader, n) for n in reader.map}
    bytes_in = sum(sizes.values())

    created = not dst_dir.exists()
    dst_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst_dir)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dst_dir))
    n_out = 0
    moved: list[Path] = []
    try:
        writer = ShardWriter(stage, max_bytes)
        with _progress(bytes_in, progress) as bar, torch.no_grad():
            for f in sorted(files):
                bar.set_postfix_str(f, refresh=False)
                for name in sorted(files[f]):
                    for out_name, t in plan.transform(name):
                        writer.add(out_name, t)
                        n_out += 1
                    bar.update(sizes[name])
                reader._handles.pop(f, None)  # unmap the finished shard
        writer.close()
        for p in extra:
            shutil.copyfile(p, stage / p.name)
        atomic_write_text(stage / "config.json", json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
        if overwrite:  # only now: a conversion that fails leaves the old model as it was
            _remove_old_model(dst_dir)
        # Move into place: weights and index, then the small files, config.json last.
        staged = sorted(stage.iterdir(), key=lambda p: (p.name == "config.json", p.name == SAFE_INDEX, p.name))
        for p in staged:
            os.replace(p, dst_dir / p.name)
            moved.append(dst_dir / p.name)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in reversed(moved):  # config.json is moved last, so it is never left without its weights
            p.unlink(missing_ok=True)
        if created:
            shutil.rmtree(dst_dir, ignore_errors=True)
        raise
    return ConvertStats(dst=dst_dir, tensors_in=len(reader.map), tensors_out=n_out, bytes_in=bytes_in,
                        bytes_out=writer.total_bytes, seconds=time.perf_counter() - t0,
                        source_format=plan.source_format, target=target, files_copied=[p.name for p in extra])


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, max_shard_size: str | int = "5GB",
                       overwrite: bool = False, progress: bool | None = None) -> Path:
    """Convert the checkpoint directory `src` into `dst` with weights in `to` (fp8, bf16, fp16, fp32).

    Works tensor by tensor and shard by shard on CPU; see the module docstring for the rules.
    Returns the destination directory.
    """
    return convert(src, dst, to, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress).dst


def run_convert(args: argparse.Namespace) -> int:
    """The `nanoseek convert` subcommand."""
    stats = convert(args.src, args.dst, args.to, max_shard_size=args.shard_size, overwrite=args.overwrite,
                    progress=getattr(args, "progress", None))
    print(stats.summary())
    return 0


__all__ = ["convert_checkpoint", "convert", "run_convert", "ConvertStats", "FP8_QUANTIZATION_CONFIG"]
