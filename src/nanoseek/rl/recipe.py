"""`nanoseek recipe r1-zero`: an R1-Zero-style loop that fits a laptop CPU.

1. **Base model.** `tiny` pretrained on generated addition problems (operands of 1-2 digits) in
   the R1-Zero template, each followed by a solution. Like web text, the corpus has two habits:
   60% of the solutions are worked column by column, units first
   (`<think> 7 + 4 = 11 , 6 + 9 + 1 = 16 </think> <answer> 161 </answer>`), 40% answer at a glance
   (`<think> 67 + 94 = 161 </think> <answer> 161 </answer>`). The byte-level BPE keeps numbers of
   up to 3 digits as whole tokens, so a small model cannot add `67 + 94` in one token: its glance
   answers are mostly wrong, its worked ones mostly right. The base model keeps both habits and
   picks one at random when sampled, so its samples at temperature 1 are right far less often
   than its greedy answers.
2. **GRPO** on the training problems with rule-checked rewards (correct answer + format), sampled
   at temperature 1, then evaluation on the held-out problems, sampled (T = 1) and greedy. Nothing
   tells the model which habit is better; the reward does, and GRPO shifts it to working the sum
   out, so responses get longer as accuracy rises (R1-Zero's "thinking longer", in miniature).

Both stages resume: a finished base model is reused, an interrupted base or GRPO run continues
from its newest checkpoint. It writes `report.md` (the before/after table) and `grpo/grpo.png`
(reward, response length, held-out accuracy). `--quick` runs a few-minute smoke version of the
pipeline.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..io_utils import atomic_write_text
from .tasks import ArithmeticTask, Problem, get_task

RECIPE_TASK = "arithmetic:digits=1-2,ops=+"


@dataclass(frozen=True)
class RecipeSettings:
    base_examples: int = 80_000  # generated solved problems in the pretraining corpus
    worked_fraction: float = 0.6  # share of them worked column by column; the rest answered at a glance
    base_steps: int = 3000
    base_batch: int = 16
    base_seq_len: int = 128
    base_lr: float = 3e-3
    grpo_steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 1e-4
    max_new_tokens: int = 40
    eval_interval: int = 25
    eval_problems: int = 200


FULL = RecipeSettings()
QUICK = RecipeSettings(base_examples=2000, base_steps=20, grpo_steps=3, prompts_per_step=4, group_size=4,
                       eval_interval=3, eval_problems=20)


def column_sums(a: int, b: int) -> str:
    """Schoolbook addition, units first: 67 + 94 -> '7 + 4 = 11 , 6 + 9 + 1 = 16'."""
    steps, carry = [], 0
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}")
        carry = s // 10
    return " , ".join(steps)


def demonstration(task: ArithmeticTask, p: Problem, worked: bool = True) -> str:
    """The prompt, then an answer in R1-Zero's format: worked column by column, or at a glance."""
    a, b = p.meta["a"], p.meta["b"]
    thought = column_sums(a, b) if worked else f"{a} + {b} = {p.answer}"
    return task.prompt(p) + f" <think> {thought} </think> <answer> {p.answer} </answer>"


def write_base_corpus(path: Path, n: int, seed: int = 0, worked_fraction: float = 1.0) -> Path:
    """`n` solved training problems as JSONL documents (the held-out test problems never appear);
    a `worked_fraction` of them worked column by column, the others answered at a glance."""
    task = get_task(RECIPE_TASK, seed)
    assert isinstance(task, ArithmeticTask)
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in task.problems("train", n):
            f.write(json.dumps({"text": demonstration(task, p, worked=rng.random() < worked_fraction)}) + "\n")
    tmp.replace(path)
    return path


def worked_share(model_dir: str | Path, n: int = 200, max_new_tokens: int = 40, seed: int = 0) -> float:
    """Of the held-out problems with a two-digit operand, the share a model answers by working the
    columns (its completion, sampled at temperature 1, holds a ' , ' between column sums)."""
    from ..engine import Engine, SamplingParams

    task = get_task(RECIPE_TASK)
    problems = [p for p in task.problems("test", n) if max(p.meta["a"], p.meta["b"]) >= 10]
    engine = Engine(str(model_dir), fast=False)
    results = engine.generate([task.prompt(p) for p in problems],
                              [SamplingParams(max_tokens=max_new_tokens, temperature=1.0, seed=seed + i)
                               for i in range(len(problems))])
    return sum(" , " in r.text for r in results) / max(1, len(results))


