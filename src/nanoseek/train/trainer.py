"""The pretraining loop.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences of `seq_len` tokens:

    loss = CE(main) + lambda * mean_k CE(MTP depth k) + alpha * sequence-wise balance loss

MTP depth k at position i reads token i+k and predicts token i+1+k; its loss is summed over the
T-k positions that have a target and divided by T, as in DeepSeek-V3 eq. 24. After the optimizer
step, every MoE layer's correction bias moves by gamma against its expert's load over the whole
step (see `balance.py`).

Everything a step computes is a function of (model weights, optimizer state, step index): the
data sampler draws windows from a RNG seeded by (seed, step, micro-batch). That is what makes
resume exact: reload the newest checkpoint and the next steps repeat bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig, preset, PRESETS
from ..io_utils import atomic_write_text
from ..model import DeepseekV3ForCausalLM
from .balance import RoutingRecorder, balance_loss, max_violation, update_correction_bias
from .config import TrainConfig
from .metrics import MetricsLogger
from .schedule import bias_gamma, learning_rate, max_grad_norm, mtp_weight
from .state import interrupts_deferred, list_checkpoints, load_trainer_state, save_checkpoint

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks, for the MFU estimate on known GPUs.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "4090": 165.0, "3090": 71.0, "A10": 125.0, "L4": 121.0, "T4": 65.0, "V100": 125.0}


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name, a config.json file, or a directory holding one."""
    if spec in PRESETS and not Path(spec).exists():
        return preset(spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model directory")
    return ModelConfig.from_json_file(p)


def _check_device(device: torch.device) -> None:
    """Fail up front, as a user error, on a device this machine does not have."""
    from ..devices import device_unavailable

    reason = device_unavailable(device)
    if reason:
        raise ConfigError(f"`device` {str(device)!r}: {reason}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`device` {str(device)!r}: training supports cpu, cuda and mps")


def measure_cpu_peak_tflops(n: int = 768, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> None:
        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.out_dir)
        self.show_progress = show_progress
        self.resume_from: Path | None = None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"`out_dir` {str(self.run_dir)!r} is a file, not a run directory")
        if resume:
            ckpts = list_checkpoints(self.run_dir)
            if not ckpts:
                raise ConfigError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
            self.resume_from = ckpts[-1][1]
        elif list_checkpoints(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it, "
                              "or choose another --out")
        self._setup()

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        _check_device(self.device)
        if cfg.fp8:  # before any work: 'cuda' needs an FP8-capable GPU
            from ..fp8_linear import resolve_backend

            try:
                resolve_backend(cfg.fp8_backend)
            except ValueError as e:
                raise ConfigError(f"`fp8_backend`: {e}") from None
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.precision = "bf16 autocast" if use_bf16 else "fp32"
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        from ..data import prepare_data
        from ..tokenizer import Tokenizer, train_tokenizer
        from .sources import PretrainSource, SFTSource

        base = self.resume_from or (Path(cfg.init_from) if cfg.init_from else None)
        mcfg = resolve_model_config(str(base) if base else cfg.model)
        tok_path = (base / "tokenizer.json") if base else cfg.tokenizer
        if tok_path:
            self.tokenizer = Tokenizer.from_file(tok_path)
        else:
            self.tokenizer = self._train_tokenizer(mcfg.vocab_size, train_tokenizer)
        if self.tokenizer.vocab_size != mcfg.vocab_size:
            if base:
                if self.tokenizer.vocab_size > mcfg.vocab_size:
                    raise ConfigError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                                      f"{mcfg.vocab_size} embeddings")
            else:
                mcfg = mcfg.replace(vocab_size=self.tokenizer.vocab_size)
        if not base:
            mcfg = mcfg.replace(bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
                                pad_token_id=self.tokenizer.pad_id)
        mcfg = mcfg.replace(torch_dtype="float32", quantization_config=None)
        self.model_config = mcfg
        self._save_tokenizer()  # the run directory must hold its tokenizer

        if cfg.sft_data:
            self.source = SFTSource(cfg.sft_data, self.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed)
        else:
            from ..data import default_cache_dir

            train_data, val_data = prepare_data(cfg.data or None, self.tokenizer, default_cache_dir(),
                                                val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                                                text_field=cfg.text_field, show_progress=self.show_progress,
                                                add_bos=cfg.add_bos and self.tokenizer.bos_id is not None)
            self.source = PretrainSource(train_data, val_data, cfg.seq_len, cfg.batch_size, cfg.seed)

        self.model = DeepseekV3ForCausalLM(mcfg)
        self.model.init_weights(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
        if cfg.init_from and not self.resume_from:
            from ..checkpoint import load_weights_into

            load_weights_into(self.model, cfg.init_from)
        self.model.to(self.device).train()
        if cfg.fp8:
            from ..fp8_linear import enable_fp8_training

            n = enable_fp8_training(self.model, backend=cfg.fp8_backend)
            self.precision += f" + FP8 GEMMs ({n} layers, {cfg.fp8_backend})"
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.recorder = RoutingRecorder(self.model)
        self.step = 0
        if self.resume_from:
            state = load_trainer_state(self.resume_from, self.model, self.optimizer)
            self.step = state["step"]
            log.info("resumed from %s (step %d)", self.resume_from, self.step)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

        from ..summary import summarize

        flops = summarize(mcfg, seq_len=cfg.seq_len)["flops"]
        self.flops_per_token = flops["training_per_token_with_mtp" if mcfg.num_nextn_predict_layers else "training_per_token"]
        self.peak_tflops = cfg.peak_tflops or self._peak_tflops()
        # atomic: a torn train_config.json would block `--resume`
        atomic_write_text(self.run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.metrics = MetricsLogger(self.run_dir, cfg.tensorboard, resume_step=self.step if self.resume_from else None)

    def _save_tokenizer(self) -> None:
        # (the base model's own chat template, if any, is kept; the length is this model's context)
        self.tokenizer.save(self.run_dir, model_max_length=self.model_config.max_position_embeddings)

    def _train_tokenizer(self, vocab_size: int, train_tokenizer):
        from ..data import input_keys, read_documents, split_files

        files, _ = split_files(input_keys(self.cfg.data or None), self.cfg.val_fraction, self.cfg.split_seed)

        def texts(limit: int = 12 * 2**20):
            docs, seen = [], 0
            for f in files:
                for doc in read_documents(f, self.cfg.text_field):
                    docs.append(doc)
                    seen += len(doc)
                    if seen >= limit:  # a BPE needs a representative sample, not the whole corpus
                        return docs
            if len(files) == 1 and self.cfg.val_fraction > 0:
                # one file: validation is its tail, which the tokenizer must not see either
                keep = int(seen * (1 - self.cfg.val_fraction))
                out = []
                for doc in docs:
                    if keep <= 0:
                        break
                    out.append(doc[:keep])
                    keep -= len(doc)
                docs = out
            return docs

        return train_tokenizer(texts(), vocab_size, show_progress=self.show_progress)

    def _peak_tflops(self) -> float:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            for key, value in GPU_PEAK_TFLOPS.items():
                if key in name:
                    return value
            return 0.0
        return measure_cpu_peak_tflops()

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        step = self.step
        lr = learning_rate(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        lam = mtp_weight(step, cfg)
        T, B, K = cfg.seq_len, cfg.batch_size, self.model_config.num_experts_per_tok
        alpha = cfg.seq_aux_alpha if cfg.balancing == "aux_free" else (cfg.aux_loss_alpha if cfg.balancing == "aux_loss" else 0.0)
        per_sequence = cfg.balancing == "aux_free"
        self.recorder.reset_step()
        sums = {"loss": 0.0, "bal_loss": 0.0}
        mtp_sums: dict[int, float] = {}
        micro_batches = []
        for micro in range(cfg.grad_accum):
            batch, mask = self.source.get(step, micro)
            batch = batch.to(self.device)
            if mask is not None:  # SFT: learn only where the assistant writes
                batch = (batch, batch.masked_fill(mask.to(self.device) == 0, -100))
            else:
                batch = (batch, batch)
            micro_batches.append(batch)
        # The step's loss is the mean over all its target tokens: each micro-batch adds its sum over
        # this count (SFT micro-batches hold different numbers of assistant tokens)
        n_targets = sum(int((t[:, 1:T + 1] != -100).sum()) for _, t in micro_batches) or 1
        for batch, batch_targets in micro_batches:
            x, y = batch[:, :T], batch_targets[:, 1:T + 1]
            with self.autocast:
                out = self.forward(x, return_mtp=self.model_config.num_nextn_predict_layers > 0)
            main = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_targets
            total = main
            if out.mtp_logits:
                mtp_terms = []
                for k, logits in enumerate(out.mtp_logits, start=1):
                    target = batch_targets[:, 1 + k: T + 1]
                    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         ignore_index=-100, reduction="sum") / n_targets
                    mtp_terms.append(ce)
                    mtp_sums[k] = mtp_sums.get(k, 0.0) + ce.item()
                total = total + lam * torch.stack(mtp_terms).mean()
            routed = self.recorder.take_forward()
            if alpha > 0 and routed:
                bal = sum(balance_loss(s, i, B, K, per_sequence) for s, i in routed) / len(routed)
                total = total + alpha * bal / cfg.grad_accum
                sums["bal_loss"] += bal.item() / cfg.grad_accum
            total.backward()
            sums["loss"] += main.item()
        with interrupts_deferred():  # the update and the step that labels it go together
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm(cfg.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(self.recorder.step_counts)  # the balance rule needs global loads
            gamma = bias_gamma(step, cfg)
            update_correction_bias(self.recorder, gamma)
            self.step += 1
        rec = {"step": self.step, "loss": sums["loss"], "lr": lr, "grad_norm": float(grad_norm), "mtp_lambda": lam,
               "gamma": gamma}
        for k, v in mtp_sums.items():
            rec[f"mtp_loss_{k}"] = v
        if alpha > 0:
            rec["bal_loss"] = sums["bal_loss"]
        if self.recorder.layers:
            vio = max_violation(self.recorder.step_counts)
            rec["maxvio_batch"] = float(vio.mean())
            rec["maxvio_batch_max"] = float(vio.max())
        return rec

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.eval()
        saved_step, saved_window = self.recorder.step_counts.clone(), self.recorder.window_counts.clone()
        self.recorder.reset_step()
        total_loss, total_tokens, total_bytes = 0.0, 0, 0
        byte_len = torch.from_numpy(self.tokenizer.token_byte_lengths().astype("int64"))
        for batch, mask in self.source.eval_batches(cfg.eval_batches):
            batch = batch.to(self.device)
            targets = batch if mask is None else batch.masked_fill(mask.to(self.device) == 0, -100)
            with self.autocast:
                logits = model(batch[:, : cfg.seq_len]).logits
            y = targets[:, 1: cfg.seq_len + 1]
            total_loss += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                          ignore_index=-100, reduction="sum").item()
            total_tokens += int((y != -100).sum())
            total_bytes += int(byte_len[y[y != -100].cpu()].sum())
            self.recorder.take_forward()
        if total_tokens == 0:
            self.recorder.step_counts.copy_(saved_step)
            self.recorder.window_counts.copy_(saved_window)
            model.train()
            return {}
        loss = total_loss / total_tokens
        rec: dict[str, Any] = {"step": self.step, "val_loss": loss, "val_tokens": total_tokens}
        if total_bytes:  # bits per byte over exactly the evaluated target tokens' UTF-8 bytes
            rec["val_bpb"] = total_loss / math.log(2) / total_bytes
        main_layers = [i for i, n in enumerate(self.recorder.names)
                       if int(n.split(".")[2]) < self.model_config.num_hidden_layers]
        if main_layers:
            rec["maxvio_global"] = float(max_violation(self.recorder.step_counts[main_layers]).mean())
        self.recorder.step_counts.copy_(saved_step)
        self.recorder.window_counts.copy_(saved_window)
        model.train()
        return rec

    @torch.no_grad()
    def sample(self, prompt: str = "def ", max_new_tokens: int | None = None, temperature: float = 0.8,
               top_k: int = 50) -> str:
        """A short sample from the current model through the inference engine (same model object)."""
        from ..engine import Engine, SamplingParams

        n = self.cfg.sample_tokens if max_new_tokens is None else max_new_tokens
        self.recorder.enabled = False
        try:
            # fast=False: the engine's prepacked weights would go stale as training continues.
            engine = Engine(self.model, tokenizer=self.tokenizer, fast=False, seed=self.cfg.seed)
            params = SamplingParams(max_tokens=n, temperature=temperature, top_k=top_k, seed=self.cfg.seed)
            result = engine.generate(prompt, params)
            return prompt + result.text
        finally:
            self.recorder.enabled = True
            self.model.train()

    # -- the loop ---------------------------------------------------------------------------------
    def _checkpoint(self) -> Path:
        extra = {}
        for name in ("tokenizer.json", "tokenizer_config.json"):
            p = self.run_dir / name
            if p.exists():
                extra[name] = p.read_text(encoding="utf-8")
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                               {"train_config": self.cfg.to_dict()}, extra, self.cfg.keep_checkpoints)

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.show_progress, unit="step",
                   dynamic_ncols=True, desc="train")
        last_eval: dict[str, Any] = {}
        t_window, steps_window = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                rec = self.train_step()
                steps_window += 1
                if cfg.log_interval and (self.step % cfg.log_interval == 0 or self.step == cfg.max_steps):
                    dt = time.perf_counter() - t_window
                    tps = steps_window * tokens_per_step / dt
                    rec["tokens_per_s"] = tps
                    rec["tokens_seen"] = self.step * tokens_per_step
                    if self.peak_tflops:
                        rec["mfu"] = tps * self.flops_per_token / (self.peak_tflops * 1e12)
                    rec["expert_load"] = self.recorder.window_counts.tolist()
                    rec["expert_load_layers"] = [int(n.split(".")[2]) for n in self.recorder.names]
                    self.recorder.reset_window()
                    self.metrics.log(rec)
                    t_window, steps_window = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)
                if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                    last_eval = self.evaluate()
                    if last_eval:
                        self.metrics.log(last_eval)
                        bar.write(f"step {self.step}: val loss {last_eval['val_loss']:.4f}"
                                  + (f", {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else ""))
                if cfg.ckpt_interval and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_steps):
                    self._checkpoint()
        except KeyboardInterrupt:
            bar.close()
            path = self._checkpoint()
            print(f"interrupted at step {self.step}; checkpoint saved to {path}. "
                  f"Continue with: nanoseek train --out {self.run_dir} --resume")
            raise
        finally:
            bar.close()
            self.metrics.close()
        if not list_checkpoints(self.run_dir) or list_checkpoints(self.run_dir)[-1][0] != self.step:
            self._checkpoint()
        try:
            from .plots import plot_run

            plot_run(self.run_dir)
        except Exception as e:  # plotting must never lose a finished run
            log.warning("could not draw plots: %s", e)
        return last_eval


def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> Trainer:
    trainer = Trainer(cfg, resume=resume, show_progress=show_progress)
    trainer.fit()
    return trainer
