"""`nanoseek recipe r1-zero`: an R1-Zero-style loop that fits a laptop CPU.

1. Base model. Generated two-digit addition problems in the R1-Zero template, each followed by a
   worked answer whose reasoning spells the digits out (`<think> 2 4 + 6 = 3 0 </think>
   <answer> 30 </answer>`): the byte-level BPE keeps numbers as whole tokens, and spelling digits is
   what lets a small model add numbers it never saw. The base model is pretrained on these
   documents for a short while, on purpose not to convergence: it knows the format and part of the
   arithmetic, and it is unsure (its samples at temperature 1 are often wrong).
2. GRPO on the training problems with rule-checked rewards (correct answer + format), sampled at
   temperature 1, then evaluation on the held-out problems, sampled (T = 1) and greedy.

It writes `report.md` with the before/after table and `grpo.png` (reward, response length,
held-out accuracy). `--quick` runs a few-minute smoke version of the same pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .tasks import ArithmeticTask, Problem

RECIPE_TASK = dict(digits=(1, 2), ops="+")


def spelled(n: int) -> str:
    return " ".join(str(n))


def demonstration(task: ArithmeticTask, p: Problem) -> str:
    a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
    return (task.prompt(p) + f" <think> {spelled(a)} {op} {spelled(b)} = {spelled(int(p.answer))} </think>"
            f" <answer> {p.answer} </answer>")


def write_base_corpus(path: Path, n: int, seed: int = 0) -> Path:
    task = ArithmeticTask(seed=seed, **RECIPE_TASK)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in task.problems("train", n):
            f.write(json.dumps({"text": demonstration(task, p)}) + "\n")
    return path


def run_r1_zero(out: str | Path, quick: bool = False, show_progress: bool = True) -> dict:
    from ..train import TrainConfig, Trainer
    from .grpo import GRPOConfig, GRPOTrainer

    out = Path(out)
    t0 = time.perf_counter()
    corpus = write_base_corpus(out / "data" / "arithmetic.jsonl", 2000 if quick else 20000)
    base_dir = out / "base"
    base_steps = 20 if quick else 400
    if not (base_dir / "config.json").exists():
        Trainer(TrainConfig(model="tiny", data=[str(corpus)], out_dir=str(base_dir), seq_len=128, batch_size=16,
                            max_steps=base_steps, lr=3e-3, warmup_steps=20 if not quick else 2,
                            eval_interval=base_steps, ckpt_interval=base_steps, tensorboard=False,
                            sample_tokens=4, seed=0), show_progress=show_progress).fit()
    t_base = time.perf_counter() - t0
    cfg = GRPOConfig(model=str(base_dir), task="arithmetic", out_dir=str(out / "grpo"),
                     steps=3 if quick else 60, prompts_per_step=4 if quick else 8, group_size=4 if quick else 8,
                     max_new_tokens=24, temperature=1.0, lr=1e-4 if not quick else 1e-4, beta=0.0,
                     eval_interval=3 if quick else 20, eval_problems=20 if quick else 200,
                     ckpt_interval=3 if quick else 20, seed=0)
    trainer = GRPOTrainer(cfg, show_progress=show_progress)
    trainer.task = ArithmeticTask(seed=cfg.task_seed, **RECIPE_TASK)
    history = trainer.fit()
    t_total = time.perf_counter() - t0
    before, after = history["before"], history["after"]
    report = (
        "# R1-Zero recipe result\n\n"
        f"Base model: `tiny` pretrained {base_steps} steps on generated addition ({t_base / 60:.1f} min); "
        f"GRPO: {cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.group_size} samples. "
        f"Total wall time {t_total / 60:.1f} min.\n\n"
        f"| held-out accuracy ({cfg.eval_problems} problems) | base | after GRPO |\n|---|---|---|\n"
        f"| sampled, temperature 1 | {before['test_acc_sampled']:.3f} | {after['test_acc_sampled']:.3f} |\n"
        f"| greedy | {before['test_acc_greedy']:.3f} | {after['test_acc_greedy']:.3f} |\n\n"
        "![reward, response length and held-out accuracy](grpo/grpo.png)\n"
    )
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return {"before": before, "after": after, "minutes": t_total / 60}
