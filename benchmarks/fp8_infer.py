"""FP8 weights at inference: peak memory, closeness and speed of generating from an FP8 checkpoint
kept in FP8 (`load_model(path, keep_fp8=True)`) against the BF16 checkpoint of the same model.

    python benchmarks/fp8_infer.py all --out /tmp/fp8infer            # prepare + measure + report
    python benchmarks/fp8_infer.py prepare --out DIR [--size big]     # DIR/bf16, DIR/fp8 (same weights)
    python benchmarks/fp8_infer.py measure DIR/fp8 --keep-fp8         # one fresh process, prints JSON
    python benchmarks/fp8_infer.py closeness MODEL_DIR                # logits/greedy agreement on a model

Every measurement runs in a fresh subprocess and reads VmHWM (peak resident set) from
/proc/self/status: once right after `import torch, nanoseek` (the baseline every process pays),
and once after loading and greedy generation. Generation is a plain greedy loop on the latent
cache, `model(ids, start_pos=p, cache=c)`, the same forward the engine runs.

Three cases, same weights: `bf16` (BF16 checkpoint), `fp8-dequant` (FP8 checkpoint dequantized to
bf16 on load, the default), `fp8-keep` (FP8 checkpoint kept in FP8: 1 byte per weight + a float32
scale per 128x128 block, dequantized block-wise inside each Linear's forward).

Closeness is reported two ways: fp8-keep against fp8-dequant (the same FP8 weights; on CPU both
dequantize into bf16 the same way, so the logits must be bit-identical), and FP8 against the
original BF16 weights (the quantization error itself: logit relative RMS, top-1 agreement under
teacher forcing, and the length of the identical greedy prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # `bench` as in the tracker (92M params incl. MTP): small, so the per-process baseline dominates.
    "bench": {},
    # bench widened so that the weights dominate the process: ~1.5B parameters, 3.0 GB in bf16.
    "big": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=768, num_hidden_layers=10,
                n_routed_experts=64, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256),
}


def vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def cmd_prepare(args) -> None:
    import torch

    import nanoseek
    from nanoseek.checkpoint import save_model

    out = Path(args.out)
    cfg = nanoseek.preset("bench", **SIZES[args.size])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: half the memory while preparing
    model = nanoseek.DeepseekV3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.init_weights(std=args.init_std, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    save_model(model, out / "bf16", dtype="bf16")
    save_model(model, out / "fp8", fp8=True)
    print(json.dumps({"size": args.size, "params": model.num_parameters(), "save_s": time.perf_counter() - t,
                      "bf16_bytes": sum(f.stat().st_size for f in (out / "bf16").glob("*.safetensors")),
                      "fp8_bytes": sum(f.stat().st_size for f in (out / "fp8").glob("*.safetensors"))}))


def _fixed_inputs(vocab: int, batch: int, prompt_len: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g)


def cmd_measure(args) -> dict:
    import torch

    import nanoseek

    if args.threads:
        torch.set_num_threads(args.threads)
    base = vmhwm_kb()
    t0 = time.perf_counter()
    model = nanoseek.load_model(args.model_dir, dtype="bf16", keep_fp8=args.keep_fp8)
    load_s = time.perf_counter() - t0
    after_load = vmhwm_kb()
    cfg = model.config
    prompt = _fixed_inputs(cfg.vocab_size, args.batch, args.prompt_len)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    out_tokens = []
    with torch.inference_mode():
        cache = model.new_cache(B, P + N)
        t1 = time.perf_counter()
        logits = model(prompt, cache=cache).logits[:, -1]
        prefill_s = time.perf_counter() - t1
        nxt = logits.argmax(-1)
        out_tokens.append(nxt)
        t2 = time.perf_counter()
        for i in range(N - 1):
            logits = model(nxt[:, None], start_pos=P + i, cache=cache).logits[:, -1]
            nxt = logits.argmax(-1)
            out_tokens.append(nxt)
        decode_s = time.perf_counter() - t2
    peak = vmhwm_kb()
    tokens = torch.stack(out_tokens, 1)
    res = {"model_dir": str(args.model_dir), "keep_fp8": args.keep_fp8, "threads": torch.get_num_threads(),
           "baseline_vmhwm_mib": base / 1024, "after_load_vmhwm_mib": after_load / 1024, "peak_vmhwm_mib": peak / 1024,
           "load_s": load_s, "prefill_tok_s": B * P / prefill_s, "decode_tok_s": B * (N - 1) / decode_s,
           "batch": B, "prompt_len": P, "new_tokens": N, "tokens": tokens.tolist()}
    if args.logits_out:
        # Teacher-forced logits on one fixed token sequence, after the peak was read.
        seq = _fixed_inputs(cfg.vocab_size, B, P + N, seed=1)
        with torch.inference_mode():
            full = model(seq).logits.float()
        torch.save(full, args.logits_out)
    print(json.dumps(res))
    return res


def _measure(model_dir: Path, keep: bool, args, logits_out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "measure", str(model_dir), "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    if keep:
        cmd.append("--keep-fp8")
    if logits_out:
        cmd += ["--logits-out", str(logits_out)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agreement(a, b) -> dict:
    import torch

    ta, tb = torch.tensor(a), torch.tensor(b)
    same = ta == tb
    prefix = [int(row.cumprod(0).sum()) for row in same.int()]
    return {"token_agreement": same.float().mean().item(), "identical_prefix_per_row": prefix}


def _logit_stats(x, ref) -> dict:
    d = (x - ref).float()
    return {"max_abs": d.abs().max().item(), "max_abs_over_std": (d.abs().max() / ref.std()).item(),
            "rel_rms": (d.norm() / ref.norm()).item(),
            "top1_agreement": (x.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def cmd_closeness(args) -> dict:
    """In one process: a model directory's weights as BF16, as FP8 dequantized, and kept in FP8."""
    import tempfile

    import torch

    import nanoseek
    from nanoseek.checkpoint import save_model

    ref = nanoseek.load_model(args.model_dir, dtype="bf16")
    cfg = ref.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    if args.text and args.tokenizer:
        from nanoseek.tokenizer import Tokenizer

        tok = Tokenizer.from_file(args.tokenizer)
        text = Path(args.text).read_text(encoding="utf-8")
        enc = tok.encode(text)
        L = args.prompt_len
        rows = [enc[i * L:(i + 1) * L] for i in range(args.batch) if len(enc) >= (i + 1) * L]
        ids = torch.tensor(rows)
    with tempfile.TemporaryDirectory() as d:
        save_model(ref, d, fp8=True)
        deq = nanoseek.load_model(d, dtype="bf16")
        keep = nanoseek.load_model(d, dtype="bf16", keep_fp8=True)
        with torch.inference_mode():
            lr, ld, lk = (m(ids).logits.float() for m in (ref, deq, keep))

            def greedy(m, n=args.new_tokens):
                P = ids.shape[1] // 2
                cache = m.new_cache(ids.shape[0], P + n)
                nxt = m(ids[:, :P], cache=cache).logits[:, -1].argmax(-1)
                out = [nxt]
                for i in range(n - 1):
                    nxt = m(nxt[:, None], start_pos=P + i, cache=cache).logits[:, -1].argmax(-1)
                    out.append(nxt)
                return torch.stack(out, 1).tolist()

            gr, gd, gk = greedy(ref), greedy(deq), greedy(keep)
    res = {"model_dir": str(args.model_dir), "tokens": list(ids.shape),
           "keep_vs_dequant": {**_logit_stats(lk, ld), "bit_identical": bool(torch.equal(lk, ld)),
                               **_agreement(gk, gd)},
           "fp8_vs_bf16": {**_logit_stats(lk, lr), **_agreement(gk, gr)}}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


