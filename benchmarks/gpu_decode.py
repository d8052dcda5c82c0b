"""GPU decode: nanoseek with CUDA graphs, nanoseek without, and transformers' `generate`, in one run.

    python3 benchmarks/gpu_decode.py [--mtp RUN_DIR] [--dtype bf16] [--batches 1 8 32] [--json OUT]

Needs a CUDA GPU (exits with a message otherwise). The model is the `bench` preset built with random
weights by transformers and written with `save_pretrained` (as benchmarks/decode.py does); prompt 512
tokens, 128 new tokens forced (no early stop). Decode tok/s = batch x (N - 1) / (T(N) - T(1)), where
T(n) is the best wall time over the rounds of a generate call making n tokens, the same for every
engine. With --mtp, MTP speculation (k = 0, 1, 2, greedy, batch 1) on a trained run directory, with
CUDA graphs: speed, acceptance, tokens per forward, and whether the output equals plain greedy.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import make_checkpoint  # noqa: E402

from nanoseek import Engine  # noqa: E402
from nanoseek.checkpoint import parse_dtype  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_rate(run, batch: int, new: int, rounds: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s-equivalent time T(1)) for `run(n)` making n tokens per row."""
    run(new)  # warm-up: records graphs, loads kernels
    t1 = min(timed(lambda: run(1)) for _ in range(rounds))
    tn = min(timed(lambda: run(new)) for _ in range(rounds))
    return batch * (new - 1) / (tn - t1), t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mtp", type=Path, default=None, help="a trained run directory for the MTP case")
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "nanoseek-bench-hf")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_decode.py needs a CUDA GPU; none here.")
        return 0
    import transformers

    dtype = parse_dtype(args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens", flush=True)
    ckpt = make_checkpoint(args.ckpt)
    graphed = Engine(ckpt, device="cuda", dtype=dtype, tokenizer=None)
    plain = Engine(ckpt, device="cuda", dtype=dtype, tokenizer=None, cuda_graphs=False)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
    report = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "cases": []}
    for B in args.batches:
        ids = torch.randint(2, graphed.config.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        prompts = ids.tolist()
        cuda_ids = ids.cuda()

        def ns(engine):
            return lambda n: engine.generate(prompts, max_tokens=n, temperature=0, ignore_eos=True)

        def hf_run(n):
            with torch.inference_mode():
                hf.generate(cuda_ids, attention_mask=torch.ones_like(cuda_ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

        row = {"batch": B}
        for name, run in (("graphs", ns(graphed)), ("plain", ns(plain)), ("transformers", hf_run)):
            row[name], row[name + "_t1"] = decode_rate(run, B, args.new, args.rounds)
        a = [r.token_ids for r in graphed.generate(prompts, max_tokens=32, temperature=0, ignore_eos=True)]
        b = [r.token_ids for r in plain.generate(prompts, max_tokens=32, temperature=0, ignore_eos=True)]
        same = a == b
        row["identical_32"] = same
        row["rows_identical_32"] = sum(x == y for x, y in zip(a, b))
        print(f"batch {B:>2}: decode tok/s  CUDA graphs {row['graphs']:8.1f} | plain {row['plain']:7.1f} | "
              f"transformers {row['transformers']:7.1f}  ->  graphs/plain {row['graphs'] / row['plain']:.2f}x, "
              f"graphs/transformers {row['graphs'] / row['transformers']:.2f}x; prefill+1 token "
              f"{row['graphs_t1'] * 1e3:.1f} vs {row['transformers_t1'] * 1e3:.1f} ms; "
              f"greedy rows equal to plain (32 tokens): {row['rows_identical_32']}/{B}", flush=True)
        report["cases"].append(row)
    print(f"graphs recorded: {graphed.graphs.recorded}, failed: {graphed.graphs.failed}")
    report["fp32_identical"] = fp32_identity(ckpt, args)
    if args.mtp is not None:
        report["mtp"] = mtp_case(args, dtype)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def fp32_identity(ckpt: Path, args) -> bool:
    """In fp32 the graphed step (static experts, fixed attention span) must give plain greedy's tokens:
    bf16 rounds the two paths' different summation orders apart and a random model has near-ties."""
    a, b = (Engine(ckpt, device="cuda", dtype=torch.float32, tokenizer=None, cuda_graphs=g) for g in (True, False))
    prompts = torch.randint(2, a.config.vocab_size, (8, args.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(max_tokens=64, temperature=0, ignore_eos=True)
    same = [r.token_ids for r in a.generate(prompts, **kw)] == [r.token_ids for r in b.generate(prompts, **kw)]
    print(f"fp32, batch 8, 64 tokens: greedy with CUDA graphs == plain greedy: {same}", flush=True)
    return same


def mtp_case(args, dtype: torch.dtype) -> dict:
    eng = Engine(args.mtp, device="cuda", dtype=dtype)
    text = inspect.getsource(textwrap)
    ids = eng.encode(text)[-args.prompt:]
    out = {}
    for k in (0, 1, 2):
        kw = dict(max_tokens=args.new, temperature=0, ignore_eos=True, speculative=k)
        eng.generate([ids], **kw)  # warm-up
        best = None
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            toks = eng.generate([ids], **kw)[0].token_ids
            st = eng.last_stats
            if best is None or st.decode_s < best["decode_s"]:
                best = {"decode_tok_s": st.decode_tok_s, "decode_s": st.decode_s, "tokens": toks,
                        "acceptance_rate": st.acceptance_rate, "tokens_per_forward": st.tokens_per_forward}
        out[k] = best
    print(f"MTP speculation on {args.mtp} ({args.dtype}, batch 1, CUDA graphs, prompt {len(ids)} tokens of "
          f"textwrap.py, {args.new} new, greedy):")
    for k, r in out.items():
        r["speedup"] = r["decode_tok_s"] / out[0]["decode_tok_s"]
        r["identical"] = r.pop("tokens") == out[0].get("tokens", None) if k else True
        print(f"  k={k}: decode {r['decode_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), acceptance {r['acceptance_rate']:.1%}, "
              f"{r['tokens_per_forward']:.2f} tokens/forward, identical to k=0: {r['identical']}", flush=True)
    out[0].pop("tokens")
    return {str(k): v for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
