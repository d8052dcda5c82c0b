"""When is a prefix-cache hit worth using? A prompt's prefill after a hit of each size, against the
whole prompt computed cold, and what the scheduler's rule (`Scheduler._usable_hit`) picks.

    python3 benchmarks/prefix_hit_cost.py                       # bench preset, 256 / 1,024 / 3,000 tokens
    python3 benchmarks/prefix_hit_cost.py --preset tiny --lengths 128 --rounds 1
    python3 benchmarks/prefix_hit_cost.py --device cuda --dtype bf16 --rounds 3

The rest of a prompt after a hit runs on the absorbed attention path, whose work grows as rest x
length; a cold prefill runs fused causal attention and costs mostly its linear layers. Each case
stores a stem of the given share, then times one-token generations of stem + new tokens with the
hit forced (the rule switched off) and cold (the cache on but empty: what the rule's "no" costs, the
prompt's blocks stored as a server with --enable-prefix-caching stores them), and, for reference,
with no cache at all; best of `--rounds`.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nanoseek.config import ConfigError
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingError, SamplingParams
from nanoseek.engine.scheduler import Scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 3000])
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="float32 (default), bf16, ...")
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 1 or min(args.lengths) < 2 or not all(0 < x < 1 for x in args.shares):
        p.error("--rounds and --threads must be >= 1, --lengths >= 2, --shares between 0 and 1")
    torch.set_num_threads(args.threads)
    try:
        eng = Engine(args.preset, seed=0, tokenizer=None, device=args.device, dtype=args.dtype)
    except (SamplingError, ConfigError, FileNotFoundError) as e:  # an unknown or missing device, dtype or preset
        p.error(str(e))
    vocab = eng.config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    names = iter(range(1 << 30))

    def timed(sched: Scheduler, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        sched.add(next(names), prompt, params)
        sched.run_until_done()
        return time.perf_counter() - t0

    where = f"{eng.device}, {str(eng.dtype).removeprefix('torch.')}"
    print(f"{args.preset} ({where}), {args.threads} threads, best of {args.rounds}; seconds for a one-token generation")
    print("| prompt | cached | hit forced | cold | forced / cold | the rule uses the hit | no cache |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for share in args.shares:
            best = {"forced": float("inf"), "cold": float("inf"), "off": float("inf")}
            used = None
            for _ in range(args.rounds):
                stem = [rng.randrange(3, vocab) for _ in range(int(length * share))]
                prompt = stem + [rng.randrange(3, vocab) for _ in range(length - len(stem))]
                forced = Scheduler(eng, max_batch=2, prefix_cache_bytes=1 << 30)
                timed(forced, stem + [3])  # store the stem
                used = bool(forced._usable_hit(prompt))
                forced._absorbed_cost = -1.0 / length  # (rest x 0 < length: any hit is used)
                best["forced"] = min(best["forced"], timed(forced, prompt))
                best["cold"] = min(best["cold"], timed(Scheduler(eng, max_batch=2, prefix_cache_bytes=1 << 30), prompt))
                best["off"] = min(best["off"], timed(Scheduler(eng, max_batch=2), prompt))
            ratio = best["forced"] / best["cold"]
            print(f"| {length:,} | {share:.0%} | {best['forced']:.3f} | {best['cold']:.3f} | {ratio:.2f} | "
                  f"{'yes' if used else 'no'}{'' if used == (ratio < 1) else ' (!)'} | {best['off']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
