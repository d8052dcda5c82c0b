"""`nanoseek train` and `nanoseek plot`. Every TrainConfig field is a flag (`--seq-len`, `--lr`, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import ConfigError
from .config import TrainConfig

ALIASES = {"out_dir": ["--out"], "max_steps": ["--steps"]}
# `nanoseek sft` starts from these instead of pretraining's defaults (fine-tuning: fewer steps, a
# lower rate, no MTP loss)
SFT_DEFAULTS = {"max_steps": 200, "lr": 3e-4, "warmup_steps": 10, "mtp_lambda": 0.0, "mtp_lambda_late": 0.0}


def _add_config_flags(p: argparse.ArgumentParser, skip: frozenset[str] = frozenset(),
                      shown: dict | None = None) -> None:
    """One flag per TrainConfig field; `shown` replaces the default named in a flag's help."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ALIASES.get(f.name, [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        said = (shown or {}).get(f.name, default)
        if isinstance(default, bool):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {said})")
        elif isinstance(default, list):
            p.add_argument(*flags, dest=f.name, nargs="*", default=None, metavar="PATH",
                           help="files, directories or globs (.txt .jsonl .parquet .py .md); default: Python's stdlib")
        else:
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            p.add_argument(*flags, dest=f.name, type=kind, default=None, help=f"(default: {said})")


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    if args.config:
        base = TrainConfig.load(args.config).to_dict()
    elif args.resume and (Path(args.out_dir or TrainConfig.out_dir) / "train_config.json").exists():
        # runs saved before `add_bos` existed trained without bos: resume them as they were
        base = TrainConfig.load(Path(args.out_dir or TrainConfig.out_dir) / "train_config.json",
                                missing={"add_bos": False}).to_dict()
    else:
        base = TrainConfig().to_dict()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    cfg = TrainConfig.from_dict(base)
    trainer = Trainer(cfg, resume=args.resume, show_progress=not args.quiet)
    print(f"nanoseek train: {trainer.model.num_parameters(include_mtp=False) / 1e6:.2f}M parameters "
          f"(+{(trainer.model.num_parameters() - trainer.model.num_parameters(include_mtp=False)) / 1e6:.2f}M MTP), "
          f"{trainer.source.n_train_tokens / 1e6:.1f}M training tokens, {trainer.precision} on {trainer.device}, "
          f"run dir {trainer.run_dir}", file=sys.stderr)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if result:
        print(f"final validation loss {result['val_loss']:.4f}"
              + (f", {result['val_bpb']:.3f} bits/byte" if "val_bpb" in result else ""))
    if cfg.sample_tokens > 0:
        for prompt in args.sample_prompt or ["def ", "import "]:
            print("-" * 60)
            print(trainer.sample(prompt))
        print("-" * 60)
    print(f"model saved to {trainer.run_dir} (Hugging Face layout); plots: {trainer.run_dir}/loss.png, "
          f"{trainer.run_dir}/expert_load.png")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    args.init_from = args.base_model
    if args.model is None:
        args.model = args.base_model
    if args.out_dir is None:  # a sibling of the base model; "." and ".." have no name until resolved
        base = Path(args.base_model)
        if base.name in ("", ".."):
            base = base.resolve()
        if not base.name:
            raise ConfigError(f"cannot name an output directory after {args.base_model!r}; pass --out")
        args.out_dir = str(base.with_name(base.name + "-sft"))
    for key, value in SFT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return _cmd_train(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a train_config.json to start from (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sample-prompt", action="append", help="prompt(s) to sample from at the end")


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a DeepSeek-V3 model (default: `small` on Python's stdlib source)")
    _add_config_flags(p)
    _add_run_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens only)")
    p.add_argument("base_model", help="model directory to start from (weights, config, tokenizer)")
    p.add_argument("--data", dest="sft_data", required=True, metavar="JSONL",
                   help='chat data: one {"messages": [{"role", "content"}, ...]} per line')
    # the base model's own tokenizer is used, so no --tokenizer
    _add_config_flags(p, skip=frozenset({"data", "sft_data", "init_from", "tokenizer"}),
                      shown={**SFT_DEFAULTS, "model": "the base model's config", "out_dir": "BASE_MODEL-sft"})
    _add_run_flags(p)
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("plot", help="redraw a run's PNG plots (loss curves, expert load) from metrics.jsonl")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=_cmd_plot)
