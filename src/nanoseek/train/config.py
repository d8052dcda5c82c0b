"""TrainConfig: every knob of a pretraining run, saved as JSON in the run directory.

Defaults follow DeepSeek-V3 where they transfer to small scale (AdamW 0.9/0.95, weight decay 0.1
on matrices, clip 1.0, gamma = 0.001, alpha = 1e-4, MTP lambda 0.3 -> 0.1) and are sized so that
`nanoseek train` with no arguments finishes on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError


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
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"`{name}` must be an integer >= 1, got {v!r}")
        for name in ("log_interval", "eval_interval", "ckpt_interval", "warmup_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"`{name}` must be an integer >= 0, got {v!r}")
        need(self.lr > 0, f"`lr` must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "wsd"), f"`schedule` must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(0 < self.wsd_decay_fraction <= 1, f"`wsd_decay_fraction` must be in (0, 1], got {self.wsd_decay_fraction}")
        need(self.balancing in ("aux_free", "aux_loss", "none"),
             f"`balancing` must be aux_free, aux_loss or none, got {self.balancing!r}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"`dtype` must be auto, fp32 or bf16, got {self.dtype!r}")
        need(0 <= self.val_fraction < 1, f"`val_fraction` must be in [0, 1), got {self.val_fraction}")
        need(self.grad_clip >= 0, f"`grad_clip` must be >= 0, got {self.grad_clip}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "`beta1` and `beta2` must be in [0, 1)")
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
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object of training options")
        return cls.from_dict({**(missing or {}), **d})
