"""GRPO with verifiable rewards, R1-Zero style, on the same model and engine as everything else.

One step:
1. draw `prompts_per_step` problems (seeded by step) and render them with the R1-Zero template;
2. sample G completions each through the inference engine (temperature 1 by default);
3. score them with the task's rule-based checker (correctness + format), normalize within groups;
4. compute the completions' log-probs under the sampling policy (pi_old) and, when beta > 0, the
   frozen reference model; then `mu` policy-gradient updates on the clipped objective
   (`loss.policy_loss`, variants grpo / dr_grpo / dapo).

Rollouts that hit the length limit can be masked out of the loss (`mask_truncated`); DAPO's
dynamic sampling drops groups whose rewards are all equal (they carry no signal). Checkpoints are
Hugging Face model directories plus the optimizer state, written atomically; `--resume` continues.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..io_utils import atomic_write_text
from ..train.schedule import max_grad_norm
from ..train.state import interrupts_deferred
from .loss import VARIANTS, group_advantages, policy_loss
from .tasks import RewardConfig, Task, get_task

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    model: str = ""  # model directory (weights, config, tokenizer)
    task: str = "arithmetic"  # arithmetic | countdown | a JSONL file of {prompt, answer}
    out_dir: str = "runs/grpo"
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    mu: int = 1  # policy updates per rollout batch
    variant: str = "grpo"  # grpo | dr_grpo | dapo
    eps_low: float = 0.2
    eps_high: float | None = None  # None = eps_low; DAPO's clip-higher uses 0.28
    beta: float = 0.0  # KL weight to the frozen reference (R1: 0.001); 0 = no reference model kept
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    reward_correct: float = 1.0
    reward_format: float = 0.1
    eval_interval: int = 25
    eval_problems: int = 100
    ckpt_interval: int = 25
    keep_checkpoints: int = 2
    seed: int = 0
    task_seed: int = 0

    def validate(self) -> "GRPOConfig":
        if self.variant not in VARIANTS:
            raise ConfigError(f"`variant` must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "mu", "eval_problems",
                     "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_interval", "ckpt_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be an integer >= 0 (0 = never), got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ConfigError("`group_size` must be >= 2: advantages are relative within a group")
        if self.temperature <= 0:
            raise ConfigError("`temperature` must be > 0 for rollouts (greedy samples would all be equal)")
        if self.beta < 0 or self.lr <= 0:
            raise ConfigError("`beta` must be >= 0 and `lr` > 0")
        # as in training: 0 turns clipping off; clip_grad_norm_ would zero every gradient at 0 and
        # flip its sign below 0
        if not self.grad_clip >= 0:
            raise ConfigError(f"`grad_clip` must be >= 0 (0 = no clipping), got {self.grad_clip}")
        return self


def completion_logprobs(model, seqs: torch.Tensor, prompt_lens: list[int], comp_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and entropies) of each row's completion tokens; rows are right-padded.

    Returns logp [B, Lc], entropy [B, Lc], mask [B, Lc] where Lc = max completion length.
    """
    logits = model(seqs[:, :-1]).logits.float()  # position t predicts token t + 1
    B = seqs.shape[0]
    Lc = max(comp_lens)
    idx = torch.tensor([[min(p - 1 + j, seqs.shape[1] - 2) for j in range(Lc)] for p in prompt_lens])
    sel = logits.gather(1, idx.unsqueeze(-1).expand(B, Lc, logits.shape[-1]))
    logp_all = F.log_softmax(sel, dim=-1)
    targets = seqs.gather(1, (idx + 1).clamp_max(seqs.shape[1] - 1))
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(Lc)] for n in comp_lens])
    return logp, entropy, mask


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, resume: bool = False, show_progress: bool = True) -> None:
        from ..checkpoint import load_model
        from ..engine import Engine
        from ..tokenizer import Tokenizer
        from ..train.state import list_checkpoints, load_trainer_state

        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.out_dir)
        self.show_progress = show_progress
        ckpts = list_checkpoints(self.run_dir)
        if resume and not ckpts:
            raise ConfigError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        if ckpts and not resume:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume or choose another --out")
        source = ckpts[-1][1] if resume else Path(cfg.model)
        self.task: Task = get_task(cfg.task, cfg.task_seed)
        self.reward_cfg = RewardConfig(cfg.reward_correct, cfg.reward_format)
        torch.manual_seed(cfg.seed)
        self.model = load_model(source, dtype=torch.float32).train()
        self.tokenizer = Tokenizer.from_file(source)
        self.ref = None
        if cfg.beta > 0:
            self.ref = load_model(cfg.model, dtype=torch.float32).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                           weight_decay=cfg.weight_decay)
        self.step = 0
        if resume:
            self.step = load_trainer_state(ckpts[-1][1], self.model, self.optimizer)["step"]
        self.engine = Engine(self.model, tokenizer=self.tokenizer, fast=False, seed=cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # atomically: `--resume` reads it back, and a torn file would stop the run
        atomic_write_text(self.run_dir / "grpo_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            from ..train.metrics import MetricsLogger

            MetricsLogger(self.run_dir, tensorboard=False, resume_step=self.step).close()
        else:
            self.metrics_path.unlink(missing_ok=True)

    # -- rollouts ---------------------------------------------------------------------------------
    def _encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    @torch.no_grad()
    def rollout(self, problems, n: int, temperature: float, seed: int):
        from ..engine import SamplingParams

        prompts = [self._encode_prompt(self.task.prompt(p)) for p in problems for _ in range(n)]
        self.model.eval()
        if temperature == 0:
            params = SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=0.0)
        else:
            # One seed per row: a seeded row draws from its own generator, so a shared seed would
            # make the G completions of a prompt identical and every advantage zero.
            params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                     seed=seed * 100_003 + i) for i in range(len(prompts))]
        results = self.engine.generate(prompts, params)
        self.model.train()
        return prompts, results

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict[str, float]:
        problems = self.task.problems("test", n or self.cfg.eval_problems)
        out = {}
        for name, temp in (("sampled", 1.0), ("greedy", 0.0)):
            _, results = self.rollout(problems, 1, temp, seed=10_000 + self.step)
            correct = [self.task.is_correct(p, r.text) for p, r in zip(problems, results)]
            out[f"test_acc_{name}"] = sum(correct) / len(correct)
        return out

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.step)
        pool = self.task.problems("train", max(1000, cfg.prompts_per_step))
        problems = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts_per_step)]
        t0 = time.perf_counter()
        prompts, results = self.rollout(problems, cfg.group_size, cfg.temperature, seed=cfg.seed * 7919 + self.step)
        t_rollout = time.perf_counter() - t0
        group_problems = [p for p in problems for _ in range(cfg.group_size)]
        rewards = torch.tensor([self.task.reward(p, r.text, self.reward_cfg) for p, r in zip(group_problems, results)])
        correct = [self.task.is_correct(p, r.text) for p, r in zip(group_problems, results)]
        truncated = [r.finish_reason == "length" for r in results]
        adv = group_advantages(rewards, cfg.group_size, scale_by_std=cfg.variant != "dr_grpo")
        keep = list(range(len(results)))
        if cfg.dynamic_sampling:
            r = rewards.view(-1, cfg.group_size)
            informative = (r.max(dim=1).values != r.min(dim=1).values).tolist()
            keep = [i for i in keep if informative[i // cfg.group_size]]
        if cfg.mask_truncated:
            keep = [i for i in keep if not truncated[i]]
        rec: dict[str, Any] = {
            "step": self.step + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": sum(correct) / len(correct),
            "response_length": sum(len(r.token_ids) for r in results) / len(results),
            "truncated_fraction": sum(truncated) / len(truncated), "rollout_s": t_rollout,
        }
        keep = [i for i in keep if len(results[i].token_ids) > 0]
        if not keep or float(adv[keep].abs().sum()) == 0:
            rec.update(loss=0.0, kl=0.0, clip_fraction=0.0, entropy=float("nan"), skipped=True)
            self.step += 1
            return rec
        seqs, plens, clens = self._pack([prompts[i] for i in keep], [results[i].token_ids for i in keep])
        adv_k = adv[keep]
        with torch.no_grad():
            logp_ref = completion_logprobs(self.ref, seqs, plens, clens)[0] if self.ref is not None else None
            # With one update per rollout batch pi_old is the current policy: its log-probs are the
            # first pass's, detached, and a separate no-grad forward would only repeat them.
            logp_old = completion_logprobs(self.model, seqs, plens, clens)[0] if cfg.mu > 1 else None
        # the updates and the step that labels them go together: Ctrl-C waits for the step's end
        with interrupts_deferred():
            stats = None
            for _ in range(cfg.mu):
                logp, entropy, mask = completion_logprobs(self.model, seqs, plens, clens)
                if logp_old is None:
                    logp_old = logp.detach()
                loss, stats = policy_loss(logp, logp_old, adv_k, mask, variant=cfg.variant, eps_low=cfg.eps_low,
                                          eps_high=cfg.eps_high, beta=cfg.beta, logp_ref=logp_ref,
                                          max_len=cfg.max_new_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm(cfg.grad_clip))
                self.optimizer.step()
            rec.update(loss=stats.loss, kl=stats.kl, clip_fraction=stats.clip_fraction, ratio_mean=stats.ratio_mean,
                       entropy=float((entropy.detach() * mask).sum() / mask.sum()), n_trained=len(keep),
                       step_s=time.perf_counter() - t0)
            self.step += 1
        return rec

    def _pack(self, prompts: list[list[int]], completions: list[list[int]]):
        lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        seqs = torch.full((len(prompts), max(lens) + 1), pad, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            seqs[i, : len(p) + len(c)] = torch.tensor(p + list(c))
        return seqs, [len(p) for p in prompts], [len(c) for c in completions]

    # -- loop -------------------------------------------------------------------------------------
    def _log(self, rec: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _checkpoint(self) -> None:
        from ..train.state import save_checkpoint

        extra = {}
        src = Path(self.cfg.model)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).exists():
                extra[name] = (src / name).read_text(encoding="utf-8")
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, {"grpo_config": asdict(self.cfg)},
                        extra, self.cfg.keep_checkpoints)

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        history: dict[str, Any] = {}
        if self.step == 0:
            first = {"step": 0, **self.evaluate()}
            self._log(first)
            history["before"] = first
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.show_progress, unit="step", desc="grpo")
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                self._log(rec)
                bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", acc=f"{rec['accuracy']:.2f}",
                                len=f"{rec['response_length']:.0f}", refresh=False)
                bar.update(1)
                if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps):
                    ev = {"step": self.step, **self.evaluate()}
                    self._log(ev)
                    history["after"] = ev
                    bar.write(f"step {self.step}: held-out accuracy sampled {ev['test_acc_sampled']:.3f}, "
                              f"greedy {ev['test_acc_greedy']:.3f}")
                if cfg.ckpt_interval and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps):
                    self._checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self._checkpoint()
            print(f"interrupted at step {self.step}; continue with: nanoseek grpo {cfg.model} --out {self.run_dir} --resume")
            raise
        finally:
            bar.close()
        try:
            plot_grpo(self.run_dir)
        except Exception as e:  # never lose a finished run to a plotting problem
            log.warning("could not draw plots: %s", e)
        return history


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_grpo(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_records(run_dir)
    train = [r for r in recs if "reward_mean" in r]
    evals = [r for r in recs if "test_acc_sampled" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    if train:
        s = [r["step"] for r in train]
        axes[0].plot(s, [r["reward_mean"] for r in train], label="reward (mean)")
        axes[0].plot(s, [r["accuracy"] for r in train], label="train accuracy", alpha=0.7)
        axes[1].plot(s, [r["response_length"] for r in train], color="tab:green")
    if evals:
        s = [r["step"] for r in evals]
        axes[2].plot(s, [r["test_acc_sampled"] for r in evals], "o-", label="held-out, sampled (T=1)")
        axes[2].plot(s, [r["test_acc_greedy"] for r in evals], "s-", label="held-out, greedy")
    axes[0].set_title("reward")
    axes[1].set_title("response length (tokens)")
    axes[2].set_title("held-out accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    fig.tight_layout()
    path = run_dir / "grpo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def config_from_dict(d: dict[str, Any]) -> GRPOConfig:
    known = {f.name for f in fields(GRPOConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown GRPO option(s): {', '.join(unknown)}")
    return GRPOConfig(**d).validate()
