"""FP8 training validation, as DeepSeek-V3 did it: the same model, data and seed trained with FP8
GEMMs and with BF16, then the relative difference of the final validation loss (V3: < 0.25%).

    python benchmarks/fp8_train.py run --precision bf16 --out runs/fp8val/bf16 ...
    python benchmarks/fp8_train.py run --precision fp8  --out runs/fp8val/fp8  ...
    python benchmarks/fp8_train.py compare runs/fp8val/bf16 runs/fp8val/fp8 --plot docs/fp8_loss.png
    python benchmarks/fp8_train.py all --out runs/fp8val --steps 300      # both runs (in parallel) + compare
    python benchmarks/fp8_train.py seeds runs/fp8val-seed2 runs/fp8val-seed3 ... --plot docs/fp8_seeds.png

Both runs use nanoseek's trainer (`nanoseek.train.Trainer`) with bf16 autocast: the BF16 run is
the trainer as is; the FP8 run additionally switches the V3 FP8 layers to FP8 GEMMs
(`enable_fp8_training(trainer.model, backend)`; emulation on CPU). Everything else (tokenizer,
data order, init, optimizer, schedule, balancing) is identical by construction: same config and
seed, and a tokenizer trained once and shared.

The GPU part (`gpu`): TFLOP/s of the FP8 GEMM (block-scaled `_scaled_mm`) against a BF16 matmul
at V3-like shapes, and one training step of a larger preset in FP8 vs BF16. Skipped, with a
message, without an FP8-capable CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _train_cfg(args, out: str, tokenizer: str | None):
    from nanoseek.train import TrainConfig

    dtype = "fp32" if getattr(args, "precision", "bf16") == "fp32" else "bf16"
    return TrainConfig(model=args.model, out_dir=out, seq_len=args.seq_len, batch_size=args.batch_size,
                       max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                       dtype=dtype, device="cpu" if args.device == "cpu" else "auto",
                       eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                       log_interval=args.log_interval, ckpt_interval=0, tensorboard=False, sample_tokens=0,
                       threads=args.threads, tokenizer=tokenizer, data=args.data or [])


def cmd_run(args) -> dict:
    import torch

    from nanoseek.fp8_linear import enable_fp8_training
    from nanoseek.train import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(_train_cfg(args, args.out, args.tokenizer), show_progress=not args.quiet)
    n = 0
    if args.precision == "fp8":
        n = enable_fp8_training(trainer.model, backend=args.backend)
        _ablate(args.ablate)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t1
    info = {"precision": args.precision, "fp8_modules": n, "ablate": args.ablate, "backend": args.backend if n else None,
            "setup_s": setup, "train_wall_s": wall, "threads": torch.get_num_threads(),
            "params": trainer.model.num_parameters(), "result": result}
    Path(args.out, "fp8_run.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


def _ablate(mode: str) -> None:
    """Switch parts of the emulated quantization off, to see what a difference comes from.

    nograd: gradient tiles stay unquantized (Dgrad's dY, Wgrad's dY); noquant: nothing is quantized,
    so the run takes the FP8Linear code path (FP32 GEMMs) with exact inputs: the control that
    separates E4M3 rounding from the path itself. Emulation backend only.
    """
    import nanoseek.fp8_linear as fl

    if mode == "none":
        return
    quantize_tiles = fl.fake_quantize_tiles
    if mode == "nograd":
        # the FP8 linear quantizes gradients with eps=grad_eps (0.0), activations with act_eps (> 0)
        fl.fake_quantize_tiles = lambda t, power_of_two=False, eps=1e-4: (
            t.float() if eps == fl.DEFAULT_RECIPE.grad_eps else quantize_tiles(t, power_of_two=power_of_two, eps=eps))
    elif mode == "noquant":
        fl.fake_quantize_tiles = lambda t, power_of_two=False, eps=1e-4: t.float()
        fl.fake_quantize_blockwise = lambda w, power_of_two=False: w.float()
    else:
        raise SystemExit(f"--ablate: unknown mode {mode!r}")


def _curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
        elif "loss" in rec:
            train.append((rec["step"], rec["loss"]))
    return train, val


def cmd_compare(args) -> dict:
    a, b = Path(args.baseline), Path(args.fp8)
    (ta, va), (tb, vb) = _curves(a), _curves(b)
    if not va or not vb:
        raise SystemExit("both runs need validation losses in metrics.jsonl")
    la, lb = va[-1][1], vb[-1][1]
    rel = (lb - la) / la
    summary = {"baseline_dir": str(a), "fp8_dir": str(b), "final_step": va[-1][0],
               "val_loss_bf16": la, "val_loss_fp8": lb, "rel_diff": rel, "abs_rel_diff_pct": abs(rel) * 100,
               "passes_0.25pct": abs(rel) < 0.0025,
               "val_curve_bf16": va, "val_curve_fp8": vb}
    ref = Path(args.reference) if getattr(args, "reference", None) else None
    vr = _curves(ref)[1] if ref else []
    if vr:
        summary.update({"reference_dir": str(ref), "reference_label": args.reference_label,
                        "val_loss_reference": vr[-1][1], "rel_diff_reference": (vr[-1][1] - la) / la,
                        "val_curve_reference": vr})
    for name, d in (("bf16", a), ("fp8", b)):
        f = d / "fp8_run.json"
        if f.exists():
            info = json.loads(f.read_text())
            summary[f"train_wall_s_{name}"] = info["train_wall_s"]
            summary["params"] = info["params"]
        cfg = d / "train_config.json"
        if cfg.exists():
            summary["train_config"] = json.loads(cfg.read_text())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        for (t, v), label, c in (((ta, va), "BF16", "tab:blue"), ((tb, vb), "FP8 (E4M3, emulated)", "tab:red")):
            ax.plot([s for s, _ in t], [x for _, x in t], color=c, lw=1, alpha=0.8, label=f"{label} train")
            ax.plot([s for s, _ in v], [x for _, x in v], "o-", color=c, ms=3, label=f"{label} val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("training and validation loss")
        ax.legend(fontsize=8)
        steps = [s for s, _ in va if any(s == s2 for s2, _ in vb)]
        dv = dict(vb)
        bx.plot(steps, [100 * (dv[s] - x) / x for s, x in va if s in dv], "o-", color="k", ms=3,
                label="FP8 vs BF16")
        if vr:
            dr = dict(vr)
            bx.plot([s for s, _ in va if s in dr], [100 * (dr[s] - x) / x for s, x in va if s in dr], "s--",
                    color="gray", ms=3, label=f"{args.reference_label} vs BF16 (same seed: noise floor)")
        bx.axhspan(-0.25, 0.25, color="tab:green", alpha=0.15, label="V3 bound +-0.25%")
        bx.axhline(0, color="gray", lw=0.5)
        bx.set_xlabel("step")
        bx.set_ylabel("(val loss - val loss BF16) / val loss BF16  [%]")
        bx.set_title(f"relative val-loss difference to BF16 (final FP8: {100 * rel:+.3f}%)")
        bx.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        summary["plot"] = args.plot
    out = Path(args.json or (b.parent / "fp8_compare.json"))
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"final val loss: bf16 {la:.5f}  fp8 {lb:.5f}  relative difference {100 * rel:+.4f}% "
          f"({'within' if abs(rel) < 0.0025 else 'OUTSIDE'} V3's 0.25%)")
    if vr:
        rd = 100 * summary["rel_diff_reference"]
        print(f"reference ({args.reference_label}) {vr[-1][1]:.5f}: {rd:+.4f}% vs bf16")
    return summary


def cmd_seeds(args) -> dict:
    """Several seeds, each a directory holding a `bf16` and an `fp8` run: the per-seed relative
    difference of the final validation loss, its mean and a 95% interval for the mean (Student t).
    One seed's difference is dominated by how far two trajectories drift apart; the mean over
    seeds is the estimate of what FP8 itself costs."""
    rows = []
    for root in map(Path, args.roots):
        needed = [root / p / f for p in ("bf16", "fp8") for f in ("metrics.jsonl", "train_config.json")]
        if missing := [str(f) for f in needed if not f.is_file()]:
            raise SystemExit(f"{root}: not a finished seed directory (missing {', '.join(missing)})")
        (_, va), (_, vb) = _curves(root / "bf16"), _curves(root / "fp8")
        if not va or not vb:
            raise SystemExit(f"{root}: needs finished bf16/ and fp8/ runs with validation losses")
        cfg = json.loads((root / "fp8" / "train_config.json").read_text())
        rows.append({"root": str(root), "seed": cfg.get("seed"), "bf16": va[-1][1], "fp8": vb[-1][1],
                     "rel_diff": (vb[-1][1] - va[-1][1]) / va[-1][1], "curves": (va, vb)})
    n = len(rows)
    d = [r["rel_diff"] for r in rows]
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    t95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}.get(n - 1, 2.0)
    half = t95 * sd / n ** 0.5
    print("| seed | BF16 final val loss | FP8 | FP8 vs BF16 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['bf16']:.4f} | {r['fp8']:.4f} | {100 * r['rel_diff']:+.2f}% |")
    print(f"\nmean over {n} seeds {100 * mean:+.2f}%, seed-to-seed sd {100 * sd:.2f}%, "
          f"95% interval for the mean [{100 * (mean - half):+.2f}%, {100 * (mean + half):+.2f}%]")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        per_step: dict[int, list[float]] = {}
        for r in rows:
            va, vb = r["curves"]
            dv = dict(vb)
            pts = [(s, 100 * (dv[s] - x) / x) for s, x in va if s in dv]
            for s, y in pts:
                per_step.setdefault(s, []).append(y)
            ax.plot([s for s, _ in pts], [y for _, y in pts], "o-", ms=2, lw=1, alpha=0.6, label=f"seed {r['seed']}")
        steps = sorted(k for k, v in per_step.items() if len(v) == n)
        ax.plot(steps, [sum(per_step[s]) / n for s in steps], "k-", lw=2.5, label=f"mean of {n} seeds")
        ax.axhspan(-0.25, 0.25, color="tab:green", alpha=0.15, label="V3 bound +-0.25%")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("FP8 vs BF16 validation loss [%]")
        ax.set_title(f"FP8 (emulated E4M3) vs BF16, same seed\nfinal: mean {100 * mean:+.2f}%, 95% interval +-{100 * half:.2f}%", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    for r in rows:
        r.pop("curves")
    return {"seeds": rows, "mean_rel_diff": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def _shared_tokenizer(args, root: Path) -> str:
    """Train the tokenizer once (a 1-step throwaway run) so both runs read the same file."""
    tok = root / "tokenizer" / "tokenizer.json"
    if tok.exists():
        return str(tok)
    from nanoseek.train import Trainer

    ns = argparse.Namespace(**{**vars(args), "steps": 1})
    Trainer(_train_cfg(ns, str(root / "tokenizer"), None), show_progress=False)  # saves tokenizer.json
    return str(tok)


def cmd_all(args) -> None:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    tok = _shared_tokenizer(args, root)
    common = [sys.executable, __file__, "run", "--model", args.model, "--steps", str(args.steps),
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup", str(args.warmup), "--seed", str(args.seed), "--eval-interval", str(args.eval_interval),
              "--eval-batches", str(args.eval_batches), "--log-interval", str(args.log_interval),
              "--threads", str(args.threads), "--tokenizer", tok, "--backend", args.backend, "--quiet",
              "--device", args.device]
    for d in args.data or []:
        common += ["--data", d]
    procs = []
    for prec in ("bf16", "fp8"):
        log = open(root / f"{prec}.log", "w")
        procs.append(subprocess.Popen(common + ["--precision", prec, "--out", str(root / prec)],
                                      stdout=log, stderr=subprocess.STDOUT))
        if not args.parallel:
            procs[-1].wait()
    for p in procs:
        p.wait()
        if p.returncode:
            raise SystemExit(f"a run failed (exit {p.returncode}); see {root}/*.log")
    cmd_compare(argparse.Namespace(baseline=str(root / "bf16"), fp8=str(root / "fp8"), plot=args.plot,
                                   json=args.json, reference=None, reference_label="FP32"))


# ---- GPU: GEMM throughput and a training step ----------------------------------------------------

def cmd_gpu(args) -> None:
    import torch

    from nanoseek.fp8 import quantize_activation_tiles, quantize_weight_blockwise
    from nanoseek.fp8_linear import _cuda_mode, cuda_fp8_available, gemm_cuda

    if not cuda_fp8_available():
        print("skipped: needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); "
              f"torch.cuda.is_available() = {torch.cuda.is_available()}")
        return
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
               "cuda": torch.version.cuda, "fp8_gemm_mode": _cuda_mode(dev), "gemm": []}

    def bench(fn, iters=50):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters

    for M, N, K in [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 16384), (8192, 18432, 7168),
                    (2048, 24576, 1536)]:
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        aq, sa = quantize_activation_tiles(a)
        wq, sw = quantize_weight_blockwise(w)
        flop = 2 * M * N * K
        t_bf16 = bench(lambda: a @ w.t())
        t_fp8 = bench(lambda: gemm_cuda(aq, sa, wq, sw, True))
        t_fp8_q = bench(lambda: gemm_cuda(*quantize_activation_tiles(a), wq, sw, True))
        row = {"M": M, "N": N, "K": K, "bf16_tflops": flop / t_bf16 / 1e12, "fp8_tflops": flop / t_fp8 / 1e12,
               "fp8_with_act_quant_tflops": flop / t_fp8_q / 1e12, "speedup": t_bf16 / t_fp8}
        results["gemm"].append(row)
        print(json.dumps(row))

    # One training step of a larger preset, BF16 autocast vs BF16 + FP8 GEMMs.
    import torch.nn.functional as F

    import nanoseek
    from nanoseek.fp8_linear import enable_fp8_training

    cfg = nanoseek.preset(args.gpu_preset, num_nextn_predict_layers=0)
    steps = {}
    for prec in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = nanoseek.DeepseekV3ForCausalLM(cfg).to(dev)
        model.init_weights()
        if prec == "fp8":
            enable_fp8_training(model, "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (args.gpu_batch, args.gpu_seq + 1), device=dev)

        def step(model=model, opt=opt, ids=ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[prec] = bench(step, iters=10)
        del model, opt
        torch.cuda.empty_cache()
    results["train_step"] = {"preset": args.gpu_preset, "batch": args.gpu_batch, "seq": args.gpu_seq,
                             "bf16_s": steps["bf16"], "fp8_s": steps["fp8"], "speedup": steps["bf16"] / steps["fp8"]}
    print(json.dumps(results["train_step"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def train_args(q):
        q.add_argument("--model", default="small")
        q.add_argument("--data", action="append")
        q.add_argument("--steps", type=int, default=300)
        q.add_argument("--seq-len", type=int, default=256)
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--lr", type=float, default=3e-3)
        q.add_argument("--warmup", type=int, default=50)
        q.add_argument("--seed", type=int, default=1337)
        q.add_argument("--eval-interval", type=int, default=25)
        q.add_argument("--eval-batches", type=int, default=16)
        q.add_argument("--log-interval", type=int, default=5)
        q.add_argument("--threads", type=int, default=0)
        q.add_argument("--backend", default="auto", choices=["auto", "emulate", "cuda"])
        q.add_argument("--device", default="cpu", choices=["cpu", "auto"])
        q.add_argument("--quiet", action="store_true")

    r = sub.add_parser("run", help="one training run")
    train_args(r)
    r.add_argument("--precision", choices=["bf16", "fp8", "fp32"], required=True,
                   help="bf16: bf16 autocast; fp8: bf16 autocast + FP8 GEMMs; fp32: no autocast (a noise floor)")
    r.add_argument("--out", required=True)
    r.add_argument("--tokenizer")
    r.add_argument("--ablate", choices=["none", "nograd", "noquant"], default="none",
                   help="with --precision fp8 (emulation): leave gradients (nograd) or everything (noquant) unquantized")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("compare", help="compare two finished runs")
    c.add_argument("baseline")
    c.add_argument("fp8")
    c.add_argument("--plot")
    c.add_argument("--json")
    c.add_argument("--reference", help="a third run (e.g. --precision fp32) drawn as the noise floor")
    c.add_argument("--reference-label", default="FP32")
    c.set_defaults(fn=cmd_compare)

    a = sub.add_parser("all", help="tokenizer, both runs, comparison")
    train_args(a)
    a.add_argument("--out", default="runs/fp8val")
    a.add_argument("--plot", default="docs/fp8_loss.png")
    a.add_argument("--json")
    a.add_argument("--parallel", action="store_true", help="run both at once (use --threads 1 on 2 cores)")
    a.set_defaults(fn=cmd_all)

    sd = sub.add_parser("seeds", help="mean FP8-vs-BF16 difference over several seeds (dirs with bf16/ and fp8/)")
    sd.add_argument("roots", nargs="+")
    sd.add_argument("--plot", default=None)
    sd.set_defaults(fn=cmd_seeds)

    g = sub.add_parser("gpu", help="FP8 vs BF16 GEMM TFLOP/s and training step (needs an FP8 GPU)")
    g.add_argument("--gpu-preset", default="bench")
    g.add_argument("--gpu-batch", type=int, default=8)
    g.add_argument("--gpu-seq", type=int, default=2048)
    g.add_argument("--json")
    g.set_defaults(fn=cmd_gpu)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
