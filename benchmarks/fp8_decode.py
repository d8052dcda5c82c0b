"""Decode speed with FP8 weights kept in memory (`keep_fp8`), against the same model dequantized.

    python3 benchmarks/fp8_decode.py                 # bench preset, batch 1 and 8, 3 rounds
    python3 benchmarks/fp8_decode.py --rounds 1 --batches 1

The model is the `bench` preset with random weights (std 0.02), quantized to FP8 128x128 blocks
the way `nanoseek convert` / `save_model(fp8=True)` store them. Two models with the same FP8
weights run side by side in one process: "dequantized" (the default load: fp32 weights in
memory) and "fp8 kept" (1 byte a weight plus a float32 scale per block, what
`load_model(path, keep_fp8=True)` gives). Each runs in the eager engine and in the compiled one
(`Engine(compile=True)`), where the FP8 bytes are converted inside the fused matrix-vector
reductions. Rounds are interleaved and each configuration keeps its best decode rate (tok/s of
the generated tokens after the first; the machines are shared and noisy: compare the ratios).
Greedy tokens must agree between the two models (the same weights, the same fp32 arithmetic).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def build(directory: Path) -> dict:
    """The bench preset with random weights written as an FP8 checkpoint, loaded both ways."""
    import nanoseek
    from nanoseek.checkpoint import save_model

    model = nanoseek.load_model("bench")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
    save_model(model, directory, fp8=True)
    return {"dequantized": nanoseek.load_model(directory, dtype="fp32"),
            "fp8 kept": nanoseek.load_model(directory, dtype="fp32", keep_fp8=True)}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--eager-new", type=int, default=8, help="new tokens for the (slow) eager FP8 case")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nanoseek.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
    mem = {k: weight_bytes(m) for k, m in models.items()}
    engines = {(name, comp): Engine(m, tokenizer=None, compile=comp) for name, m in models.items() for comp in (False, True)}
    g = torch.Generator().manual_seed(1)
    best: dict = {}
    tokens: dict = {}
    for B in args.batches:
        prompts = torch.randint(0, 8192, (B, args.prompt), generator=g).tolist()
        for key, eng in engines.items():  # warm-up: compiles each step shape
            eng.generate(prompts, max_tokens=4, temperature=0, ignore_eos=True)
        for r in range(args.rounds):
            for key, eng in engines.items():
                new = args.eager_new if key == ("fp8 kept", False) else args.new
                out = eng.generate(prompts, max_tokens=new, temperature=0, ignore_eos=True)
                st = eng.last_stats
                rate = st.decode_tok_s
                best[(B, *key)] = max(best.get((B, *key), 0.0), rate)
                tokens[(B, *key)] = [o.token_ids[:args.eager_new] for o in out]
                print(f"batch {B} round {r} {key[0]:>11} {'compiled' if key[1] else 'eager':>8}: {rate:8.1f} tok/s",
                      flush=True)
    print(f"\nweights in memory: dequantized {mem['dequantized'] / 2**20:.1f} MiB, "
          f"fp8 kept {mem['fp8 kept'] / 2**20:.1f} MiB ({mem['fp8 kept'] / mem['dequantized']:.2f}x)")
    print(f"bench preset, fp32 compute, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens "
          f"({args.eager_new} for eager fp8), best of {args.rounds} rounds\n")
    print("| batch | engine | dequantized tok/s | fp8 kept tok/s | fp8 / dequantized | greedy tokens agree |")
    print("|---|---|---|---|---|---|")
    ok = True
    for B in args.batches:
        for comp in (False, True):
            d, f = best[(B, "dequantized", comp)], best[(B, "fp8 kept", comp)]
            same = tokens[(B, "dequantized", comp)] == tokens[(B, "fp8 kept", comp)]
            ok &= same
            print(f"| {B} | {'compiled' if comp else 'eager'} | {d:.1f} | {f:.1f} | {f / d:.2f}x | {same} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
