"""PNG plots of a run: loss curves (train / validation / MTP) and the expert-load heatmap.

`nanoseek plot RUN` redraws them from `metrics.jsonl` at any time, also while training runs.
"""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = []

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (main)", lw=1.2)
        depths = sorted({k for r in train for k in r if k.startswith("mtp_loss_")})
        for k in depths:
            pts = [(r["step"], r[k]) for r in train if k in r]
            ax.plot(*zip(*pts), label=f"train MTP depth {k.rsplit('_', 1)[1]}", lw=1, alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    loads = [r for r in records if "expert_load" in r]
    if loads:
        n_layers = len(loads[-1]["expert_load"])
        fig, axes = plt.subplots(n_layers, 1, figsize=(9, 1.6 + 1.5 * n_layers), squeeze=False)
        for li in range(n_layers):
            grid = np.array([r["expert_load"][li] for r in loads], dtype=float)  # [time, experts]
            share = grid / np.maximum(grid.sum(axis=1, keepdims=True), 1e-9) * grid.shape[1]  # 1.0 = balanced
            ax = axes[li][0]
            im = ax.imshow(share.T, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(share.max())),
                           extent=[loads[0]["step"], loads[-1]["step"], grid.shape[1] - 0.5, -0.5],
                           interpolation="nearest")
            ax.set_ylabel(f"layer {loads[-1].get('expert_load_layers', list(range(n_layers)))[li]}\nexpert", fontsize=8)
            fig.colorbar(im, ax=ax, pad=0.01).set_label("load / mean", fontsize=8)
        axes[-1][0].set_xlabel("step")
        axes[0][0].set_title(f"{run_dir.name}: expert load per MoE layer (1.0 = perfectly balanced)")
        fig.tight_layout()
        path = run_dir / "expert_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([r["step"] for r in loads], [r.get("maxvio_batch", float("nan")) for r in loads], label="MaxVio (batch)")
        gl = [r for r in records if "maxvio_global" in r]
        if gl:
            ax.plot([r["step"] for r in gl], [r["maxvio_global"] for r in gl], "o-", label="MaxVio (global, validation)")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / "maxvio.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
