"""TrainConfig: every knob of a pretraining run, saved as JSON in the run directory.

Defaults follow DeepSeek-V3 where they transfer to small scale (AdamW 0.9/0.95, weight decay 0.1
on matrices, clip 1.0, gamma = 0.001, alpha = 1e-4, MTP lambda 0.3 -> 0.1) and are sized so that
`nanoseek train` with no arguments finishes on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError


def read_options(path: str | Path, name: str, what: str) -> dict[str, Any]:
    """A run's saved options: a JSON file holding one object (`name` is what the file is usually
    called, `what` what it holds), or a ConfigError that names the file and the problem."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the {name} file inside it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object of {what}")
    return d


@dataclass
class TrainConfig:
    # model and data
    model: str = "small"  # preset name or a config.json / model directory (architecture only)
    data: list[str] = field(default_factory=list)  # files/dirs/globs; empty = Python's standard library
    text_field: str = "text"
    add_bos: bool = True  # begin each document with bos: the engine begins every prompt with it
    tokenizer: str | None = None  # tokenizer.json (or dir); None = train a BPE of the model's vocab size
    init_from: str | None = None  # a model directory to start from (weights, config, tokenizer): fine-tuning
    sft_data: str | None = None  # chat JSONL ({"messages": [...]}) -> supervised fine-tuning on assistant tokens
    out_dir: str = "runs/small"
    val_fraction: float = 0.02
    split_seed: int = 0  # which files are held out; fixed, so validation losses compare across seeds
    # batch
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 300
    # optimizer and schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd
    wsd_decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_std: float = 0.02
    # DeepSeek-V3 specifics
    mtp_lambda: float = 0.3  # MTP loss weight for the first `mtp_lambda_switch` of training
    mtp_lambda_late: float = 0.1  # ... and after it (V3: 0.3 for 10T tokens, then 0.1 for 4.8T)
    mtp_lambda_switch: float = 10.0 / 14.8
    bias_update_gamma: float = 0.001  # aux-loss-free balancing speed (V3: 0.001, then 0 for the last 500B)
    bias_update_stop: float = 14.3 / 14.8
    seq_aux_alpha: float = 1e-4  # complementary sequence-wise balance loss
    aux_loss_alpha: float = 0.0  # classical auxiliary balance loss (for comparisons; V2 used 0.001)
    balancing: str = "aux_free"  # aux_free | aux_loss | none
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast; master weights stay fp32)
    compile: bool = False
    fp8: bool = False  # DeepSeek-V3's FP8 recipe for the Linear GEMMs (emulated on CPU, scaled-mm on Hopper)
    fp8_backend: str = "auto"  # auto | emulate | cuda
    seed: int = 1337
    threads: int = 0  # 0 = leave torch's default
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    sample_tokens: int = 64
    tensorboard: bool = True
    peak_tflops: float = 0.0  # for MFU; 0 = measure (CPU) or look up (known GPUs)

    def validate(self) -> "TrainConfig":
        """Check every field's type and range, so a bad value fails before any work, naming the field."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in fields(self):  # types first: the range checks below compare values
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if kind == "list[str]":
                need(isinstance(v, list) and all(isinstance(x, str) for x in v),
                     f"`{f.name}` must be a list of strings, got {v!r}")
            elif kind == "str | None":
                need(v is None or isinstance(v, str), f"`{f.name}` must be a string or null, got {v!r}")
            elif kind == "float":  # JSON writes 1.0 as 1; bool is an int subclass but never a number here
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                     f"`{f.name}` must be a finite number, got {v!r}")
            elif kind == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f"`{f.name}` must be an integer, got {v!r}")
            elif kind == "bool":
                need(isinstance(v, bool), f"`{f.name}` must be true or false, got {v!r}")
            else:
                need(isinstance(v, str), f"`{f.name}` must be a string, got {v!r}")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints"):
            v = getattr(self, name)
            need(v >= 1, f"`{name}` must be an integer >= 1, got {v!r}")
        for name in ("log_interval", "eval_interval", "ckpt_interval", "warmup_steps", "threads", "sample_tokens"):
            v = getattr(self, name)
            need(v >= 0, f"`{name}` must be an integer >= 0, got {v!r}")
        for name in ("seed", "split_seed"):  # numpy seeds must be non-negative, torch's fit in 64 bits
            v = getattr(self, name)
            need(0 <= v < 2**63, f"`{name}` must be an integer in [0, 2**63), got {v!r}")
        for name in ("model", "out_dir", "text_field"):
            need(getattr(self, name) != "", f"`{name}` must not be empty")
        need(self.lr > 0, f"`lr` must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "wsd"), f"`schedule` must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(0 < self.wsd_decay_fraction <= 1, f"`wsd_decay_fraction` must be in (0, 1], got {self.wsd_decay_fraction}")
        need(self.balancing in ("aux_free", "aux_loss", "none"),
             f"`balancing` must be aux_free, aux_loss or none, got {self.balancing!r}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"`dtype` must be auto, fp32 or bf16, got {self.dtype!r}")
        need(self.fp8_backend in ("auto", "emulate", "cuda"),
             f"`fp8_backend` must be auto, emulate or cuda, got {self.fp8_backend!r}")
        need(0 <= self.val_fraction < 1, f"`val_fraction` must be in [0, 1), got {self.val_fraction}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "`beta1` and `beta2` must be in [0, 1)")
        need(self.eps > 0, f"`eps` must be > 0, got {self.eps}")  # 0 divides 0 by 0 for an idle expert
        need(self.init_std > 0, f"`init_std` must be > 0, got {self.init_std}")
        for name in ("grad_clip", "weight_decay", "mtp_lambda", "mtp_lambda_late", "mtp_lambda_switch",
                     "bias_update_gamma", "bias_update_stop", "seq_aux_alpha", "aux_loss_alpha", "peak_tflops"):
            v = getattr(self, name)
            need(v >= 0, f"`{name}` must be >= 0, got {v}")
        if self.device != "auto":  # syntax only: whether that device exists is checked where it is used
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"`device` must be auto, cpu, cuda, cuda:N, mps, ..., got {self.device!r}") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d).validate()

    @classmethod
    def load(cls, path: str | Path, missing: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a JSON config; `missing` gives values for fields the file does not have."""
        d = read_options(path, "train_config.json", "training options")
        return cls.from_dict({**(missing or {}), **d})
