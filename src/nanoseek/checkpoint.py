"""Checkpoints in the official Hugging Face layout, read and written tensor by tensor.

A model directory holds `config.json` and either one `model.safetensors` or shards
`model-00001-of-000NN.safetensors` listed in `model.safetensors.index.json`. Tensor names are
DeepSeek's (`model.layers.3.mlp.experts.17.up_proj.weight`, `...gate.e_score_correction_bias`),
the MTP block sits at layer index `num_hidden_layers + k` with stored copies of the embedding and
output head, and FP8 checkpoints carry `float8_e4m3fn` weights with a float32 `weight_scale_inv`
per 128x128 block.

Loading builds the model on the meta device, allocates it once in the target dtype and copies
each tensor in from the memory-mapped files (dequantizing FP8 blocks on the way), so peak memory
stays near the final model size. Only safetensors and JSON are read: pickle files (`.bin`, `.pt`)
can execute code when loaded and are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, preset, PRESETS
from .fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from .io_utils import atomic_write, atomic_write_text
from .model import DeepseekV3ForCausalLM

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Linear layers DeepSeek-V3 stores in FP8; embeddings, heads, router, norms, eh_proj stay bf16.
FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")
_FP8_NAME = re.compile(r"\.(" + "|".join(FP8_LINEARS) + r")\.weight$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A model directory or weight file that does not match what the config describes."""


def is_fp8_weight_name(name: str) -> bool:
    """True for the tensors the official FP8 checkpoints store as float8 with block scales."""
    return bool(_FP8_NAME.search(name))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- name mapping: module parameters <-> checkpoint tensors ------------------------------------

