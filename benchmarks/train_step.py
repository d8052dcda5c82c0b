"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM on the same weights.

One step = forward + cross-entropy + backward (no MTP on either side, since transformers has none),
same config, same batch, fp32, interleaved rounds; prints tokens/s and the ratio.

    python3 benchmarks/train_step.py --preset small --batch 16 --seq 256 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.checkpoint import save_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = nanoseek.preset(args.preset, num_nextn_predict_layers=0)
    ours = nanoseek.DeepseekV3ForCausalLM(cfg)
    ours.init_weights(generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    ours.train()
    theirs.train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def step(model) -> float:
        t = time.perf_counter()
        logits = model(x[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(ours), step(theirs)  # warm-up
    best = {"nanoseek": float("inf"), "transformers": float("inf")}
    for _ in range(args.rounds):
        best["nanoseek"] = min(best["nanoseek"], step(ours))
        best["transformers"] = min(best["transformers"], step(theirs))
    tokens = args.batch * args.seq
    for name, t in best.items():
        print(f"{name:13s} {t:.3f} s/step  {tokens / t:,.0f} tokens/s")
    print(f"ratio nanoseek/transformers: {best['transformers'] / best['nanoseek']:.2f}x")


if __name__ == "__main__":
    main()
