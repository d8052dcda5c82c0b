"""The `nanoseek` command line: one subcommand per job, each a thin shell over a library function."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add their own subcommands: each defines `register(subparsers) -> None` and sets
# `func` on its parsers. Keeps one writer per feature and this file small.
COMMAND_MODULES = [
    "nanoseek.train.cli",
    "nanoseek.engine.cli",
    "nanoseek.server.cli",
    "nanoseek.rl.cli",
]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .summary import run_inspect

    return run_inspect(args.model, as_json=args.json)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert

    return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 models: inspect, convert, train, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="parameters, KV-cache bytes and FLOPs of a preset or checkpoint directory")
    s.add_argument("model", help="preset name (tiny, bench, deepseek-v3, ...) or model directory")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("convert", help="convert a checkpoint: to FP8 (block-quantized), to BF16/FP32")
    s.add_argument("src", help="source model directory (Hugging Face layout)")
    s.add_argument("dst", help="destination directory (created; must not already hold a model)")
    s.add_argument("--to", required=True, choices=["fp8", "bf16", "fp16", "fp32"], help="target weight format")
    s.add_argument("--shard-size", default="5GB", help="max size per output shard, e.g. 5GB, 500MB")
    s.add_argument("--overwrite", action="store_true", help="replace an existing model in DST")
    s.set_defaults(func=_cmd_convert)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # that feature is not built yet
                continue
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .engine.sampling import SamplingError
    from .tokenizer import TokenizerError

    # The library's own user-facing errors, plus OS errors about a path the user gave. Anything else
    # (ValueError, RuntimeError, ...) is a bug and keeps its traceback.
    user_errors = (ConfigError, CheckpointError, DataError, TokenizerError, SamplingError,
                   FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    try:
        return int(args.func(args) or 0)
    except user_errors as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
