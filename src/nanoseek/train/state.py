"""Run-directory checkpoints that survive SIGKILL at any moment, and exact resume.

Layout of a run directory (it *is* a Hugging Face model directory):

    config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json
                              the latest model, loadable by nanoseek, transformers, ...
    train_config.json         the TrainConfig of the run
    metrics.jsonl             one JSON object per log/eval step
    checkpoints/step-000300/  a complete checkpoint: the model files + trainer_state/
        trainer_state/optimizer.safetensors   AdamW moments per parameter name
        trainer_state/state.json              step, schedule position, RNG states, data position

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed into place when complete; a
directory rename is atomic, so a kill leaves either the old set of checkpoints or the new one.
Only then are the top-level model files refreshed (hard links + atomic rename) and old checkpoints
pruned. Resume picks the newest complete `step-N`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import load_weights_into, save_model
from ..io_utils import atomic_write, atomic_write_text
from ..model import DeepseekV3ForCausalLM

CKPT_DIR = "checkpoints"


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt.

    Around an optimizer update and the step counter that labels it: an interrupt landing between
    the two would checkpoint step N+1's weights (or half-updated ones) as step N, and `--resume`
    would not continue exactly. Outside the main thread (where signals cannot be caught) a no-op.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # (a process that ignores SIGINT, or handles it its own way, keeps doing so)
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
_STEP_RE = re.compile(r"^step-(\d+)$")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json")


def _rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
                                      for s in state["cuda"]])


def optimizer_tensors(model: DeepseekV3ForCausalLM, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"{names[id(p)]}::{key}"] = value.detach().to("cpu").contiguous()
    return out


def load_optimizer_tensors(model: DeepseekV3ForCausalLM, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.split("::")
        p = params[name]
        opt.state[p][field] = value.to(p.device) if field != "step" else value
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for child in d.iterdir():
        m = _STEP_RE.match(child.name)
        if m and (child / "trainer_state" / "state.json").is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def save_checkpoint(run_dir: Path, step: int, model: DeepseekV3ForCausalLM, opt: torch.optim.Optimizer,
                    state: dict[str, Any], extra_files: dict[str, str], keep: int) -> Path:
    ckpts = run_dir / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:06d}"
    tmp = ckpts / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=torch.float32, extra_files=extra_files)
    ts = tmp / "trainer_state"
    ts.mkdir()
    tensors = optimizer_tensors(model, opt)
    atomic_write(ts / "optimizer.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    state = {**state, "step": step, "rng": _rng_state()}
    atomic_write_text(ts / "state.json", json.dumps(state, indent=1) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _publish(run_dir, final)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(".tmp-step-*"):  # saves cut short by a kill or a second Ctrl-C
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _publish(run_dir: Path, ckpt: Path) -> None:
    """Make the run directory itself the latest model: hard-link each file in, atomically."""
    for name in MODEL_FILES:
        if (ckpt / name).exists():
            _link_into(ckpt / name, run_dir / name)
        elif name.startswith("model.safetensors") and (run_dir / name).exists():
            (run_dir / name).unlink()  # switching between sharded and single-file layouts
    for shard in ckpt.glob("model-*-of-*.safetensors"):
        _link_into(shard, run_dir / shard.name)


def _link_into(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.publish")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_trainer_state(ckpt: Path, model: DeepseekV3ForCausalLM, opt: torch.optim.Optimizer) -> dict[str, Any]:
    load_weights_into(model, ckpt)
    load_optimizer_tensors(model, opt, load_file(ckpt / "trainer_state" / "optimizer.safetensors"))
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    _set_rng_state(state.pop("rng"))
    return state


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
