"""CUDA-graph decoding (engine/cudagraph.py) and the pieces that make a step recordable.

The recordable pieces (the experts' static path, attention over a fixed cache span) are checked on
the CPU against the ordinary paths; the graphs themselves need a CUDA GPU, and those tests skip
without one.
"""

from __future__ import annotations

import pytest
import torch

import nanoseek
from conftest import random_experts, randomize
from nanoseek.engine import Engine, SamplingError
from nanoseek.engine.cudagraph import MIN_ATTEND, attend_bucket
from nanoseek.model.moe import Experts

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("N", [1, 3, 8])  # N*k below E (gathered experts), and at or above it (all experts)
def test_static_experts_equal_the_ordinary_path(N):
    cfg = nanoseek.preset("tiny")  # 8 experts, 2 per token
    gen = torch.Generator().manual_seed(N)
    ex = random_experts(cfg, gen, 0.2)
    x = torch.randn(N, cfg.hidden_size, generator=gen)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:2] for _ in range(N)])
    w = torch.rand(N, 2, generator=gen)
    with torch.no_grad():
        ref, ref_counts = ex(x, idx, w)
        out, counts = ex._forward_static(x, idx, w)
    assert torch.equal(counts, ref_counts)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_static_experts_use_a_subclass_expert_ffn():
    """An expert class with its own expert_ffn (FP8 weights) is run through that method."""
    cfg = nanoseek.preset("tiny")
    gen = torch.Generator().manual_seed(0)
    ex = random_experts(cfg, gen, 0.2)
    calls = []

    class Doubled(Experts):
        def expert_ffn(self, e, x):
            calls.append(e)
            return 2 * super().expert_ffn(e, x)

    dbl = Doubled(cfg)
    dbl.load_state_dict(ex.state_dict())
    x = torch.randn(2, cfg.hidden_size, generator=gen)
    idx, w = torch.tensor([[0, 5], [5, 7]]), torch.rand(2, 2, generator=gen)
    with torch.no_grad():
        out, _ = dbl._forward_static(x, idx, w)
        ref, _ = ex(x, idx, w)
    assert sorted(set(calls)) == list(range(cfg.n_routed_experts))
    assert torch.allclose(out, 2 * ref, atol=1e-5)


def test_attending_over_a_fixed_cache_span_equals_the_exact_span(monkeypatch):
    """With cache.attend_len set, rows at different positions attend over a fixed number of slots
    (stale and future slots masked): the same logits as attending up to the furthest row."""
    from nanoseek.model.attention import MLA

    spans = []
    absorbed = MLA.forward_absorbed
    monkeypatch.setattr(MLA, "forward_absorbed", lambda self, qn, qp, cached, pos: (
        spans.append(cached.shape[1]), absorbed(self, qn, qp, cached, pos))[1])
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (2, 12), generator=gen)
    with torch.no_grad():
        outs = []
        for span in (None, 40):
            cache = model.new_cache(2, 64)
            cache.layers = [t.normal_(generator=torch.Generator().manual_seed(9)) for t in cache.layers]  # stale slots
            model(ids[:, :9], cache=cache)
            pos = torch.tensor([5, 9])  # row 0 rewinds: its slots 5.. are stale
            cache.attend_len = span
            outs.append(model(ids[:, 9:12], start_pos=pos, cache=cache).logits)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert set(spans) == {12, 40}  # the furthest row's end, then the fixed span


def test_attend_buckets():
    assert attend_bucket(1, 4096) == MIN_ATTEND
    assert attend_bucket(MIN_ATTEND + 1, 4096) == 2 * MIN_ATTEND
    assert attend_bucket(600, 4096) == 1024
    assert attend_bucket(3000, 3100) == 3100  # never past the cache
    assert all(attend_bucket(e, 10_000) >= e for e in range(1, 5000, 37))


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(SamplingError, match="CUDA device"):
        Engine("tiny", cuda_graphs=True)
    assert Engine("tiny").graphs is None  # default: only on CUDA


# -- on a GPU ------------------------------------------------------------------------------------

def _engines(dtype="fp32", **kw):
    torch.manual_seed(0)
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 1, bias_std=0.05)
    plain = Engine(model, device="cuda", dtype=dtype, cuda_graphs=False, tokenizer=None, **kw)
    graphed_model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    graphed_model.load_state_dict(model.state_dict())
    graphed = Engine(graphed_model, device="cuda", dtype=dtype, tokenizer=None, **kw)
    return plain, graphed


PROMPTS = [[1, 5, 9, 200, 7], [3] * 11, [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17, 18]]


