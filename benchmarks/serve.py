"""Serving benchmark: `nanoseek serve` on the bench preset under 1, 8 and 32 concurrent clients.

    python3 benchmarks/serve.py [--concurrency 1 8 32] [--prompt-len 64] [--max-tokens 64] [--threads 2]

Starts the real server in a subprocess (random bench-preset weights, a byte-level BPE tokenizer of
the preset's 8192 tokens trained here on Python's standard library, so detokenization is on the
path), then for each concurrency C runs C client threads that send streaming /v1/completions
requests back to back (prompt: `--prompt-len` token ids; output: exactly `--max-tokens` tokens,
ignore_eos) until `max(8, rounds x C)` requests are done. Reports output tokens/s over the level's wall
time, request latency p50/p99, time to first token p50/p99 and inter-token latency p50, plus the
machine's load average before and after each level (the machine is shared: compare ratios).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def train_tokenizer(out: Path, vocab: int) -> None:
    from nanoseek.data.sources import stdlib_files
    from nanoseek.tokenizer import train_tokenizer as train

    texts = [p.read_text(errors="ignore") for p in itertools.islice(stdlib_files(), 300)]
    train(texts, vocab_size=vocab, show_progress=False).save(out)


def start_server(args, tok_dir: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", args.model, "--tokenizer", str(tok_dir), "--port", "0",
           "--threads", str(args.threads), "--max-batch", str(max(args.concurrency)), "--log-level", "warning",
           "--max-queue", "256", "--seed", "0"]
    if args.speculative:
        cmd += ["--speculative"]
    if args.compile:
        cmd += ["--compile"]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    print(line.strip(), file=sys.stderr)
    url = m.group(1)
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=5).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server not healthy")


def one_request(url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"latency": end - t0, "ttft": (times[0] - t0) if times else end - t0, "tokens": tokens,
            "itl": statistics.mean(gaps) if gaps else 0.0}


def engine_baseline(args, vocab: int) -> dict[int, float]:
    """Engine.generate on the same model and shapes, in this process (the ceiling without HTTP)."""
    import torch

    from nanoseek.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(args.model, seed=0, compile=args.compile, device=args.device, dtype=args.dtype)
    rng = random.Random(0)
    out = {}
    for c in args.concurrency:
        prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(c)]
        engine.generate(prompts, max_tokens=16 if args.compile else 4, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        engine.generate(prompts, max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        out[c] = c * args.max_tokens / (time.perf_counter() - t0)
        print(f"engine batch {c}: {out[c]:.1f} tok/s", file=sys.stderr)
    del engine
    return out


def level(url: str, c: int, n_requests: int, prompt_len: int, max_tokens: int, vocab: int) -> dict:
    rng = random.Random(c)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(n_requests)]
    todo = iter(range(n_requests))
    lock = threading.Lock()
    results, errors = [], []

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                res = one_request(url, prompts[i], max_tokens)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results)
    return {"concurrency": c, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "output_tokens": toks, "tokens_per_s": toks / wall,
            "latency_p50_s": pct([r["latency"] for r in results], 50),
            "latency_p99_s": pct([r["latency"] for r in results], 99),
            "ttft_p50_s": pct([r["ttft"] for r in results], 50), "ttft_p99_s": pct([r["ttft"] for r in results], 99),
            "itl_p50_ms": 1e3 * pct([r["itl"] for r in results], 50),
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="server torch threads")
    p.add_argument("--rounds", type=int, default=3, help="requests per client at each level (at least 8 in all)")
    p.add_argument("--speculative", action="store_true")
    p.add_argument("--device", default=None, help="the server's device (default cpu; cuda decodes with CUDA graphs)")
    p.add_argument("--dtype", default=None, help="the server's dtype (default the model's)")
    p.add_argument("--compile", action="store_true", help="serve with --compile (warm-up compiles the step shapes)")
    p.add_argument("--engine-baseline", action="store_true",
                   help="first run Engine.generate with batch = each concurrency, in this process (no HTTP)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    from nanoseek import preset

    vocab = preset(args.model).vocab_size if not os.path.isdir(args.model) else 8192
    baseline = engine_baseline(args, vocab) if args.engine_baseline else {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        train_tokenizer(Path(tmp), vocab)
        print(f"tokenizer: {vocab} tokens in {time.time() - t0:.1f} s", file=sys.stderr)
        proc, url = start_server(args, Path(tmp))
        try:
            for c in ((1, 2, 8) if args.compile else (2,)):  # warm-up (with --compile: every step shape)
                level(url, c, max(4, c), args.prompt_len, 8, vocab)
            rows = []
            for c in args.concurrency:
                n = max(8, args.rounds * c)
                row = level(url, c, n, args.prompt_len, args.max_tokens, vocab)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            metrics = requests.get(url + "/metrics").text
        finally:
            proc.terminate()
            proc.wait(10)
    base = rows[0]["tokens_per_s"]
    print(f"\nnanoseek serve {args.model}{' --compile' if args.compile else ''} ({args.threads} threads; prompt {args.prompt_len} tokens, output "
          f"{args.max_tokens} tokens, streaming /v1/completions; cpu_count {os.cpu_count()})\n")
    eng = " engine batch=C tok/s (x batch 1) |" if baseline else ""
    print("| concurrency | requests | output tok/s | x c=1 | latency p50 / p99 (s) | TTFT p50 / p99 (s) | ITL p50 (ms) "
          f"| load avg before / after |{eng}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if baseline else ""))
    for r in rows:
        c = r["concurrency"]
        ref = (f" {baseline[c]:.1f} ({baseline[c] / baseline[args.concurrency[0]]:.2f}) |" if baseline else "")
        print(f"| {c} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} | "
              f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
              f"{r['itl_p50_ms']:.1f} | {r['load_before']:.1f} / {r['load_after']:.1f} |{ref}")
    if any(r["requests"] < 100 for r in rows):
        print("\n(p99 of fewer than 100 requests is their maximum; raise --rounds for a real tail)")
    mean_batch = re.search(r"^nanoseek_decode_rows_total (\S+)", metrics, re.M)
    steps = re.search(r"^nanoseek_decode_steps_total (\S+)", metrics, re.M)
    if mean_batch and steps:
        print(f"\nmean decode batch over the run: {float(mean_batch.group(1)) / max(1.0, float(steps.group(1))):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