def run_r1_zero(out: str | Path, quick: bool = False, show_progress: bool = True,
                settings: RecipeSettings | None = None) -> dict:
    from ..train import TrainConfig, Trainer
    from ..train.state import list_checkpoints
    from .grpo import GRPOConfig, GRPOTrainer, read_records

    s = settings or (QUICK if quick else FULL)
    out = Path(out)
    t0 = time.perf_counter()
    base_dir = out / "base"
    # Finished = the base run checkpointed its last step (the trainer always does). Not the presence
    # of base/model.safetensors: every checkpoint publishes one, the first included.
    base_ckpts = list_checkpoints(base_dir)
    if not base_ckpts or base_ckpts[-1][0] < s.base_steps:
        corpus = out / "data" / "arithmetic.jsonl"
        if not corpus.exists():
            write_base_corpus(corpus, s.base_examples, worked_fraction=s.worked_fraction)
        Trainer(TrainConfig(model="tiny", data=[str(corpus)], out_dir=str(base_dir), seq_len=s.base_seq_len,
                            batch_size=s.base_batch, max_steps=s.base_steps, lr=s.base_lr,
                            warmup_steps=min(20, s.base_steps // 10 + 1), eval_interval=s.base_steps,
                            ckpt_interval=max(1, s.base_steps // 4), tensorboard=False, sample_tokens=0, seed=0),
                resume=bool(base_ckpts), show_progress=show_progress).fit()
    t_base = time.perf_counter() - t0
    cfg = GRPOConfig(model=str(base_dir), task=RECIPE_TASK, out_dir=str(out / "grpo"), steps=s.grpo_steps,
                     prompts_per_step=s.prompts_per_step, group_size=s.group_size, max_new_tokens=s.max_new_tokens,
                     temperature=1.0, lr=s.grpo_lr, beta=0.0, eval_interval=s.eval_interval,
                     eval_problems=s.eval_problems, ckpt_interval=s.eval_interval, seed=0)
    trainer = GRPOTrainer(cfg, resume=bool(list_checkpoints(out / "grpo")), show_progress=show_progress)
    history = trainer.fit()
    t_total = time.perf_counter() - t0
    records = read_records(out / "grpo")  # the whole run, also the steps before a resume
    evals = [r for r in records if "test_acc_sampled" in r]
    before, after = evals[0], evals[-1]
    shares = [worked_share(d, s.eval_problems, s.max_new_tokens) for d in (base_dir, out / "grpo")]
    lengths = [r["response_length"] for r in records if "response_length" in r]
    k = max(1, len(lengths) // 10)
    report = (
        "# R1-Zero recipe result\n\n"
        f"Task `{RECIPE_TASK}` (held-out: {cfg.eval_problems} fixed test problems never seen in training). "
        f"Base model: `tiny` pretrained {s.base_steps} steps x {s.base_batch} x {s.base_seq_len} tokens on "
        f"{s.base_examples} solved problems, {s.worked_fraction:.0%} of them worked ({t_base / 60:.1f} min this run). "
        f"GRPO: {cfg.steps} steps x "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples, lr {cfg.lr}. "
        f"Total wall time {t_total / 60:.1f} min.\n\n"
        f"| held-out accuracy | base | after GRPO | change |\n|---|---|---|---|\n"
        f"| sampled, temperature 1 | {before['test_acc_sampled']:.3f} | {after['test_acc_sampled']:.3f} | "
        f"{100 * (after['test_acc_sampled'] - before['test_acc_sampled']):+.1f} pts |\n"
        f"| greedy | {before['test_acc_greedy']:.3f} | {after['test_acc_greedy']:.3f} | "
        f"{100 * (after['test_acc_greedy'] - before['test_acc_greedy']):+.1f} pts |\n"
        f"| two-digit problems worked column by column (sampled) | {shares[0]:.3f} | {shares[1]:.3f} | |\n"
        f"| mean response length, first / last {k} GRPO steps (tokens) | {sum(lengths[:k]) / k:.1f} | "
        f"{sum(lengths[-k:]) / k:.1f} | |\n\n"
        "![reward, response length and held-out accuracy](grpo/grpo.png)\n"
    )
    atomic_write_text(out / "report.md", report)
    return {"before": before, "after": after, "minutes": t_total / 60, "history": history, "report": report}

