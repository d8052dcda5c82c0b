"""Routing as a pure function, including the one place transformers and DeepSeek's code disagreed."""

from __future__ import annotations

import torch

from nanoseek import preset
from nanoseek.model.moe import route


def _zero_fill_reference(logits, bias, cfg):
    """transformers' older DeepseekV3TopkRouter: dropped groups filled with 0.0 instead of -inf."""
    s = logits.sigmoid()
    sb = s + bias
    N, E = sb.shape
    g = sb.view(N, cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)
    keep = g.topk(cfg.topk_group, dim=-1).indices
    mask = torch.zeros_like(g).scatter_(1, keep, 1).bool()
    masked = sb.masked_fill(~mask.repeat_interleave(E // cfg.n_group, 1), 0.0)
    return masked.topk(cfg.num_experts_per_tok, dim=-1).indices


def test_agrees_with_zero_fill_when_kept_scores_are_positive():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g)
    bias = 0.1 * torch.randn(16, generator=g)  # sigmoid + small bias stays > 0
    _, idx, _ = route(logits, bias, cfg)
    ref = _zero_fill_reference(logits, bias, cfg)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


def test_negative_biased_scores_show_the_difference():
    """With biased scores <= 0 in kept groups, 0.0-filling picks experts from dropped groups; -inf never does."""
    cfg = preset("tiny", n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    logits = torch.zeros(1, 8)
    bias = torch.tensor([-0.6, -0.7, -0.8, -0.9, -1.0, -1.0, -1.0, -1.0])  # group 0 wins, all its s+b < 0
    _, idx, _ = route(logits, bias, cfg)
    assert set(idx[0].tolist()) <= {0, 1, 2, 3}
    ref = _zero_fill_reference(logits, bias, cfg)
    assert not set(ref[0].tolist()) <= {0, 1, 2, 3}


def test_weights_use_unbiased_scores_normalized_and_scaled():
    cfg = preset("tiny")
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    bias = torch.linspace(-0.3, 0.3, 8)
    w, idx, s = route(logits, bias, cfg)
    expected = s.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w, expected)
    assert torch.allclose(w.sum(-1), torch.full((5,), cfg.routed_scaling_factor))


def test_softmax_greedy_without_renormalization():
    cfg = preset("tiny", scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                 routed_scaling_factor=1.0)
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    w, idx, s = route(logits, None, cfg)
    top = logits.softmax(-1).topk(2, -1)
    assert torch.equal(idx.sort(-1).values, top.indices.sort(-1).values)
    assert torch.allclose(w.sort(-1).values, top.values.sort(-1).values)


def test_group_limit_respected():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    logits = torch.randn(200, 16, generator=torch.Generator().manual_seed(3))
    _, idx, _ = route(logits, torch.zeros(16), cfg)
    groups_used = (idx // 4).unique(dim=None, sorted=False) if False else [set((row // 4).tolist()) for row in idx]
    assert all(len(gs) <= 2 for gs in groups_used)


def test_few_token_expert_path_is_bitwise_the_grouped_path(monkeypatch):
    # decode and speculative verification (<= FEW_TOKENS rows, no grad) skip the sort/gather/scatter;
    # the numbers must be the grouped path's exactly, in fp32 and in bf16
    from nanoseek.model.moe import Experts

    torch.manual_seed(0)
    cfg = preset("tiny", num_experts_per_tok=3)  # three experts a token: the summation order matters
    for dtype in (torch.float32, torch.bfloat16):
        experts = Experts(cfg).to(dtype)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.1)
        for N in range(2, Experts.FEW_TOKENS + 1):  # (one token always takes the few path)
            for trial in range(20):
                x = torch.randn(N, cfg.hidden_size, dtype=dtype)
                idx = torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok] for _ in range(N)])
                if trial % 3 == 0:
                    idx[:] = idx[0]  # every row picks the same experts: the in-order slice case
                weights = torch.rand(N, cfg.num_experts_per_tok)
                with torch.no_grad():
                    few, counts = experts(x, idx, weights)
                    monkeypatch.setattr(Experts, "FEW_TOKENS", 0)
                    grouped, counts_g = experts(x, idx, weights)
                    monkeypatch.undo()
                assert torch.equal(counts, counts_g)
                assert few.dtype == grouped.dtype and torch.equal(few, grouped), (dtype, N, trial)