@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor and where it lives in the model: `param[expert][rows]` (both optional)."""

    name: str
    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    shared_copy_of: str | None = None  # MTP's stored copies of the embedding / head


def checkpoint_entries(cfg: ModelConfig, model: DeepseekV3ForCausalLM | None = None) -> list[Entry]:
    """Every tensor an official-layout checkpoint of `cfg` holds (excluding FP8 scales), in order."""
    model = _meta_model(cfg) if model is None else model
    L = cfg.num_hidden_layers
    I = cfg.moe_intermediate_size
    out: list[Entry] = []
    seen: set[int] = set()
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    # Order: main model, then lm_head (so a tied head is the duplicate, as HF omits it), then the
    # MTP blocks (so their embedding/head are recognised as copies of the main ones).
    def rank(name: str) -> int:
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= L:
            return 2
        return 1 if name.startswith("lm_head") else 0

    items = sorted(state.items(), key=lambda kv: rank(kv[0]))
    first_name: dict[int, str] = {}
    for pname, t in items:
        if pname.endswith("experts.gate_up_proj"):
            base = pname[: -len("gate_up_proj")]
            for e in range(cfg.n_routed_experts):
                out.append(Entry(f"{base}{e}.gate_proj.weight", pname, e, (0, I)))
                out.append(Entry(f"{base}{e}.up_proj.weight", pname, e, (I, 2 * I)))
            continue
        if pname.endswith("experts.down_proj"):
            base = pname[: -len("down_proj")]
            out.extend(Entry(f"{base}{e}.down_proj.weight", pname, e) for e in range(cfg.n_routed_experts))
            continue
        key = id(t)
        if key in seen:
            # A shared module reached under a second name: the MTP block's embedding / head copies
            # (the official layout stores them), or lm_head when tied (HF omits it).
            if pname.startswith("model.layers.") and int(pname.split(".")[2]) >= L:
                out.append(Entry(pname, pname, shared_copy_of=first_name[key]))
            continue
        seen.add(key)
        first_name[key] = pname
        out.append(Entry(pname, pname))
    return out


def _meta_model(cfg: ModelConfig) -> DeepseekV3ForCausalLM:
    with torch.device("meta"):
        return DeepseekV3ForCausalLM(cfg)


def _expected_shape(model_state: dict[str, torch.Tensor], e: Entry) -> tuple[int, ...]:
    t = model_state[e.param]
    shape = tuple(t.shape)
    if e.expert is not None:
        shape = shape[1:]
    if e.rows is not None:
        shape = (e.rows[1] - e.rows[0],) + shape[1:]
    return shape


_SHAPE_FIELDS = [
    (r"embed_tokens\.weight$|lm_head\.weight$|shared_head\.head\.weight$", "`vocab_size` x `hidden_size`"),
    (r"q_a_proj\.weight$", "`q_lora_rank` x `hidden_size`"),
    (r"q_b_proj\.weight$", "`num_attention_heads`*(`qk_nope_head_dim`+`qk_rope_head_dim`) x `q_lora_rank`"),
    (r"q_proj\.weight$", "`num_attention_heads`*(`qk_nope_head_dim`+`qk_rope_head_dim`) x `hidden_size`"),
    (r"q_a_layernorm\.weight$", "`q_lora_rank`"),
    (r"kv_a_proj_with_mqa\.weight$", "(`kv_lora_rank`+`qk_rope_head_dim`) x `hidden_size`"),
    (r"kv_a_layernorm\.weight$", "`kv_lora_rank`"),
    (r"kv_b_proj\.weight$", "`num_attention_heads`*(`qk_nope_head_dim`+`v_head_dim`) x `kv_lora_rank`"),
    (r"o_proj\.weight$", "`hidden_size` x `num_attention_heads`*`v_head_dim`"),
    (r"experts\.\d+\.(gate|up)_proj\.weight$", "`moe_intermediate_size` x `hidden_size`"),
    (r"experts\.\d+\.down_proj\.weight$", "`hidden_size` x `moe_intermediate_size`"),
    (r"shared_experts\.(gate|up)_proj\.weight$", "`n_shared_experts`*`moe_intermediate_size` x `hidden_size`"),
    (r"shared_experts\.down_proj\.weight$", "`hidden_size` x `n_shared_experts`*`moe_intermediate_size`"),
    (r"mlp\.(gate|up)_proj\.weight$", "`intermediate_size` x `hidden_size`"),
    (r"mlp\.down_proj\.weight$", "`hidden_size` x `intermediate_size`"),
    (r"gate\.weight$", "`n_routed_experts` x `hidden_size`"),
    (r"e_score_correction_bias$", "`n_routed_experts`"),
    (r"eh_proj\.weight$", "`hidden_size` x 2*`hidden_size`"),
    (r"norm\.weight$|layernorm\.weight$", "`hidden_size`"),
]


def _shape_fields(name: str) -> str:
    for pattern, fields in _SHAPE_FIELDS:
        if re.search(pattern, name):
            return fields
    return "the config"


# ---- reading a directory -----------------------------------------------------------------------

def resolve_model_dir(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub id, downloaded (safetensors + JSON only)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a model directory holding config.json")
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s) and not s.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(s, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
        except Exception as e:  # network, auth, missing repo: one clear message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{s!r} is not a local directory (nothing at {p.resolve()}), and as a Hugging "
                                  f"Face Hub id it could not be downloaded: {first}") from e
        return Path(local)
    raise FileNotFoundError(f"no model directory {s!r} (and it is not a preset: {', '.join(PRESETS)})")


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weight files ({', '.join(pickles[:3])}). nanoseek refuses to load "
            "pickles: unpickling can run arbitrary code. Convert them to safetensors with a tool you trust "
            "(e.g. transformers' `save_pretrained(..., safe_serialization=True)`)."
        )


def weight_map(directory: Path) -> dict[str, str]:
    """tensor name -> safetensors file name (relative to `directory`).

    Which files hold the model, in transformers' order: `model.safetensors` if present, else the
    index; a directory with neither takes its one `*.safetensors` file, or several whose names do
    not collide. Hidden files (macOS `._model.safetensors`) are never weights, and other files
    beside the model's (an EMA copy, an adapter) are not read into it.
    """
    single = directory / SAFE_SINGLE
    if single.is_file():
        return {name: SAFE_SINGLE for name in _open(single).keys()}
    index = directory / SAFE_INDEX
    if index.exists():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            wm = data["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
            bad = [k for k, v in wm.items() if not isinstance(v, str) or not v or Path(v).is_absolute()
                   or ".." in Path(v).parts]
            if bad:
                raise TypeError(f"weight_map entries must be file names in the directory; {bad[0]!r} -> "
                                f"{wm[bad[0]]!r}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from e
        missing = sorted({f for f in wm.values() if not (directory / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(missing[:5])}")
        return wm
    files = sorted(f for f in directory.glob("*.safetensors") if not f.name.startswith("."))
    if not files:
        _refuse_pickles(directory)
        raise CheckpointError(f"no weights in {directory}: expected {SAFE_SINGLE} or {SAFE_INDEX}")
    wm: dict[str, str] = {}
    for f in files:
        for name in _open(f).keys():
            if name in wm:
                raise CheckpointError(
                    f"{directory} has no {SAFE_SINGLE} or {SAFE_INDEX}, and tensor {name!r} is in both "
                    f"{wm[name]} and {f.name}: which file is the model is ambiguous; move the other aside "
                    f"or write an index")
            wm[name] = f.name
    return wm


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    **{k: getattr(torch, v) for k, v in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                         ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, v)},
}
# Other dtypes the safetensors format has (sub-byte floats, ...): such a tensor may sit in a file,
# and is refused only if the model needs it.


def _st_dtype(name: str, info: "TensorInfo") -> torch.dtype:
    if info.dtype not in _ST_DTYPES:
        raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}, which nanoseek cannot load")
    return _ST_DTYPES[info.dtype]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def get_shape(self) -> list[int]:  # the safetensors slice API, for callers written against it
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype


class SafetensorsFile:
    """A safetensors file read with plain `readinto` calls straight into the destination tensor.

    Reading instead of memory-mapping keeps the file's pages out of this process's resident set
    and avoids an intermediate copy: loading costs the model's own memory plus one tensor at most.
    The header is validated up front so a truncated or corrupt file fails with its name.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                n = int.from_bytes(head, "little")
                if n <= 0 or n > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a readable safetensors file: header is not an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_start = 8 + n
        for name, info in header.items():
            try:
                dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if not isinstance(dtype, str):
                    raise ValueError(f"dtype {dtype!r} is not a string")
                if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, a, b)):
                    raise ValueError(f"shape {list(shape)} and data_offsets {[a, b]} must be non-negative integers")
                # (a dtype this table lacks: its size is not checked, and reading it is refused)
                expect = math.prod(shape) * _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else b - a
                if b - a != expect or b < a or data_start + b > size:
                    raise ValueError(f"byte range {a}..{b} does not hold {dtype}{list(shape)} within the file")
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: {e}") from e
            self.tensors[name] = TensorInfo(dtype, shape, data_start + a, b - a)
        # As the safetensors library: tensors tile the data area without overlapping (two names
        # pointing at one byte range would load one tensor's bytes as the other's).
        end = data_start
        for name, t in sorted(self.tensors.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
            if t.start < end and t.nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} overlaps the bytes of another tensor")
            end = max(end, t.start + t.nbytes)

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor `out` (same dtype and element count) from the file."""
        info = self.tensors[name]
        if out.dtype != _st_dtype(name, info) or out.numel() * out.element_size() != info.nbytes:
            raise ValueError(f"{name}: cannot read {info.dtype}{list(info.shape)} into {out.dtype}{list(out.shape)}")
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{name}: read target must be a contiguous CPU tensor")
        if info.nbytes == 0:
            return out
        buf = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(self.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=_st_dtype(name, info)))


def _open(path: Path) -> SafetensorsFile:
    return SafetensorsFile(path)


class TensorReader:
    """Access to the tensors of a model directory, one parsed header per shard file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.map = weight_map(directory)
        self._handles: dict[str, SafetensorsFile] = {}

    def _handle(self, file: str) -> SafetensorsFile:
        if file not in self._handles:
            self._handles[file] = _open(self.directory / file)
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.map)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._handle(self.map[name]).tensors[name]
        except KeyError:
            raise CheckpointError(f"the index maps {name!r} to {self.map[name]}, which does not contain it") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def dtype(self, name: str) -> torch.dtype:
        return _st_dtype(name, self.info(name))

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._handle(self.map[name]).get_tensor(name)

    def get_dequantized(self, name: str, dtype: torch.dtype, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
        """The tensor in `dtype`; FP8 weights are multiplied by their per-block `weight_scale_inv`."""
        t = self.get(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in self.map:
                raise CheckpointError(f"{name} is stored in FP8 but {scale_name} is missing")
            if block[0] != block[1]:
                raise CheckpointError(f"only square FP8 blocks are supported, got weight_block_size {list(block)}")
            try:
                return dequantize_weight_blockwise(t, self.get(scale_name), block_size=block[0], dtype=dtype)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from e
        return t.to(dtype)

    def load_into(self, name: str, target: torch.Tensor, block: tuple[int, int] = (128, 128)) -> None:
        """Copy a checkpoint tensor into `target`, reading in place when dtype and layout allow."""
        if self.dtype(name) == target.dtype and target.is_contiguous() and target.device.type == "cpu":
            self._handle(self.map[name]).read_into(name, target)
        else:
            target.copy_(self.get_dequantized(name, target.dtype, block).reshape(target.shape))


# ---- load ----------------------------------------------------------------------------------------

def load_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json")
    return ModelConfig.from_json_file(path)


def default_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.quantization_config is not None:
        return torch.bfloat16
    return DTYPES.get(str(cfg.torch_dtype), torch.float32)


def load_model(path_or_preset: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0, strict: bool = True,
               keep_fp8: bool = False) -> DeepseekV3ForCausalLM:
    """Load a model directory (official HF layout, FP8 included), a Hub id, or a preset (random init).

    dtype defaults to the checkpoint's `torch_dtype` (bf16 for FP8 checkpoints, fp32 for presets).
    keep_fp8=True keeps the FP8-stored Linear weights in FP8 in memory (1 byte + 128x128 scales,
    dequantized block-wise inside forward; see nanoseek.fp8_linear); tensors stored in higher
    precision are quantized on load. Everything else is loaded in `dtype`.
    """
    dtype = parse_dtype(dtype)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not Path(path_or_preset).exists():
        cfg = preset(path_or_preset)
        model = DeepseekV3ForCausalLM(cfg)
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        model = model.to(device=device, dtype=dtype or torch.float32).eval()
        if keep_fp8:
            from .fp8_linear import convert_to_fp8_inference

            convert_to_fp8_inference(model)
        return model
    directory = resolve_model_dir(path_or_preset)
    cfg = load_config(directory)
    reader = TensorReader(directory)
    return load_weights(cfg, reader, dtype=dtype or default_dtype(cfg), device=device, strict=strict,
                        keep_fp8=keep_fp8)


def _lacks_mtp(cfg: ModelConfig, names: set[str]) -> bool:
    """The config has MTP blocks but the checkpoint none (transformers writes no MTP weights)."""
    L = cfg.num_hidden_layers
    return bool(cfg.num_nextn_predict_layers) and not any(n.startswith(f"model.layers.{L}.") for n in names)


def _layer_indices(names: set[str]) -> set[int]:
    out = set()
    for n in names:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        if m:
            out.add(int(m.group(1)))
    return out


def load_weights(cfg: ModelConfig, reader: TensorReader, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", strict: bool = True,
                 keep_fp8: bool = False) -> DeepseekV3ForCausalLM:
    present = reader.names()
    L = cfg.num_hidden_layers
    if _lacks_mtp(cfg, present):
        # transformers writes `num_nextn_predict_layers` but no MTP weights: load without MTP.
        log.warning("config has num_nextn_predict_layers=%d but the checkpoint holds no MTP weights "
                    "(model.layers.%d.*); loading without MTP", cfg.num_nextn_predict_layers, L)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = _meta_model(cfg)
    entries = checkpoint_entries(cfg, model)
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", [128, 128]))
    # Check everything before allocating anything, and report all problems at once.
    missing = _check_layout(cfg, model, reader, entries, strict)

    if keep_fp8:  # swap in FP8 modules while still on meta: FP8 weights are allocated at 1 byte
        from .fp8_linear import convert_to_fp8_inference

        convert_to_fp8_inference(model, quantize=False, block_size=block[0])
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gave the head its own (uninitialized) storage
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype)  # FP8 modules keep their float8 weights and float32 scales
    _copy_weights(model, reader, entries, block)
    if not strict and missing:
        log.warning("missing tensors left uninitialized: %s", ", ".join(missing[:10]))
    model.config = cfg
    return model.eval()


_STORED_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _check_layout(cfg: ModelConfig, model: DeepseekV3ForCausalLM, reader: TensorReader, entries: list[Entry],
                  strict: bool) -> list[str]:
    """Names, shapes and dtypes of the checkpoint against the model of `cfg`: raises CheckpointError
    listing every problem when strict; returns the missing tensor names."""
    present = reader.names()
    meta_state = dict(model.named_parameters(remove_duplicate=False))
    meta_state.update(dict(model.named_buffers(remove_duplicate=False)))
    expected = {e.name for e in entries}
    optional = {e.name for e in entries if e.shared_copy_of}
    ignored = set()
    if cfg.tie_word_embeddings:  # the head is the embedding; a stored copy (some tools write one) is unused
        optional.add("lm_head.weight")
        ignored.add("lm_head.weight")
    missing = sorted(expected - present - optional)
    scales = {n for n in present if n.endswith("_scale_inv") and n[: -len("_scale_inv")] in present}
    # transformers writes a zero-size shared expert when n_shared_experts is 0: no weights, no module here
    empty = {n for n in present - expected if reader.info(n).nbytes == 0 and ".shared_experts." in n}
    unexpected = sorted(present - expected - scales - ignored - empty)
    misshaped = []
    for e in entries:
        if e.name in present:
            want = _expected_shape(meta_state, e)
            got = reader.shape(e.name)
            if got != want:
                misshaped.append(f"{e.name}: checkpoint {list(got)} vs config {list(want)} "
                                 f"({_shape_fields(e.name)})")
    for name in sorted((expected | scales) & present):
        stored = reader.info(name).dtype
        if stored not in _STORED_FLOATS:  # an integer or bool weight would be silently cast to float
            misshaped.append(f"{name}: stored as {stored}; weights and scales must be floating point")
    if strict and (missing or unexpected or misshaped):
        raise CheckpointError(_mismatch_report(cfg, reader.directory, missing, unexpected, misshaped, present))
    return missing


def _copy_weights(model: DeepseekV3ForCausalLM, reader: TensorReader, entries: list[Entry],
                  block: tuple[int, int]) -> None:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    present = reader.names()
    copies = []
    from .fp8_linear import fp8_param_targets, load_fp8_entry

    fp8_targets = fp8_param_targets(model)  # empty unless the model holds FP8 inference modules
    with torch.no_grad():
        for e in entries:
            if e.name not in present:
                continue
            if e.shared_copy_of:
                copies.append(e)
                continue
            if e.param in fp8_targets:
                try:
                    load_fp8_entry(fp8_targets[e.param], e.name, reader, e.expert, e.rows, block)
                except ValueError as err:
                    raise CheckpointError(str(err)) from err
                continue
            target = state[e.param]
            if e.expert is not None:
                target = target[e.expert]
            if e.rows is not None:
                target = target[e.rows[0]: e.rows[1]]
            reader.load_into(e.name, target, block)
        for e in copies:
            _load_shared_copy(model, e, reader.get_dequantized(e.name, state[e.shared_copy_of].dtype, block))


def load_weights_into(model: DeepseekV3ForCausalLM, directory: str | os.PathLike) -> None:
    """Overwrite an existing model's weights (same config) from a model directory, in place, after
    the same checks as `load_model` (every tensor present, of the model's shapes)."""
    reader = TensorReader(Path(directory))
    cfg = model.config
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", [128, 128]))
    entries = checkpoint_entries(cfg)
    L = cfg.num_hidden_layers
    if _lacks_mtp(cfg, reader.names()):
        # a checkpoint written by transformers has no MTP block: fine-tuning starts it from the
        # model's own initialization (load_model drops it instead)
        log.warning("%s holds no MTP weights (model.layers.%d.*); keeping the model's own", directory, L)
        entries = [e for e in entries if not e.name.startswith(f"model.layers.{L}.")]
    _check_layout(cfg, _meta_model(cfg), reader, entries, strict=True)
    _copy_weights(model, reader, entries, block)


def _load_shared_copy(model: DeepseekV3ForCausalLM, e: Entry, t: torch.Tensor) -> None:
    """MTP's stored embedding/head copy: keep sharing when equal to the main tensor, else untie."""
    main = dict(model.named_parameters(remove_duplicate=False))[e.shared_copy_of]
    if torch.equal(main.to(t.dtype), t.to(main.device)):
        return
    log.warning("%s differs from %s; giving the MTP block its own copy", e.name, e.shared_copy_of)
    layer_idx = int(e.name.split(".")[2])
    mtp = model.model.layers[layer_idx]
    if e.name.endswith("embed_tokens.weight"):
        emb = torch.nn.Embedding(*t.shape, device=main.device, dtype=main.dtype)
        emb.weight.data.copy_(t)
        mtp.embed_tokens = emb
    else:
        head = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, device=main.device, dtype=main.dtype)
        head.weight.data.copy_(t)
        mtp.shared_head.head = head


