"""Prefill only, many interleaved rounds: nanoseek versus transformers on the `bench` checkpoint.

    python3 benchmarks/prefill.py                  # fp32 and bf16, batch 1, 12 rounds
    python3 benchmarks/prefill.py --batch 8 --rounds 5 --dtypes fp32

`decode.py` times a prefill once or twice per engine, and on a shared 2-core machine that moves the
ratio by +-15%. Here each round times one prompt-plus-one-token `generate` call per engine, in
turn, and the report gives the best-vs-best ratio and the median of the per-round ratios. The
third column is nanoseek with its two prefill-specific CPU paths switched off (experts paired into
one `bmm`, attention in two query halves; docs/engine.md), so each run also measures what they add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402  (the same engine wrappers and checkpoint as the decode benchmark)

from nanoseek.model import attention  # noqa: E402
from nanoseek.model.moe import Experts  # noqa: E402


_DEFAULTS = (Experts.PAIR_MIN_ROWS, attention.HALVED_ATTENTION_TOKENS)


def _paths(on: bool) -> None:
    Experts.PAIR_MIN_ROWS = _DEFAULTS[0] if on else 1 << 60
    attention.HALVED_ATTENTION_TOKENS = _DEFAULTS[1] if on else (1, 0)


def run(dtype: torch.dtype, batch: int, prompt: int, rounds: int, ckpt: Path) -> dict:
    hf, ns = D.HF(ckpt, dtype), D.NS(ckpt, dtype)
    ids = torch.randint(0, 8192, (batch, prompt), generator=torch.Generator().manual_seed(0))

    def nanoseek(on: bool):
        _paths(on)
        ns.engine.generate(ids.tolist(), max_tokens=1, temperature=0, ignore_eos=True)

    def transformers():
        with torch.inference_mode():
            hf.model.generate(ids, max_new_tokens=1, do_sample=False)

    calls = {"nanoseek": lambda: nanoseek(True), "transformers": transformers, "without": lambda: nanoseek(False)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(2):
        for f in calls.values():
            f()
    for _ in range(rounds):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    _paths(True)
    hf_t = times["transformers"]
    out = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "prompt": prompt, "rounds": rounds}
    for name in ("nanoseek", "without"):
        out[name] = {"best_ms": min(times[name]) * 1e3, "median_ms": statistics.median(times[name]) * 1e3,
                     "ratio_best": min(hf_t) / min(times[name]),
                     "ratio_median": statistics.median(h / t for h, t in zip(hf_t, times[name]))}
    out["transformers"] = {"best_ms": min(hf_t) * 1e3, "median_ms": statistics.median(hf_t) * 1e3}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/nanoseek-bench-hf"))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if unknown := [d for d in args.dtypes.split(",") if d not in dtypes]:
        ap.error(f"--dtypes takes fp32 and/or bf16, comma-separated; got {', '.join(unknown)}")
    if args.batch < 1 or args.rounds < 1 or args.prompt < 2:
        ap.error("--batch and --rounds must be >= 1 and --prompt >= 2")
    torch.set_num_threads(args.threads)
    ckpt = D.make_checkpoint(args.ckpt)
    print("| dtype | batch | nanoseek ms (best / median) | without pairs and halves | transformers "
          "| ratio best (median) | ratio without |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        r = run(dtypes[name], args.batch, args.prompt, args.rounds, ckpt)
        n, w, h = r["nanoseek"], r["without"], r["transformers"]
        print(f"| {name} | {args.batch} | {n['best_ms']:.1f} / {n['median_ms']:.1f} | {w['best_ms']:.1f} / "
              f"{w['median_ms']:.1f} | {h['best_ms']:.1f} / {h['median_ms']:.1f} | **{n['ratio_best']:.2f}x** "
              f"({n['ratio_median']:.2f}x) | {w['ratio_best']:.2f}x ({w['ratio_median']:.2f}x) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