def test_paired_expert_path_matches_the_grouped_path(monkeypatch):
    """fp32 CPU inference with many rows per expert runs experts two at a time (one bmm per pair over
    a strided view of the stacked weights). Same results as one expert at a time, within rounding;
    an expert with more than PAIR_MAX_ROWS rows runs alone; training and bf16 never pair."""
    from nanoseek.model.moe import Experts

    torch.manual_seed(0)
    cfg = preset("tiny", n_routed_experts=16, num_experts_per_tok=3)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    used = []
    paired = Experts._forward_paired
    monkeypatch.setattr(Experts, "_forward_paired", lambda self, *a: used.append(1) or paired(self, *a))
    N = 200
    x = torch.randn(N, cfg.hidden_size)
    logits = torch.randn(N, cfg.n_routed_experts)
    logits[:150, 3] += 10  # expert 3 gets > PAIR_MAX_ROWS rows: it runs alone
    logits[:, 7] -= 10  # expert 7 gets none
    idx = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = torch.rand(N, cfg.num_experts_per_tok)
    with torch.no_grad():
        out, counts = experts(x, idx, weights)
        assert used and counts[3] > Experts.PAIR_MAX_ROWS and counts[7] == 0
        used.clear()
        monkeypatch.setattr(Experts, "PAIR_MIN_ROWS", 10**9)
        ref, counts_ref = experts(x, idx, weights)
        assert not used
    assert torch.equal(counts, counts_ref)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    monkeypatch.setattr(Experts, "PAIR_MIN_ROWS", 8)
    with torch.no_grad():  # > PAIR_MAX_ROWS rows per expert on average: one large product per expert
        big = torch.randint(0, cfg.n_routed_experts, (Experts.PAIR_MAX_ROWS * cfg.n_routed_experts + 1, 1))
        experts(torch.randn(big.shape[0], cfg.hidden_size), big, torch.ones(big.shape))
    assert not used
    experts(x, idx, weights).__getitem__(0).sum().backward()  # grad enabled: the plain grouped path
    with torch.no_grad():
        experts.to(torch.bfloat16)(x.bfloat16(), idx, weights)
    assert not used


def test_grouped_path_runs_each_chosen_expert_once_on_its_rows():
    # decode at batch > FEW_TOKENS and verification take the grouped path: with 256 experts and a
    # handful of tokens it must touch only the chosen experts, each once, on exactly its tokens
    from nanoseek.model.moe import Experts

    torch.manual_seed(0)
    cfg = preset("tiny", n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    N = Experts.FEW_TOKENS + 2
    x = torch.randn(N, cfg.hidden_size)
    idx = torch.stack([torch.randperm(256)[:8] for _ in range(N)])
    idx[1] = idx[0]  # two tokens share all their experts
    weights = torch.rand(N, 8)
    calls = []
    plain = Experts.expert_ffn

    def spy(self, e, rows):
        calls.append((e, rows.shape[0]))
        return plain(self, e, rows)

    experts.expert_ffn = spy.__get__(experts)
    with torch.no_grad():
        out, counts = experts(x, idx, weights)
    chosen = idx.reshape(-1).bincount(minlength=256)
    assert sorted(calls) == [(e, int(chosen[e])) for e in range(256) if chosen[e]]
    assert torch.equal(counts, chosen)
    ref = torch.stack([sum(weights[t, j] * plain(experts, int(idx[t, j]), x[t:t + 1])[0] for j in range(8))
                       for t in range(N)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
