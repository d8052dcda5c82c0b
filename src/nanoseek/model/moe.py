"""DeepSeekMoE: a few shared experts every token uses, plus many fine-grained routed experts.

Routing (`route`) is a pure function of the router logits:

1. affinities s = sigmoid(logits) (V3, Moonlight) or softmax(logits) (V2 family);
2. for selection only, V3's `noaux_tc` adds the load-balancing correction bias b: s_b = s + b
   (the bias is learned outside autograd, see the training docs);
3. group limiting: experts form `n_group` groups; keep the `topk_group` groups with the best
   group score (sum of the two best s_b for noaux_tc, the max for group_limited_greedy) and mask
   the rest with -inf (the official code's choice; some transformers versions wrote 0.0, which
   differs when biased scores in kept groups are <= 0);
4. top-k experts by the masked s_b; gate weights come from the *unbiased* s, optionally
   renormalized (`norm_topk_prob`), times `routed_scaling_factor`.

The router runs in fp32 whatever the model dtype (transformers does; DeepSeek's inference script
uses bf16 logits, which can flip near-ties in bf16 runs).

Experts are stored stacked ([E, 2I, H] gate|up and [E, H, I] down) so that the expert compute
groups tokens by expert and touches only the experts some token chose; the checkpoint code maps
them to and from the official per-expert tensor names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cast_cache import cast_cached


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] (fp32) -> (weights [N, k] fp32, expert indices [N, k], affinities s [N, E])."""
    if cfg.scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    choice = scores + bias if (bias is not None and cfg.topk_method == "noaux_tc") else scores
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(N, E)
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx, scores


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self._fp32_weight())
        return route(logits, self.e_score_correction_bias, self.cfg)

    def _fp32_weight(self) -> torch.Tensor:
        """The router weight in fp32; under no-grad a bf16/fp16 model keeps the converted copy while
        the weight is unchanged (same version counter and storage) instead of converting per call."""
        return cast_cached(self, "_fp32_cache", self.weight, torch.float32)

    def _apply(self, fn, recurse=True):
        # The correction bias stays fp32 under model.to(bf16): its +-0.001 steps vanish in bf16.
        bias = self._buffers.pop("e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            moved = fn(bias)
            if moved.dtype != torch.float32:
                moved = moved.float() if bias.is_meta else bias.to(device=moved.device, dtype=torch.float32)
            self._buffers["e_score_correction_bias"] = moved
        return self


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts, weights stacked for grouped computation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inter = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def expert_ffn(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its tokens x [n, H]. (The inference engine may swap in prepacked weights.)"""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    # Up to this many tokens (decode at small batch, speculative verification) run `_forward_few`.
    FEW_TOKENS = 4
    # Code being traced by torch.compile (the engine's compiled decode step) runs `_forward_traced`
    # up to TRACED_MAX_TOKENS tokens; its loop over tokens is unrolled over the smallest of these
    # slot counts that fits.
    TRACED_SLOTS = (1, 2, 4, 8)
    TRACED_MAX_TOKENS = TRACED_SLOTS[-1]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], idx/weights [N, k] -> (output [N, H], tokens per expert [E])."""
        N, k = idx.shape
        if torch.compiler.is_compiling() and N <= self.TRACED_MAX_TOKENS and not torch.is_grad_enabled():
            return self._forward_traced(x, idx, weights)
        if x.is_cuda and not torch.is_grad_enabled():
            fits = self._static_fits(N, k)
            if torch.cuda.is_current_stream_capturing():
                if not fits:  # the recording fails and the engine decodes on the plain path
                    raise NotImplementedError(f"{N} tokens x {k} experts exceed the static expert path's bounds "
                                              "(Experts.STATIC_MAX_*); not recordable as a CUDA graph")
                return self._forward_static(x, idx, weights)
            if fits and self._stacked_ffn:
                return self._forward_static(x, idx, weights)
        if N == 1 or (N <= self.FEW_TOKENS and not torch.is_grad_enabled()):
            return self._forward_few(x, idx, weights)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token_of = order // k
        if self._pairs_pay(x, N * k):
            return self._forward_paired(x, token_of, counts, weights.reshape(-1)[order]), counts
        xs = x.index_select(0, token_of)
        # Only the experts that received tokens are visited (<= N*k of them at decode, a handful of
        # the 256 in V3): their ids and row counts come from one nonzero() and two small lists.
        # split(), not slicing: each slice's backward would materialize a zero tensor the size of xs.
        active = counts.nonzero().squeeze(1)
        outs = [self.expert_ffn(e, seg)
                for e, seg in zip(active.tolist(), xs.split(counts[active].tolist()))]
        ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
        w = weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        ys = ys * w if torch.is_grad_enabled() else ys.mul_(w)  # in place saves a [N * k, H] buffer
        # ys may be bf16 under autocast while x is the fp32 residual stream.
        out = x.new_zeros(x.shape, dtype=ys.dtype).index_add_(0, token_of, ys)
        return out, counts

    # fp32 CPU inference with PAIR_MIN_ROWS to PAIR_MAX_ROWS rows per expert on average (a prefill of
    # a few hundred tokens) runs the experts two at a time; within it, an expert with more than
    # PAIR_MAX_ROWS rows runs alone (see _forward_paired).
    PAIR_MIN_ROWS = 8
    PAIR_MAX_ROWS = 96

    def _pairs_pay(self, x: torch.Tensor, picks: int) -> bool:
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.gate_up_proj.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and self.PAIR_MIN_ROWS * self.n_experts <= picks <= self.PAIR_MAX_ROWS * self.n_experts)

    def _forward_paired(self, x: torch.Tensor, token_of: torch.Tensor, counts: torch.Tensor,
                        w_sorted: torch.Tensor) -> torch.Tensor:
        """The grouped computation with experts paired up: one batched matmul (`bmm`) per pair.

        With 2 threads, one 64-row product splits its columns across both cores and pays a
        synchronization per call; a batch of two products gives each core a whole product. Measured
        on the 2-core machine (fp32, hidden 512, 64 rows): 11-14% less time per expert than two
        prepacked oneDNN calls (docs/engine.md). A pair's weights need no copy: any two experts
        e1 < e2 of the stacked [E, out, in] parameter are one strided view with batch stride
        (e2 - e1) * out * in. Experts of similar row counts are paired, so padding to the larger
        count wastes little; rows beyond PAIR_MAX_ROWS (where one large product already keeps both
        cores busy) and bf16 (whose strided bmm is slower than the packed products) are not paired.

        Tokens are gathered into a padded [pair, rows, H] layout (pad rows read token 0 and carry
        weight 0 into a dummy output row), so each token's sum runs in pair order rather than
        ascending expert order: the same terms, rounded in another order (~1e-7 relative).
        """
        E, H, I = self.n_experts, x.shape[-1], self.inter
        N = x.shape[0]
        cl = counts.tolist()
        small = sorted((e for e in range(E) if 0 < cl[e] <= self.PAIR_MAX_ROWS), key=lambda e: -cl[e])
        groups = [sorted(small[i:i + 2]) for i in range(0, len(small), 2)]
        groups += [[e] for e in range(E) if cl[e] > self.PAIR_MAX_ROWS]
        base = [0] * E  # padded row where expert e's first row goes
        spans = []  # (experts, rows per expert, first padded row)
        R = 0
        for g in groups:
            M = max(cl[e] for e in g)
            for slot, e in enumerate(g):
                base[e] = R + slot * M
            spans.append((g, M, R))
            R += len(g) * M
        dev = x.device
        expert_of = torch.repeat_interleave(torch.arange(E, device=dev), counts)  # expert of each sorted pick
        starts = counts.cumsum(0) - counts
        pos = torch.tensor(base, device=dev)[expert_of] + torch.arange(expert_of.shape[0], device=dev) - starts[expert_of]
        src = torch.zeros(R, dtype=torch.long, device=dev).index_copy_(0, pos, token_of)
        dst = torch.full((R,), N, dtype=torch.long, device=dev).index_copy_(0, pos, token_of)
        w_pad = torch.zeros(R, dtype=x.dtype, device=dev).index_copy_(0, pos, w_sorted.to(x.dtype))
        xs = x.index_select(0, src)
        ys = torch.empty_like(xs)
        for g, M, r0 in spans:
            rows = xs[r0:r0 + len(g) * M]
            if len(g) == 1:
                ys[r0:r0 + M] = self.expert_ffn(g[0], rows)
                continue
            n = len(g)
            gu = _stride_pair(self.gate_up_proj, g)
            h = torch.bmm(rows.view(n, M, H), gu.transpose(1, 2))
            gate, up = h.split(I, dim=-1)
            act = F.silu(gate).mul_(up)
            torch.bmm(act, _stride_pair(self.down_proj, g).transpose(1, 2), out=ys[r0:r0 + n * M].view(n, M, H))
        ys.mul_(w_pad.unsqueeze(-1))
        return x.new_zeros(N + 1, H).index_add_(0, dst, ys)[:N]

    def _forward_few(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouped computation below for a few tokens, without its sort, gather and scatter ops.

        The same numbers in the same order: each chosen expert runs once on the rows that chose it
        (in token order, as the stable sort gives them), is scaled by the same gate weights, and
        each token sums its experts' outputs in ascending expert order, in fp32, rounded once to
        the output dtype (what index_add_ into zeros computes on CPU, bf16 included).
        Bookkeeping is on Python lists (one .tolist()).
        """
        N, k = idx.shape
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts)
        idx_l = idx.tolist()
        w = None
        rows_of: dict[int, list[tuple[int, int]]] = {}
        for t in range(N):
            for j, e in enumerate(idx_l[t]):
                rows_of.setdefault(e, []).append((t, j))
        acc: list[torch.Tensor | None] = [None] * N
        for e in sorted(rows_of):
            ts = [t for t, _ in rows_of[e]]
            js = [j for _, j in rows_of[e]]
            # a lone row or all rows in order are slices; only other subsets need a gather
            if len(ts) == 1 or ts == list(range(N)):
                xs = x[ts[0]:ts[0] + len(ts)]
            else:
                xs = x[torch.tensor(ts, device=x.device)]
            y = self.expert_ffn(e, xs)
            if w is None:
                w = weights.to(y.dtype)
            y = y * (w[ts[0], js[0]] if len(ts) == 1 else w[ts, js].unsqueeze(-1))
            for i, t in enumerate(ts):
                acc[t] = y[i:i + 1] if acc[t] is None else acc[t].float() + y[i:i + 1].float()
        dtype = y.dtype
        out = acc[0] if N == 1 else torch.cat(acc)
        return out.to(dtype), counts

    def _forward_traced(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_forward_few` in a form `torch.compile(fullgraph=True)` can trace (the engine's compiled decode step).

        Each expert index becomes a graph scalar (`.item()`), so `gate_up_proj[e]` is a view of
        that one expert's weights: the step still reads only the chosen experts, with no Python
        in between. Same summation order as `_forward_few` (per token, ascending expert, fp32);
        an expert chosen by several tokens runs once per token rather than once on all of them.

        The loop over tokens is unrolled in the graph, so its length must not be the token count
        itself (one graph per batch size: a server's batch changes size all the time). It runs
        over 1, 2, 4 or 8 slots instead; the extra slots repeat the last token, whose experts
        were just read and are still in cache, and are dropped.
        """
        N, k = idx.shape
        slots = next(s for s in self.TRACED_SLOTS if N <= s)  # a range guard on N, not its value

        def padded(t: torch.Tensor) -> torch.Tensor:
            # append a fixed number of copies, then cut: a pad of `slots - N` rows would make the
            # graph depend on whether that is 0 or 1 (one graph per batch size again)
            return torch.cat((t, t[-1:].expand(slots, *t.shape[1:])))[:slots]

        order, perm = idx.sort(dim=-1)
        x, order, w = padded(x), padded(order), padded(weights.gather(1, perm))
        rows = []
        for t in range(slots):
            acc = None
            for j in range(k):
                e = order[t, j].item()
                torch._check(e >= 0)
                torch._check(e < self.n_experts)
                y = self.expert_ffn(e, x[t:t + 1])
                y = y * w[t, j].to(y.dtype)
                acc = y if acc is None else acc.float() + y.float()
            rows.append(acc.to(y.dtype))
        return (torch.cat(rows)[:N] if slots > 1 else rows[0]), self._counts(idx)

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Tokens per expert [E] without a host round trip (bincount's output size is data-dependent)."""
        flat = idx.reshape(-1)
        return torch.zeros(self.n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))

    @property
    def _stacked_ffn(self) -> bool:
        """Is `expert_ffn` this class's own (plain stacked weights), not a subclass's (FP8 weights)?"""
        return type(self).expert_ffn is Experts.expert_ffn

    # On a GPU, inference takes `_forward_static` (no host round trips, no per-expert launches: the
    # grouped path took ~25 and ~50 ms for `bench` prefills of 64 and 8 x 512 tokens on an H100)
    # while it stays within these bounds per MoE layer: expert weights read or gathered, FLOPs of
    # running every expert on every token (~1-2 ms on an H100), and intermediates. A CUDA graph
    # must use it, so a step beyond them is not recorded.
    STATIC_MAX_WEIGHT_BYTES = 1 << 30
    STATIC_MAX_FLOPS = 5e11
    STATIC_MAX_BYTES = 2 << 30

    def _static_gathers(self, N: int, k: int) -> bool:
        """Gather the N*k chosen experts (a copy: ~3x their bytes moved) rather than run all E."""
        return 3 * N * k <= self.n_experts

    def _static_fits(self, N: int, k: int) -> bool:
        E, I = self.n_experts, self.inter
        H = self.hidden if hasattr(self, "hidden") else self.gate_up_proj.shape[-1]
        expert_bytes = 3 * I * H * (2 if self._stacked_ffn else 1)  # 16-bit or fp8
        if self._static_gathers(N, k) and self._stacked_ffn:
            return N * k * expert_bytes <= self.STATIC_MAX_WEIGHT_BYTES
        return (E * expert_bytes <= self.STATIC_MAX_WEIGHT_BYTES and 6 * N * E * I * H <= self.STATIC_MAX_FLOPS
                and 4 * N * E * (2 * I + 2 * H) <= self.STATIC_MAX_BYTES)

    def _forward_static(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert computation with no host synchronization and a fixed sequence of kernels,
        whatever the routing: what a CUDA graph can record (engine/cudagraph.py).

        With at most a third as many (token, expert) pairs as experts, the chosen experts' weights are
        gathered (one copy of N*k experts) and run as batched matrix-vector products; otherwise every
        expert runs on every token and the gate weights (zero for experts not chosen) combine
        them. An expert class with its own `expert_ffn` (FP8 weights) takes the second form
        through that method. Each token sums its experts in fp32, as `_forward_few` does.
        """
        N, k = idx.shape
        E, I = self.n_experts, self.inter
        flat = idx.reshape(-1)
        counts = self._counts(idx)
        if self._stacked_ffn and self._static_gathers(N, k):
            gate_up = self.gate_up_proj.index_select(0, flat)  # [N*k, 2I, H]
            h = torch.bmm(x.repeat_interleave(k, dim=0)[:, None, :], gate_up.transpose(1, 2))  # [N*k, 1, 2I]
            gate, up = h.split(I, dim=-1)
            y = torch.bmm(F.silu(gate) * up, self.down_proj.index_select(0, flat).transpose(1, 2))[:, 0]  # [N*k, H]
            out = (y.view(N, k, -1).float() * weights[..., None].float()).sum(dim=1)
            return out.to(y.dtype), counts
        combine = torch.zeros(N, E, dtype=torch.float32, device=x.device).scatter_(1, idx, weights.float())
        if not self._stacked_ffn:
            out = None
            for e in range(E):
                y = self.expert_ffn(e, x)
                term = combine[:, e:e + 1] * y.float()
                out = term if out is None else out + term
            return out.to(y.dtype), counts
        h = torch.matmul(x[None], self.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
        gate, up = h.split(I, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, N, H]
        return torch.einsum("ne,enh->nh", combine, y.float()).to(y.dtype), counts


def _stride_pair(w: torch.Tensor, pair: list[int]) -> torch.Tensor:
    """Experts pair[0] < pair[1] of a stacked [E, out, in] weight as one [2, out, in] view (no copy)."""
    a, b = pair
    s0 = w.stride(0)
    return w.as_strided((2, *w.shape[1:]), ((b - a) * s0, *w.stride()[1:]), w.storage_offset() + a * s0)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None
        )
        # Tokens routed to each expert in the last forward (detached); the trainer's balancer reads it.
        self.last_expert_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, _ = self.gate(flat)
        routed, counts = self.experts(flat, idx, weights)
        self.last_expert_counts = counts.detach()
        out = routed.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
