"""Prefills of ever-new lengths on the CPU fast path: padded row counts (`fastpath.rows_bucket`)
against exact ones, for time and for the process's memory.

    python3 benchmarks/prefill_rows.py                 # bench preset, 4 alternating rounds + memory
    python3 benchmarks/prefill_rows.py --rounds 2 --lengths 40 --preset tiny

oneDNN builds and caches a primitive for every input row count it meets. A server meets a new
count with nearly every prompt length (and every expert's token count), so with exact counts each
prefill pays for new primitives and keeps their memory. Timing: each round runs the same number of
prompts of lengths never seen before in each mode, modes alternating. Memory: one fresh process per
mode runs `--lengths` prompts of distinct lengths and reports its RSS growth.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from nanoseek.engine import fastpath

BUCKET = fastpath.rows_bucket  # (the padded row counts; the exact mode swaps in the identity)
BASE_LENGTHS = [33, 65, 100, 129, 200, 257, 300, 513]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _engine(preset: str, threads: int):
    from nanoseek.engine import Engine

    torch.set_num_threads(threads)
    return Engine(preset, seed=0)


def _set_mode(mode: str) -> None:
    fastpath.rows_bucket = BUCKET if mode == "bucket" else (lambda m: m)


def timing(args) -> dict[str, list[float]]:
    eng = _engine(args.preset, args.threads)
    gen = torch.Generator().manual_seed(0)
    vocab = eng.config.vocab_size
    times: dict[str, list[float]] = {"bucket": [], "exact": []}
    for rnd in range(args.rounds):
        for i, mode in enumerate(("bucket", "exact") if rnd % 2 == 0 else ("exact", "bucket")):
            _set_mode(mode)
            total = 0.0
            for L in BASE_LENGTHS:
                n = L + 2 * rnd + i  # a length neither mode has met
                prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
                t0 = time.perf_counter()
                eng.generate(prompt, max_tokens=1, temperature=0)
                total += time.perf_counter() - t0
            times[mode].append(total)
            print(f"round {rnd} {mode:6s} {total:.3f} s for {len(BASE_LENGTHS)} prefills", flush=True)
    _set_mode("bucket")
    return times


def memory(args, mode: str) -> tuple[float, float]:
    """(RSS before, after) of a fresh process running --lengths prompts of distinct lengths."""
    cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--threads", str(args.threads),
           "--lengths", str(args.lengths)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    before, after = out.split()[-2:]
    return float(before), float(after)


def child(args) -> None:
    eng = _engine(args.preset, args.threads)
    _set_mode(args.child)
    eng.generate([5] * 8, max_tokens=1, temperature=0)  # the engine's first-call work out of the way
    before = _rss_mib()
    for n in range(17, 17 + args.lengths):
        eng.generate([5] * n, max_tokens=1, temperature=0)
    print(f"{before:.0f} {_rss_mib():.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--rounds", type=int, default=4, help="at most 14 (lengths stay new)")
    p.add_argument("--lengths", type=int, default=200, help="distinct prompt lengths in the memory run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["bucket", "exact"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 1 <= args.rounds <= 14 or args.lengths < 1 or args.threads < 1:
        p.error("--rounds must be in [1, 14]; --lengths and --threads >= 1")
    if args.child:
        return child(args)
    times = timing(args)
    mem = {mode: memory(args, mode) for mode in ("bucket", "exact")}
    print(f"\n{args.preset}, {args.threads} threads, {args.rounds} rounds of {len(BASE_LENGTHS)} new prompt lengths "
          f"({min(BASE_LENGTHS)}-{max(BASE_LENGTHS)} tokens), one new token each:")
    print("| row counts | prefill time, median round | RSS before -> after "
          f"{args.lengths} prompt lengths |")
    print("|---|---|---|")
    for mode in ("bucket", "exact"):
        b, a = mem[mode]
        print(f"| {mode} | {statistics.median(times[mode]):.3f} s | {b:.0f} -> {a:.0f} MiB (+{a - b:.0f}) |")
    print(f"exact / padded time: {statistics.median(times['exact']) / statistics.median(times['bucket']):.2f}x")


if __name__ == "__main__":
    main()