def _mismatch_report(cfg: ModelConfig, directory: Path, missing: list[str], unexpected: list[str],
                     misshaped: list[str], present: set[str]) -> str:
    def listing(title: str, items: list[str], limit: int = 25) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items[:limit]) + more

    parts = [f"checkpoint {directory} does not match its config:"]
    hints = []
    ckpt_layers = _layer_indices(present)
    n_expected = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if ckpt_layers and max(ckpt_layers) + 1 != n_expected:
        hints.append(f"the checkpoint has layers 0..{max(ckpt_layers)} but the config expects "
                     f"{n_expected} (`num_hidden_layers`={cfg.num_hidden_layers} + "
                     f"`num_nextn_predict_layers`={cfg.num_nextn_predict_layers})")
    experts = {int(m.group(1)) for n in present if (m := re.search(r"\.experts\.(\d+)\.", n))}
    if experts and max(experts) + 1 != cfg.n_routed_experts:
        hints.append(f"the checkpoint has {max(experts) + 1} routed experts per layer; config "
                     f"`n_routed_experts`={cfg.n_routed_experts}")
    dense = {i for i in _layer_indices(present) if f"model.layers.{i}.mlp.gate_proj.weight" in present}
    if dense and any(cfg.is_moe_layer(i) for i in dense):
        hints.append(f"the checkpoint has dense MLPs in layers {sorted(dense)}; config "
                     f"`first_k_dense_replace`={cfg.first_k_dense_replace}")
    if any(n.endswith("q_proj.weight") for n in present) and cfg.q_lora_rank is not None:
        hints.append(f"the checkpoint has q_proj (no q-LoRA) but config `q_lora_rank`={cfg.q_lora_rank}")
    if any(n.endswith("q_a_proj.weight") for n in present) and cfg.q_lora_rank is None:
        hints.append("the checkpoint has q_a_proj/q_b_proj but config `q_lora_rank` is null")
    for h in hints:
        parts.append(f"  hint: {h}")
    if missing:
        parts.append(listing("missing tensors", missing))
    if unexpected:
        parts.append(listing("unexpected tensors", unexpected))
    if misshaped:
        parts.append(listing("tensors with the wrong shape or dtype", misshaped))
    return "\n".join(parts)


