"""Load balancing for DeepSeekMoE, outside the model definition.

* Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): each MoE layer's `e_score_correction_bias`
  b_i only affects which experts are *chosen*. After each optimizer step, every expert's load over
  the whole step (all micro-batches) is compared with the mean, and b_i moves by gamma against
  it: b_i += gamma * sign(mean_load - load_i). No gradient, no weight decay, no Adam.
* Complementary sequence-wise balance loss (eqs. 17-20), weight alpha (1e-4): per sequence,
  f_i = E / (K T) * #tokens routed to i, P_i = mean_t s'_{i,t} with s' the affinities renormalized
  over all experts; L = alpha * sum_i f_i P_i, averaged over sequences. Gradient flows through P.
  We count f_i with the experts actually dispatched (chosen with the bias), a choice DeepSeek's
  paper leaves open; the docs say so.
* A classical auxiliary loss (the same formula over the whole micro-batch) is available for comparisons.

`RoutingRecorder` collects what the gates did via forward hooks, so the model code stays free of
training concerns.
"""

from __future__ import annotations

import torch

from ..model import DeepseekV3ForCausalLM
from ..model.moe import Gate


class RoutingRecorder:
    """Per MoE layer: expert counts accumulated over a step, and this forward's (scores, idx) for losses."""

    def __init__(self, model: DeepseekV3ForCausalLM) -> None:
        self.layers: list[tuple[str, Gate]] = [(n, m) for n, m in model.named_modules() if isinstance(m, Gate)]
        E = model.config.n_routed_experts
        dev = model.lm_head.weight.device
        self.step_counts = torch.zeros(len(self.layers), E, dtype=torch.float64, device=dev)
        self.window_counts = torch.zeros_like(self.step_counts)  # since the last log line (for plots)
        self.forward_outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.enabled = True
        self._handles = [g.register_forward_hook(self._hook(i)) for i, (_, g) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            _, idx, scores = output
            counts = torch.bincount(idx.reshape(-1), minlength=self.step_counts.shape[1]).to(self.step_counts.dtype)
            self.step_counts[i] += counts
            self.window_counts[i] += counts
            self.forward_outputs[i] = (scores, idx)

        return hook

    @property
    def names(self) -> list[str]:
        return [n.rsplit(".mlp.gate", 1)[0] for n, _ in self.layers]

    def take_forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [o for o in self.forward_outputs if o is not None]
        self.forward_outputs = [None] * len(self.layers)
        return out

    def reset_step(self) -> None:
        self.step_counts.zero_()

    def reset_window(self) -> None:
        self.window_counts.zero_()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_seqs: int, top_k: int, per_sequence: bool = True) -> torch.Tensor:
    """sum_i f_i P_i, averaged over sequences (per_sequence) or over the whole batch (classical aux loss).

    scores [N, E] are the affinities (sigmoid or softmax), idx [N, K] the chosen experts, N = n_seqs * T.
    """
    N, E = scores.shape
    groups = n_seqs if per_sequence else 1
    T = N // groups
    s = scores.float().view(groups, T, E)
    s = s / (s.sum(dim=-1, keepdim=True) + 1e-20)  # s'_{i,t}: renormalized over all experts
    P = s.mean(dim=1)  # [groups, E]
    counts = torch.zeros(groups, E, device=scores.device, dtype=torch.float32)
    counts.scatter_add_(1, idx.view(groups, T * top_k), torch.ones(groups, T * top_k, device=scores.device))
    f = counts * (E / (top_k * T))
    return (f * P).sum(dim=-1).mean()


@torch.no_grad()
def update_correction_bias(recorder: RoutingRecorder, gamma: float) -> None:
    """b_i += gamma * sign(mean_load - load_i) for every MoE layer, from this step's counts."""
    if gamma == 0:
        return
    for i, (_, gate) in enumerate(recorder.layers):
        bias = gate.e_score_correction_bias
        if bias is None:
            continue
        load = recorder.step_counts[i]
        if load.sum() == 0:
            continue
        bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load, per layer (rows of `counts`)."""
    mean = counts.mean(dim=-1)
    return (counts.max(dim=-1).values - mean) / mean.clamp_min(1e-9)
