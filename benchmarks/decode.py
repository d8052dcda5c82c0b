"""Decode and prefill speed: nanoseek's engine versus transformers' `generate`, side by side.

    python3 benchmarks/decode.py                       # the full table (about 5-10 minutes on 2 cores)
    python3 benchmarks/decode.py --quick               # batch 1 fp32 only, shorter
    python3 benchmarks/decode.py --mtp RUN_DIR         # add MTP speculation on a trained model
    python3 benchmarks/decode.py --compile             # nanoseek with Engine(compile=True)
    python3 benchmarks/decode.py --compile --only-long --long-rounds 3   # the 4,096-token case alone

The model is the `bench` preset (6 layers, hidden 512, 32 experts top-4; 23.1M activated params),
built with random weights by transformers itself and written with `save_pretrained`; nanoseek loads
that directory. CPU, torch.set_num_threads(2). Each case runs both engines interleaved, R rounds,
and keeps each one's best time (the machines are shared and noisy: compare the ratios).

Timing, identical for both: T(n) = wall time of a generate call producing n new tokens (forced:
no early stop); prefill tok/s = batch x prompt / best T(1). Decode tok/s = batch / the median time
between consecutive generated tokens (transformers' streamer hook, nanoseek's stream), over all
rounds; batch x (N - 1) / (T(N) - T(1)) is printed too ("from totals"), and agrees on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nanoseek.config import PRESETS, preset  # noqa: E402
from nanoseek.summary import summarize  # noqa: E402


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """The bench preset as a transformers model with its own random init, saved with save_pretrained."""
    if (directory / "config.json").exists():
        return directory
    import transformers

    cfg = dict(PRESETS["bench"])
    cfg.pop("torch_dtype", None)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    model.save_pretrained(directory)
    return directory


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Bytes moved per second (read + write counted) by a large tensor copy."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * nbytes / best


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), while this process sleeps."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    b0, t0 = snap()
    time.sleep(seconds)
    b1, t1 = snap()
    return (b1 - b0) / max(t1 - t0, 1)


QUIET = {"max_busy": None, "timeout": 300.0, "waited": 0.0}


def wait_quiet() -> None:
    """With --quiet-below X: wait (up to --quiet-timeout s per call) until other processes use < X of the CPUs."""
    if QUIET["max_busy"] is None:
        return
    t = time.perf_counter()
    try:
        while cpu_busy() > QUIET["max_busy"] and time.perf_counter() - t < QUIET["timeout"]:
            time.sleep(1.0)
    except OSError:
        return
    QUIET["waited"] += time.perf_counter() - t


def _timed(fn) -> float:
    wait_quiet()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class HF:
    name = "transformers"

    def __init__(self, directory: Path, dtype: torch.dtype) -> None:
        import transformers

        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype).eval()

    def run(self, ids: torch.Tensor, new: int, stamps: list[float] | None = None) -> torch.Tensor:
        """`stamps` gets a perf_counter time per generated token (transformers' streamer hook)."""
        streamer = None
        if stamps is not None:
            class Stamp:
                def __init__(self):
                    self.calls = 0

                def put(self, value):
                    self.calls += 1
                    if self.calls > 1:  # the first put is the prompt
                        stamps.append(time.perf_counter())

                def end(self):
                    pass
            streamer = Stamp()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, streamer=streamer)
        return out[:, ids.shape[1]:]

    def kv_bytes_per_token(self, ids: torch.Tensor) -> float:
        with torch.inference_mode():
            cache = self.model(ids[:1, :16], use_cache=True).past_key_values
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total / 16