# ---- save ----------------------------------------------------------------------------------------

def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, or an int (bytes). Must be positive."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, flags=re.I)
        if not m:
            raise ConfigError(f"cannot parse size {size!r}; write e.g. 5GB, 500MB or 2GiB")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if value <= 0:
        raise ConfigError(f"size must be positive, got {size!r}")
    return value


class ShardWriter:
    """Streams (name, tensor) pairs into safetensors shards of at most `max_shard_bytes`.

    Shards are written under temporary names and renamed into the official scheme once their total
    count is known; the index is written last, so an interrupted save never looks complete.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 5 * 10**9) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._ptrs: set[int] = set()
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        t = tensor.detach().to("cpu")
        # safetensors refuses tensors sharing storage (expert slices, MTP's copy of the embedding).
        ptr = t.untyped_storage().data_ptr()
        if t.untyped_storage().nbytes() != nbytes or not t.is_contiguous() or ptr in self._ptrs:
            t = t.clone(memory_format=torch.contiguous_format)
        self._ptrs.add(t.untyped_storage().data_ptr())
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp_name = f".shard-{len(self._shards):05d}.safetensors.partial"
        tensors = self._pending
        atomic_write(self.directory / tmp_name, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        self._shards.append((tmp_name, list(tensors)))
        self._pending, self._pending_bytes, self._ptrs = {}, 0, set()

    def abort(self) -> None:
        """Remove what an unfinished save wrote."""
        for tmp, _ in self._shards:
            (self.directory / tmp).unlink(missing_ok=True)
        self._shards, self._pending = [], {}

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        for f in [SAFE_SINGLE, SAFE_INDEX, *[p.name for p in self.directory.glob("model-*-of-*.safetensors")]]:
            (self.directory / f).unlink(missing_ok=True)
        if n == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SAFE_SINGLE)
            return [self.directory / SAFE_SINGLE]
        width = max(5, len(str(n)))
        wm, paths = {}, []
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = f"model-{i:0{width}d}-of-{n:0{width}d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            paths.append(self.directory / final)
            wm.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(wm.items()))}
        atomic_write_text(self.directory / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
        return paths


def _state_entries(model: DeepseekV3ForCausalLM) -> Iterator[tuple[str, torch.Tensor | None, tuple | None]]:
    """(official name, tensor, None), or (name, None, (fp8 codes, scales)) for a weight the model
    keeps in FP8 (loaded with keep_fp8), for every checkpoint tensor, in layout order."""
    from .fp8_linear import fp8_entry, fp8_param_targets

    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    fp8_targets = fp8_param_targets(model)
    for e in checkpoint_entries(model.config):
        if e.param in fp8_targets:
            yield e.name, None, fp8_entry(fp8_targets[e.param], e.expert, e.rows)
            continue
        t = state[e.param]
        if e.expert is not None:
            t = t[e.expert]
        if e.rows is not None:
            t = t[e.rows[0]: e.rows[1]]
        yield e.name, t, None


def iter_state_tensors(model: DeepseekV3ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) for every checkpoint tensor of the model, in layout order (weights
    kept in FP8 dequantized to their module's compute dtype)."""
    for name, t, kept in _state_entries(model):
        yield name, t if kept is None else _dequantized(kept)


