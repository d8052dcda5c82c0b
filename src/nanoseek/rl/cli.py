"""`nanoseek grpo MODEL --task ...` and `nanoseek recipe r1-zero`. Every GRPOConfig field is a flag."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.config import read_options
from .grpo import GRPOConfig


def _add_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(GRPOConfig):
        if f.name == "model":
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + (["--out"] if f.name == "out_dir" else [])
        default = f.default
        if isinstance(default, bool):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {default})")
        else:
            kind = float if isinstance(default, float) or default is None else int if isinstance(default, int) else str
            p.add_argument(*flags, dest=f.name, type=kind, default=None, help=f"(default: {default})")


def _cmd_grpo(args: argparse.Namespace) -> int:
    from .grpo import GRPOTrainer, config_from_dict

    base = dataclasses.asdict(GRPOConfig())
    saved = Path(args.out_dir or GRPOConfig.out_dir) / "grpo_config.json"
    if args.resume and saved.exists():  # as `nanoseek train --resume`: the run's own settings, then the flags
        base.update(read_options(saved, "grpo_config.json", "GRPO options"))
    base["model"] = args.model
    for f in dataclasses.fields(GRPOConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "model":
            base[f.name] = v
    trainer = GRPOTrainer(config_from_dict(base), resume=args.resume, show_progress=not args.quiet)
    try:
        history = trainer.fit()
    except KeyboardInterrupt:
        return 130
    before, after = history.get("before"), history.get("after")
    if before and after:
        print(f"held-out accuracy, sampled (T=1): {before['test_acc_sampled']:.3f} -> {after['test_acc_sampled']:.3f}; "
              f"greedy: {before['test_acc_greedy']:.3f} -> {after['test_acc_greedy']:.3f}")
    print(f"policy saved to {trainer.run_dir}; plot: {trainer.run_dir}/grpo.png")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from .recipe import run_r1_zero

    try:
        result = run_r1_zero(args.out, quick=args.quick, show_progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue from {args.out}")
        return 130
    print(result["report"])
    return 0


def register(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO with rule-checked rewards (R1-Zero style) on a model directory")
    p.add_argument("model", help="model directory to start from (weights, config, tokenizer)")
    _add_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_grpo)

    p = sub.add_parser("recipe", help="documented end-to-end recipes")
    p.add_argument("name", choices=["r1-zero"], help="r1-zero: base model on generated arithmetic, then GRPO")
    p.add_argument("--out", default="runs/r1-zero", help="directory for the base model, the GRPO run and the report")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke version (for CI), not the full recipe")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_recipe)
