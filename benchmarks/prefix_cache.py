"""Prefix caching: time to first token with and without it, in one run (the scheduler the server
uses, the `bench` preset, random weights, 2 threads).

    python3 benchmarks/prefix_cache.py                    # system prompt 1024 tokens, 6 rounds
    python3 benchmarks/prefix_cache.py --system 2048 --rounds 4

Two workloads, each run by a scheduler with the cache and one without, in alternating rounds:
- shared system prompt: 8 requests one after another, each the same system prompt plus its own
  32-token question, 16 new tokens;
- a chat: 4 turns, each turn's prompt the previous prompt and answer plus a 64-token message.
The report gives the median time to first token (the prefill of the request, the part the cache
removes) per request, on and off, and the ratio; greedy outputs must be equal (checked).

A third line times what `n > 1` shares without any cache: one prefill step of 8 joiners with the
same 512-token prompt (computed once, rows copied) against 8 prompts that differ in their last
token (best of `--rounds`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.engine import Engine
from nanoseek.engine.scheduler import Scheduler


def _first_token(sched: Scheduler, sid: str, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """(seconds to the first token, all tokens) of one request run alone to the end."""
    t0 = time.perf_counter()
    sched.add(sid, prompt, max_tokens=new, temperature=0, ignore_eos=True)
    ttft, out = None, []
    while sched.has_work:
        for u in sched.step():
            if u.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            out += u.token_ids
    return ttft, out


def shared_system(sched: Scheduler, system: list[int], rng: torch.Generator, tag: str) -> tuple[list[float], list]:
    times, outs = [], []
    for i in range(8):
        q = torch.randint(0, 8192, (32,), generator=rng).tolist()
        t, out = _first_token(sched, f"{tag}-{i}", system + q, 16)
        times.append(t)
        outs.append(out)
    return times, outs


def chat(sched: Scheduler, system: list[int], rng: torch.Generator, tag: str) -> tuple[list[float], list]:
    prompt, times, outs = list(system), [], []
    for turn in range(4):
        prompt += torch.randint(0, 8192, (64,), generator=rng).tolist()
        t, out = _first_token(sched, f"{tag}-{turn}", prompt, 16)
        times.append(t)
        outs.append(out)
        prompt += out
    return times, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", type=int, default=1024, help="system prompt tokens (default 1024)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine("bench", seed=0)
    engine.max_context = max(engine.max_context, args.system + 4 * 80 + 64)
    print(f"bench preset, fp32, {args.threads} threads, system prompt {args.system} tokens, {args.rounds} rounds")
    for name, work in (("shared system prompt", shared_system), ("chat, 4 turns", chat)):
        ttft: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            system = torch.randint(0, 8192, (args.system,), generator=torch.Generator().manual_seed(r)).tolist()
            outs = {}
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                sched = Scheduler(engine, max_batch=8, prefix_cache_bytes=(1 << 28) if mode == "on" else None)
                times, outs[mode] = work(sched, system, torch.Generator().manual_seed(100 + r), mode)
                ttft[mode] += times[1:]  # (the first request of each workload fills the cache)
            assert outs["on"] == outs["off"], "greedy outputs differ with the prefix cache"
        on, off = statistics.median(ttft["on"]), statistics.median(ttft["off"])
        print(f"{name:>22}: time to first token, median of {len(ttft['on'])} requests: "
              f"without {off * 1e3:7.1f} ms, with prefix caching {on * 1e3:7.1f} ms: {off / on:5.2f}x faster")
    shared_prefill(engine, args.rounds)


def shared_prefill(engine: Engine, rounds: int) -> None:
    base = torch.randint(0, 8192, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    workloads = {"same": [base] * 8, "different": [base[:-1] + [i] for i in range(8)]}
    best = {name: float("inf") for name in workloads}
    for _ in range(rounds):
        for name, prompts in workloads.items():
            sched = Scheduler(engine, max_batch=8)
            for i, p in enumerate(prompts):
                sched.add(i, p, max_tokens=1, temperature=0)
            t0 = time.perf_counter()
            sched.step()  # the prefill of all eight
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{'n = 8, one prompt':>22}: prefill step of 8 joiners, 512 tokens: 8 different prompts "
          f"{best['different'] * 1e3:7.1f} ms, one prompt 8 times {best['same'] * 1e3:7.1f} ms: "
          f"{best['different'] / best['same']:5.2f}x faster")


if __name__ == "__main__":
    main()