def _dequantized(kept: tuple) -> torch.Tensor:
    """A weight kept in FP8 (`_state_entries`' codes, scales, block, dtype) in its compute dtype."""
    q, s, block, dtype = kept
    return dequantize_weight_blockwise(q, s, block, dtype)


def save_model(model: DeepseekV3ForCausalLM, directory: str | os.PathLike, dtype: str | torch.dtype | None = None,
               fp8: bool = False, max_shard_size: str | int = "5GB", extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors in the official layout (sharded with an index when large).

    fp8=True stores the Linear weights as float8_e4m3fn with 128x128 `weight_scale_inv` blocks,
    exactly as DeepSeek's released checkpoints, and adds `quantization_config` to config.json.
    """
    directory = Path(directory)
    dtype = parse_dtype(dtype) or model.lm_head.weight.dtype
    cfg = model.config
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    quant = ({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
             if fp8 else None)
    if fp8:
        dtype, name = torch.bfloat16, "bfloat16"  # the official FP8 layout keeps everything else in bf16
    out_cfg = cfg.replace(torch_dtype=name, quantization_config=quant)
    # No config.json until the weights are complete: an interrupted save never looks loadable.
    (directory / "config.json").unlink(missing_ok=True)
    writer = ShardWriter(directory, parse_size(max_shard_size))
    try:
        with torch.no_grad():
            for tname, t, kept in _state_entries(model):
                if kept is not None and fp8 and kept[2] == 128:  # already FP8 in 128x128 blocks: as it is
                    writer.add(tname, kept[0])
                    writer.add(tname + "_scale_inv", kept[1])
                    continue
                if kept is not None:
                    t = _dequantized(kept)
                if fp8 and is_fp8_weight_name(tname):
                    q, s = quantize_weight_blockwise(t.float())
                    writer.add(tname, q)
                    writer.add(tname + "_scale_inv", s)
                elif tname.endswith("e_score_correction_bias"):
                    writer.add(tname, t.float())
                else:
                    writer.add(tname, t.to(dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    atomic_write_text(directory / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    for fname, text in (extra_files or {}).items():
        atomic_write_text(directory / fname, text)
    out_cfg.save(directory)  # last: its presence marks a complete model directory
    return directory