class NS:
    name = "nanoseek"

    def __init__(self, directory: Path | str, dtype: torch.dtype, fast: bool = True, compile: bool = False) -> None:
        from nanoseek.engine import Engine

        self.engine = Engine(str(directory), dtype=dtype, fast=fast, compile=compile)

    def run(self, ids: torch.Tensor, new: int, stamps: list[float] | None = None) -> torch.Tensor:
        """`stamps` gets a perf_counter time per decode step (after each streamed step)."""
        tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for c in self.engine.stream(ids.tolist(), max_tokens=new, temperature=0, ignore_eos=True):
            tokens[c.index] += c.token_ids
            if stamps is not None and c.index == 0:  # forced length: row 0 gets one chunk per step
                stamps.append(time.perf_counter())
        return torch.tensor(tokens)


def measure(engines, ids: torch.Tensor, new: int, rounds: int) -> dict:
    """Interleaved rounds. Prefill: best T(1). Decode: the median time between consecutive generated
    tokens over all rounds (robust to other processes waking up mid-run on a shared machine), and,
    for reference, B x (N - 1) / (best T(N) - best T(1))."""
    B, P = ids.shape
    t1 = {e.name: float("inf") for e in engines}
    tn = dict(t1)
    steps: dict[str, list[float]] = {e.name: [] for e in engines}
    outs = {}
    for e in engines:  # warm-up (allocators, oneDNN primitives)
        e.run(ids, 2)
    for _ in range(rounds):
        for e in engines:
            t1[e.name] = min(t1[e.name], _timed(lambda: e.run(ids, 1)))
        for e in engines:
            wait_quiet()
            stamps: list[float] = []
            t = time.perf_counter()
            outs[e.name] = e.run(ids, new, stamps)
            tn[e.name] = min(tn[e.name], time.perf_counter() - t)
            steps[e.name] += [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    res = {}
    for e in engines:
        st = sorted(steps[e.name])
        med = st[len(st) // 2]
        res[e.name] = {"prefill_tok_s": B * P / t1[e.name], "decode_tok_s": B / med,
                       "decode_tok_s_mean": B * (new - 1) / max(tn[e.name] - t1[e.name], 1e-9),
                       "median_step_s": med, "t1_s": t1[e.name], "tn_s": tn[e.name]}
    if len(outs) == 2:
        a, b = outs["transformers"], outs["nanoseek"]
        same = (a == b).all(dim=1)
        first_diff = [int((x != y).nonzero()[0]) if not s else new for x, y, s in zip(a, b, same)]
        res["identical_rows"] = f"{int(same.sum())}/{B}"
        res["tokens_before_divergence"] = first_diff
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/nanoseek-bench-hf"), help="where the checkpoint is written")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--long", type=int, default=4096, help="context for the long-context case (prompt = long - new)")
    ap.add_argument("--long-rounds", type=int, default=1, help="timed rounds of the long-context case (default 1)")
    ap.add_argument("--only-long", action="store_true", help="only the long-context case (and no MTP case)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fp32 batch 1 only, no long context")
    ap.add_argument("--no-long", action="store_true")
    ap.add_argument("--mtp", type=Path, default=None, help="a trained model directory for the MTP measurement")
    ap.add_argument("--mtp-prompt-file", type=Path, default=None, help="text prompt for --mtp (needs its tokenizer)")
    ap.add_argument("--only-mtp", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--quiet-below", type=float, default=None, metavar="X",
                    help="before each timed call wait until other processes use less than X of the CPUs (0..1)")
    ap.add_argument("--quiet-timeout", type=float, default=300.0)
    ap.add_argument("--compile", action="store_true", help="nanoseek with Engine(compile=True) (compile time excluded)")
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    QUIET.update(max_busy=args.quiet_below, timeout=args.quiet_timeout)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, nanoseek compile={args.compile}, load average at start {load_avg()}")
    ckpt = make_checkpoint(args.ckpt)
    cfg = preset("bench")
    s = summarize(cfg)
    matmul_params = s["flops"]["matmul_params_per_token"]
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write); active matmul weights per token {matmul_params / 1e6:.2f}M")

    cases = [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)]
    if args.quick:
        cases = [("fp32", 1)]
    if args.only_mtp and args.only_long:
        ap.error("--only-mtp and --only-long exclude each other")
    if args.long_rounds < 1 or args.rounds < 1:
        ap.error("--rounds and --long-rounds must be >= 1")
    if args.only_mtp:
        cases, args.no_long = [], True
    if args.only_long:
        cases, args.no_long = [], False
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    g = torch.Generator().manual_seed(0)
    report = {"threads": args.threads, "compile": args.compile, "copy_bandwidth_GBps": bw / 1e9, "cases": []}
    rows = []
    for dname, B in cases:
        dt = dtypes[dname]
        hf, ns = HF(ckpt, dt), NS(ckpt, dt, compile=args.compile)
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g)
        r = measure([hf, ns], ids, args.new, args.rounds)
        esize = torch.empty(0, dtype=dt).element_size()
        floor = bw / (matmul_params * esize)  # tok/s at batch 1 if weights streamed at copy speed
        r.update(dtype=dname, batch=B, prompt=args.prompt, new=args.new,
                 kv_bytes_per_token={"nanoseek": ns.engine.kv_cache_bytes_per_token(),
                                     "transformers": hf.kv_bytes_per_token(ids),
                                     "latent": cfg.num_hidden_layers * cfg.kv_cache_dim * esize},
                 floor_tok_s_batch1=floor)
        report["cases"].append(r)
        rows.append(r)
        _print_case(r)
        del hf, ns
    if not (args.quick or args.no_long):
        P = args.long - args.new
        for dname in ("fp32", "bf16"):
            dt = dtypes[dname]
            hf, ns = HF(ckpt, dt), NS(ckpt, dt, compile=args.compile)
            ids = torch.randint(0, cfg.vocab_size, (1, P), generator=g)
            r = measure([hf, ns], ids, args.new, args.long_rounds)
            r.update(dtype=dname, batch=1, prompt=P, new=args.new, long_context=True)
            report["cases"].append(r)
            rows.append(r)
            _print_case(r)
            del hf, ns
    report["mtp"] = None if args.only_long else mtp_case(args, ckpt)
    print()
    print(markdown(rows, report))
    if report["mtp"]:
        print(report["mtp"]["text"])
    print(f"load average at end {load_avg()}; waited {QUIET['waited']:.0f} s for quiet CPUs")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _print_case(r: dict) -> None:
    h, n = r["transformers"], r["nanoseek"]
    print(f"{r['dtype']} batch {r['batch']} prompt {r['prompt']}: prefill {h['prefill_tok_s']:.0f} vs "
          f"{n['prefill_tok_s']:.0f} tok/s ({n['prefill_tok_s'] / h['prefill_tok_s']:.2f}x), decode "
          f"{h['decode_tok_s']:.1f} vs {n['decode_tok_s']:.1f} tok/s ({n['decode_tok_s'] / h['decode_tok_s']:.2f}x; "
          f"from totals {h['decode_tok_s_mean']:.1f} vs {n['decode_tok_s_mean']:.1f}); "
          f"identical rows {r.get('identical_rows')}, load {load_avg()}", flush=True)