def cmd_all(args) -> None:
    import torch

    out = Path(args.out)
    if not (out / "fp8" / "config.json").exists() or not (out / "bf16" / "config.json").exists():
        subprocess.run([sys.executable, __file__, "prepare", "--out", str(out), "--size", args.size,
                        "--init-std", str(args.init_std)], check=True)
    runs = {}
    runs["bf16"] = _measure(out / "bf16", False, args, out / "logits_bf16.pt")
    runs["fp8-dequant"] = _measure(out / "fp8", False, args, out / "logits_fp8_dequant.pt")
    runs["fp8-keep"] = _measure(out / "fp8", True, args, out / "logits_fp8_keep.pt")
    lb, ld, lk = (torch.load(out / f"logits_{n}.pt") for n in ("bf16", "fp8_dequant", "fp8_keep"))
    base = runs["bf16"]["baseline_vmhwm_mib"]
    summary = {
        "size": args.size, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in runs.items()},
        "peak_ratio_keep_vs_bf16": runs["fp8-keep"]["peak_vmhwm_mib"] / runs["bf16"]["peak_vmhwm_mib"],
        "peak_ratio_above_baseline": ((runs["fp8-keep"]["peak_vmhwm_mib"] - base)
                                      / (runs["bf16"]["peak_vmhwm_mib"] - base)),
        "keep_vs_dequant": {**_logit_stats(lk, ld), "bit_identical": bool(torch.equal(lk, ld)),
                            **_agreement(runs["fp8-keep"]["tokens"], runs["fp8-dequant"]["tokens"])},
        "fp8_vs_bf16": {**_logit_stats(lk, lb), **_agreement(runs["fp8-keep"]["tokens"], runs["bf16"]["tokens"])},
    }
    js = Path(args.json or out / "fp8_infer.json")
    js.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def gen_args(q):
        q.add_argument("--batch", type=int, default=1)
        q.add_argument("--prompt-len", type=int, default=64)
        q.add_argument("--new-tokens", type=int, default=32)
        q.add_argument("--threads", type=int, default=0)

    q = sub.add_parser("prepare")
    q.add_argument("--out", required=True)
    q.add_argument("--size", choices=sorted(SIZES), default="big")
    q.add_argument("--init-std", type=float, default=0.02)
    q.set_defaults(fn=cmd_prepare)

    q = sub.add_parser("measure")
    q.add_argument("model_dir")
    q.add_argument("--keep-fp8", action="store_true")
    q.add_argument("--logits-out")
    gen_args(q)
    q.set_defaults(fn=cmd_measure)

    q = sub.add_parser("closeness")
    q.add_argument("model_dir")
    q.add_argument("--text", help="a text file to take the token rows from (with --tokenizer)")
    q.add_argument("--tokenizer")
    q.add_argument("--json")
    gen_args(q)
    q.set_defaults(fn=cmd_closeness)

    q = sub.add_parser("all")
    q.add_argument("--out", required=True)
    q.add_argument("--size", choices=sorted(SIZES), default="big")
    q.add_argument("--init-std", type=float, default=0.02)
    q.add_argument("--json")
    gen_args(q)
    q.set_defaults(fn=cmd_all)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