@needs_cuda
def test_graphed_greedy_decode_equals_the_plain_step():
    plain, graphed = _engines()
    assert graphed.graphs is not None
    for prompts in (PROMPTS[:1], PROMPTS):  # batch 1, and rows at different positions
        a = plain.generate(prompts, max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
        b = graphed.generate(prompts, max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
        for ra, rb in zip(a, b):
            assert ra.token_ids == rb.token_ids
            assert max(abs(x - y) for x, y in zip(ra.logprobs, rb.logprobs)) <= 1e-4
    assert graphed.graphs.failed is None and graphed.graphs.recorded > 0


@needs_cuda
@pytest.mark.parametrize("k", [1, 2])
def test_graphed_speculative_greedy_equals_plain_greedy(k):
    plain, graphed = _engines()
    ref = plain.generate(PROMPTS, max_tokens=30, temperature=0, ignore_eos=True)
    out = graphed.generate(PROMPTS, max_tokens=30, temperature=0, ignore_eos=True, speculative=k)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    assert graphed.last_stats.drafted > 0 and graphed.graphs.failed is None


@needs_cuda
def test_graphed_sampling_follows_the_seed():
    plain, graphed = _engines()
    kw = dict(max_tokens=25, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    assert [r.token_ids for r in graphed.generate(PROMPTS, **kw)] == [r.token_ids for r in plain.generate(PROMPTS, **kw)]


@needs_cuda
def test_graphs_are_reused_across_calls_and_follow_weight_updates():
    _, graphed = _engines()
    graphed.generate(PROMPTS[:1], max_tokens=20, temperature=0, ignore_eos=True)
    n = graphed.graphs.recorded
    graphed.generate(PROMPTS[:1], max_tokens=20, temperature=0, ignore_eos=True)
    assert graphed.graphs.recorded <= n + 1  # the allocator usually hands the new cache the same memory
    with torch.no_grad():  # an in-place update (as an optimizer step) is read by the recorded graph
        graphed.model.lm_head.weight.mul_(-1.0)
    after = graphed.generate(PROMPTS[:1], max_tokens=20, temperature=0, ignore_eos=True)[0].token_ids
    plain = Engine(graphed.model, cuda_graphs=False, tokenizer=None)
    assert after == plain.generate(PROMPTS[:1], max_tokens=20, temperature=0, ignore_eos=True)[0].token_ids


@needs_cuda
def test_a_step_that_cannot_be_recorded_falls_back_with_a_warning(monkeypatch):
    plain, graphed = _engines()
    from nanoseek.model import moe

    def host_read(self, x, idx, weights):
        return self._forward_few(x, idx, weights)  # reads the routing back to the host: not recordable

    monkeypatch.setattr(moe.Experts, "_forward_static", host_read)
    with pytest.warns(RuntimeWarning, match="CUDA graph recording failed"):
        out = graphed.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True)
    ref = plain.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    assert graphed.graphs.failed is not None


@needs_cuda
def test_gpu_engine_equals_the_cpu_engine():
    """The GPU paths (static experts in prefill and decode, graphs) against the CPU engine, fp32."""
    torch.manual_seed(0)
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 1, bias_std=0.05)
    cpu = Engine(model, tokenizer=None)
    ref = [r.token_ids for r in cpu.generate(PROMPTS, max_tokens=24, temperature=0, ignore_eos=True)]
    gpu_model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    gpu_model.load_state_dict(model.state_dict())
    for graphs in (False, True):
        gpu = Engine(gpu_model, device="cuda", tokenizer=None, cuda_graphs=graphs)
        assert [r.token_ids for r in gpu.generate(PROMPTS, max_tokens=24, temperature=0, ignore_eos=True)] == ref


def test_static_expert_path_bounds():
    """The static path (every CUDA-graph step, and GPU inference within bounds) gathers only while
    that moves fewer bytes than running every expert, and refuses sizes it cannot do cheaply:
    a graph of such a step is not recorded (the engine decodes on the plain path)."""
    def experts(name):
        with torch.device("meta"):
            return Experts(nanoseek.preset(name))

    bench, v3 = experts("bench"), experts("deepseek-v3")  # E=32 k=4; E=256 k=8
    assert bench._static_gathers(2, 4) and not bench._static_gathers(3, 4)
    assert all(bench._static_fits(n, 4) for n in (1, 8, 32, 4096))
    assert not bench._static_fits(16384, 4)  # every expert on 16K tokens: 3.2 GB of intermediates
    assert v3._static_fits(1, 8)  # 8 experts gathered: 0.66 GiB
    assert not v3._static_fits(8, 8) and not v3._static_fits(64, 8)  # 64 gathered / all 256 read: too many bytes


@needs_cuda
def test_a_step_beyond_the_static_bounds_is_not_recorded(monkeypatch):
    plain, graphed = _engines()
    monkeypatch.setattr(Experts, "STATIC_MAX_WEIGHT_BYTES", 0)
    with pytest.warns(RuntimeWarning, match="CUDA graph recording failed"):
        out = graphed.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True)
    ref = plain.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