def mtp_case(args, ckpt: Path) -> dict:
    """Decode with and without MTP speculation (batch 1, fp32) on a trained model if given, else on the
    random `bench` preset with its (random) MTP module (transformers' checkpoint has no MTP weights).
    Greedy (k = 0, 1, 2; outputs must be identical) and sampled at temperature 0.8 (k = 0, 1)."""
    directory = args.mtp or "bench"
    ns = NS(directory, torch.float32, compile=args.compile)
    eng = ns.engine
    if args.mtp_prompt_file is not None:
        ids = torch.tensor([eng.encode(args.mtp_prompt_file.read_text())[-args.prompt:]])
    else:
        ids = torch.randint(0, eng.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    out = {}
    for temp, k in ((0.0, 0), (0.0, 1), (0.0, 2), (0.8, 0), (0.8, 1)):
        if k and eng.config.num_nextn_predict_layers < 1:
            continue
        kw = dict(max_tokens=args.new, temperature=temp, ignore_eos=True, speculative=k, seed=0)
        eng.generate(ids.tolist(), **{**kw, "max_tokens": 24 if args.compile else 4})  # warm-up (compiles every step shape)
        best = None
        for _ in range(args.rounds):
            wait_quiet()
            toks = eng.generate(ids.tolist(), **kw)[0].token_ids
            st = eng.last_stats
            if best is None or st.decode_s < best["decode_s"]:
                best = {"decode_tok_s": st.decode_tok_s, "decode_s": st.decode_s,
                        "acceptance_rate": st.acceptance_rate, "tokens_per_forward": st.tokens_per_forward,
                        "tokens": toks}
        out[f"T={temp} k={k}"] = best
    lines = [f"MTP speculation on {'the trained model ' + str(directory) if args.mtp else 'the random bench model'}"
             f" (fp32, batch 1, prompt {ids.shape[1]}, {args.new} new tokens):"]
    for name, r in out.items():
        base = out[name.split(" ")[0] + " k=0"]
        r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["identical"] = r["tokens"] == base["tokens"]
        lines.append(f"  {name}: decode {r['decode_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), acceptance "
                     f"{r['acceptance_rate']:.1%}, {r['tokens_per_forward']:.2f} tokens/forward"
                     + (f", output identical to k=0: {r['identical']}" if name.startswith("T=0.0") else ""))
    for r in out.values():
        r.pop("tokens")
    print("\n".join(lines), flush=True)
    return {"model": str(directory), "trained": args.mtp is not None, "results": out, "text": "\n".join(lines)}


def markdown(rows: list[dict], report: dict) -> str:
    goals = {(False, 1): (1.5, 3.0), (False, 8): (1.5, 2.0), (True, 1): (None, 5.0)}
    out = ["| dtype | batch | prompt | prefill tok/s transformers | nanoseek | ratio | decode tok/s transformers "
           "| nanoseek | ratio | goal (prefill / decode) | greedy tokens identical |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, n = r["transformers"], r["nanoseek"]
        gp, gd = goals[(bool(r.get("long_context")), r["batch"])]
        goal = (f"{gp}x / " if gp else "- / ") + f"{gd}x"
        ident = r.get("identical_rows", "")
        if r["dtype"] == "bf16":
            ident += " (bf16: not expected)"
        out.append(f"| {r['dtype']} | {r['batch']} | {r['prompt']}{' (long)' if r.get('long_context') else ''} | "
                   f"{h['prefill_tok_s']:.0f} | {n['prefill_tok_s']:.0f} | {n['prefill_tok_s'] / h['prefill_tok_s']:.2f}x | "
                   f"{h['decode_tok_s']:.1f} | {n['decode_tok_s']:.1f} | {n['decode_tok_s'] / h['decode_tok_s']:.2f}x | "
                   f"{goal} | {ident} |")
    out.append("")
    bw = report["copy_bandwidth_GBps"]
    for r in rows:
        if r.get("long_context") or r["batch"] != 1:
            continue
        n = r["nanoseek"]["decode_tok_s"]
        out.append(f"- {r['dtype']} batch 1 bandwidth floor: {r['floor_tok_s_batch1']:.0f} tok/s (active weights per "
                   f"token over {bw:.1f} GB/s copy bandwidth); nanoseek reaches {n / r['floor_tok_s_batch1']:.0%} of it")
    for r in rows:
        if "kv_bytes_per_token" in r and r["batch"] == 1:
            kv = r["kv_bytes_per_token"]
            out.append(f"- {r['dtype']} KV cache bytes per token: nanoseek {kv['nanoseek']}, transformers "
                       f"{kv['transformers']:.0f}, latent size {kv['latent']}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