def test_graph_table_keys_reuse_and_eviction(monkeypatch):
    """The bookkeeping around recording, on the CPU with a stand-in for the recorder: one graph per
    kind, shape, span and cache layout; reused on a hit (inputs copied in, outputs copied out);
    the least recently used dropped past MAX_GRAPHS; an end hint saves the device read."""
    from nanoseek.engine.cudagraph import CudaGraphDecode

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    graphs = CudaGraphDecode(model)
    recorded = []

    class Replay:
        def __init__(self, static_in, out):
            self.static_in, self.out = static_in, out

        def replay(self):  # "the graph": writes a function of its static inputs into its outputs
            self.out.copy_(self.static_in[0].float().sum() + self.static_in[-1].float().sum())

    def record(fn, inputs, span, cache):
        recorded.append((fn.__name__, span, tuple(t.shape for t in inputs)))
        static_in = tuple(t.clone() for t in inputs)
        out = torch.zeros(())
        return static_in, Replay(static_in, out), (out,)

    monkeypatch.setattr(graphs, "_record", record)
    cache = model.new_cache(2, 600)
    ids = torch.tensor([[3], [4]])
    (a,) = graphs._run_here("forward", lambda *a: None, (ids,), 5, 1, cache, None)
    assert float(a) == 3 + 4 + 5 + 5 and recorded[-1][1] == 128  # positions 5: span 128
    (b,) = graphs._run_here("forward", lambda *a: None, (ids + 1,), 6, 1, cache, None)
    assert float(b) == 4 + 5 + 6 + 6 and len(recorded) == 1  # same key: replayed with the new inputs
    assert float(a) == 17  # outputs are copies: a later replay does not change them
    graphs._run_here("forward", lambda *a: None, (ids,), torch.tensor([100, 200]), 1, cache, 201)
    assert recorded[-1][1] == 256 and len(recorded) == 2  # per-row positions, span from the end hint
    other = model.new_cache(2, 600)
    graphs._run_here("forward", lambda *a: None, (ids,), 5, 1, other, None)
    assert len(recorded) == 3  # another cache's memory: another graph
    monkeypatch.setattr(CudaGraphDecode, "MAX_GRAPHS", 3)
    graphs._run_here("forward", lambda *a: None, (ids,), 5, 1, cache, None)  # a hit: now most recent
    graphs._run_here("mtp", lambda *a: None, (ids,), 5, 1, cache, None)  # a 4th: evicts the least recent
    assert len(graphs._graphs) == 3 and len(recorded) == 4
    graphs._run_here("forward", lambda *a: None, (ids,), torch.tensor([100, 200]), 1, cache, 201)
    assert len(recorded) == 5  # it was the least recently used one, so it is recorded again
    graphs._run_here("forward", lambda *a: None, (ids,), 5, 1, cache, None)
    assert len(recorded) == 5
    with pytest.raises(ValueError, match="cache holds 600 positions"):
        graphs._run_here("forward", lambda *a: None, (ids,), 600, 1, cache, None)


def test_graphs_are_dropped_when_weights_are_replaced():
    """A graph reads the memory its weights had when it was recorded: in-place updates are seen,
    but weights replaced by new tensors must drop the graphs (refresh, at every generate call)."""
    from nanoseek.engine.cudagraph import CudaGraphDecode

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    graphs = CudaGraphDecode(model)
    graphs.refresh()
    graphs._graphs["stand-in"] = ()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the same memory
    graphs.refresh()
    assert "stand-in" in graphs._graphs
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # new tensors
    graphs.refresh()
    assert not graphs._graphs
    graphs._graphs["stand-in"] = ()
    model.to(torch.bfloat16)
    graphs.refresh()
    assert not graphs._graphs


def test_static_experts_with_fp8_weights():
    """FP8-held experts (keep_fp8) under a CUDA graph take the all-experts form through their own
    expert_ffn: the same output as their ordinary path, and their size bound counts FP8 bytes
    without dequantizing the stack."""
    from nanoseek.fp8_linear import FP8InferenceExperts

    cfg = nanoseek.preset("tiny")
    gen = torch.Generator().manual_seed(3)
    fp8 = FP8InferenceExperts.from_experts(random_experts(cfg, gen, 0.2))
    x = torch.randn(3, cfg.hidden_size, generator=gen)
    idx, w = torch.tensor([[0, 5], [5, 7], [1, 2]]), torch.rand(3, 2, generator=gen)
    with torch.no_grad():
        ref, ref_counts = fp8(x, idx, w)
        out, counts = fp8._forward_static(x, idx, w)
    assert torch.equal(counts, ref_counts)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert fp8._static_fits(3, 2)
