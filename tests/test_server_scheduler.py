"""Continuous batching (`nanoseek.engine.scheduler.Scheduler`): sequences that join and leave the
running batch between steps get exactly the engine's own outputs (greedy, seeded sampling,
penalties, stop strings, logprobs, MTP speculation with k = 1 and 2); aborts free rows at once;
admission respects the batch size and the latent-cache budget."""

from __future__ import annotations

import random
import time

import pytest
import torch

import nanoseek
from conftest import TEST_DEVICE, randomize
from nanoseek.engine import Engine, SamplingError, SamplingParams
from nanoseek.engine.scheduler import Scheduler
from test_server_support import tokenizer_for


@pytest.fixture(scope="module")
def engine():
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 1, bias_std=0.05)
    return Engine(model, seed=0, tokenizer=tokenizer_for(1024), device=TEST_DEVICE)


def _workload(seed: int):
    g = random.Random(seed)
    prompts = [[g.randrange(7, 1024) for _ in range(g.randrange(1, 20))] for _ in range(10)]
    params = [SamplingParams(max_tokens=g.randrange(1, 24), temperature=0, ignore_eos=i % 2 == 0) for i in range(10)]
    params[3] = SamplingParams(max_tokens=16, temperature=1.0, seed=5, top_p=0.9, logprobs=2)
    params[5] = SamplingParams(max_tokens=16, temperature=0.7, seed=7, frequency_penalty=0.5, repetition_penalty=1.3)
    params[6] = SamplingParams(max_tokens=16, temperature=0, presence_penalty=1.0, logprobs=0)
    params[7] = SamplingParams(max_tokens=16, temperature=1.2, seed=11, top_k=20, min_p=0.05)
    return prompts, params


def _run_staggered(sched: Scheduler, prompts, params, every: int = 3):
    """Add one sequence every `every` steps (so they join a running batch); collect updates."""
    out: dict[int, list] = {}
    i = steps = 0
    while i < len(prompts) or sched.has_work:
        if i < len(prompts) and steps % every == 0:
            sched.add(i, prompts[i], params[i])
            i += 1
        for u in sched.step():
            out.setdefault(u.seq_id, []).append(u)
        assert sched.num_running <= sched.max_batch
        assert sched.cache_bytes_allocated <= sched.kv_cache_bytes
        steps += 1
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
def test_joining_and_leaving_gives_the_engines_outputs(engine, k):
    prompts, params = _workload(k)
    refs = [engine.generate(p, pr, speculative=k) for p, pr in zip(prompts, params)]
    sched = Scheduler(engine, max_batch=4, speculative=k)
    out = _run_staggered(sched, prompts, params)
    for i, ref in enumerate(refs):
        ups = out[i]
        assert [t for u in ups for t in u.token_ids] == ref.token_ids, i
        assert "".join(u.text for u in ups) == ref.text
        assert ups[-1].finish_reason == ref.finish_reason and all(not u.finished for u in ups[:-1])
        if ref.logprobs is not None:
            got = [x for u in ups for x in u.logprobs]
            assert got == pytest.approx(ref.logprobs, abs=1e-4)
        if ref.top_logprobs is not None:
            tops = [x for u in ups for x in u.top_logprobs]
            assert [list(t) for t in tops] == [list(t) for t in ref.top_logprobs]
    assert not sched.has_work and sched.cache_bytes_allocated == 0  # the pool is freed when idle
    if k:
        assert sched.stats.drafted > 0


@pytest.mark.parametrize("k", [0, 1])
def test_choices_of_one_prompt_share_its_prefill(engine, k):
    """n choices of one prompt (the server's n > 1) are prefilled once and copied, in any order
    among other joiners; each choice's output is still the engine's for its own parameters."""
    shared, other = [9, 8, 7, 6, 5, 4, 3, 20, 30, 40], [11, 12, 13]
    prompts = [shared, other, shared, shared]
    params = [SamplingParams(max_tokens=12, temperature=0, logprobs=1),
              SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=0),
              SamplingParams(max_tokens=12, temperature=0.8, seed=4, top_k=30)]
    refs = [engine.generate(p, pr, speculative=k) for p, pr in zip(prompts, params)]
    rows = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["input_ids"].shape if "input_ids" in kw else args[0].shape),
        with_kwargs=True)
    try:
        sched = Scheduler(engine, max_batch=4, speculative=k)
        for i, (p, pr) in enumerate(zip(prompts, params)):
            sched.add(i, p, pr)
        out = sched.run_until_done()
    finally:
        hook.remove()
    assert rows[0] == (2, len(shared))  # the prefill: one row per distinct prompt
    for i, ref in enumerate(refs):
        assert [t for u in out[i] for t in u.token_ids] == ref.token_ids, i
        if ref.logprobs is not None:
            assert [x for u in out[i] for x in u.logprobs] == pytest.approx(ref.logprobs, abs=1e-4)


def test_a_prefill_is_bounded_by_its_padded_size_and_choices_count_once(engine):
    # every row of a prefill is padded to the longest prompt: a long prompt does not take ten
    # short ones along (11 x 400 positions), and the n choices of one prompt are one row
    shapes = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape if "input_ids" in kw else args[0].shape)),
        with_kwargs=True)
    try:
        sched = Scheduler(engine, max_batch=16, max_prefill_tokens=512)
        p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        sched.add("long", list(range(3, 403)), p)
        for i in range(10):
            sched.add(i, [20 + i, 40, 50, 60], p)
        for j in range(4):  # n = 4
            sched.add(("n", j), list(range(500, 800)), p)
        out = sched.run_until_done()
    finally:
        hook.remove()
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(1, 400), (10, 4), (1, 300)]
    assert all(out[("n", j)][-1].finished for j in range(4)) and len(out) == 15


def test_stop_strings_through_the_scheduler(engine):
    prompt = engine.tokenizer.encode("Hello world", add_bos=True)
    full = engine.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True).text
    stop = full[10:13]
    ref = engine.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
    sched = Scheduler(engine, max_batch=2)
    sched.add("other", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    sched.step()
    sched.add("s", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=stop))
    out = sched.run_until_done()
    assert "".join(u.text for u in out["s"]) == ref.text == full[: full.index(stop)]
    assert out["s"][-1].finish_reason == "stop" and out["s"][-1].stop_reason == stop


def test_abort_frees_the_row_at_once_and_others_are_unaffected(engine):
    prompts = [[9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    refs = [engine.generate(x, p).token_ids for x in prompts]
    sched = Scheduler(engine, max_batch=3)
    for i, x in enumerate(prompts):
        sched.add(i, x, p)
    out: dict[int, list[int]] = {}

    def step():
        for u in sched.step():
            out.setdefault(u.seq_id, []).extend(u.token_ids)

    step()
    step()
    assert sched.num_running == 3 and sched.num_waiting == 1
    assert sched.abort(0)  # a running row (the first: the last row moves into its slot)
    assert sched.num_running == 2 and 0 not in [s.seq_id for s in sched.running]
    assert sched.cache_bytes_reserved == sum(s.reservation for s in sched.running) * sched.bytes_per_token
    assert sched.abort(3) and sched.num_waiting == 0  # a waiting one
    assert not sched.abort(3) and not sched.abort("unknown")
    while sched.has_work:
        step()
    assert out[1] == refs[1] and out[2] == refs[2]
    assert len(out[0]) < len(refs[0]) and 3 not in out
    assert sched.aborted_count == 2


def test_admission_by_cache_budget_and_batch_size(engine):
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    probe = Scheduler(engine).make_sequence("x", [5] * 10, p)
    budget = 2 * probe.reservation * probe_bpt(engine)  # room for exactly two such sequences
    sched = Scheduler(engine, max_batch=8, kv_cache_bytes=budget)
    for i in range(4):
        sched.add(i, [5 + i] * 10, p)
    out = {}
    for u in sched.step():
        out.setdefault(u.seq_id, []).extend(u.token_ids)
    assert sched.num_running == 2 and sched.num_waiting == 2  # the budget, not max_batch, limits
    assert sched.cache_bytes_allocated <= budget
    seen_running = set()
    while sched.has_work:
        for u in sched.step():
            out.setdefault(u.seq_id, []).extend(u.token_ids)
        assert sched.num_running <= 2 and sched.cache_bytes_allocated <= budget
        seen_running.add(sched.num_running)
    assert all(len(v) == 30 for v in out.values()) and len(out) == 4
    assert [engine.generate([5 + i] * 10, p).token_ids for i in range(4)] == [out[i] for i in range(4)]
    with pytest.raises(SamplingError, match="cache holds at most"):
        sched.make_sequence("big", [5] * (budget // probe_bpt(engine)), p)
    # max_batch limits when the budget does not
    sched = Scheduler(engine, max_batch=3)
    for i in range(5):
        sched.add(i, [7, 8], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    sched.step()
    assert sched.num_running == 3 and sched.num_waiting == 2


def test_the_pool_shrinks_back_within_the_budget_after_a_long_request(engine):
    # A long request grows the pool's capacity; once it is gone, more rows of short requests must
    # not be allocated at that old capacity (which would exceed the budget).
    bpt = probe_bpt(engine)
    sched = Scheduler(engine, max_batch=8, kv_cache_bytes=2000 * bpt)
    g = dict(temperature=0, ignore_eos=True)
    sched.add("long", [5, 6, 7], SamplingParams(max_tokens=890, **g))
    sched.add("short", [8, 9], SamplingParams(max_tokens=60, **g))
    out = {}
    for u in sched.step():
        out.setdefault(u.seq_id, []).extend(u.token_ids)
    assert sched.capacity >= 890
    sched.abort("long")
    for i in range(3):
        sched.add(f"c{i}", [10 + i, 11], SamplingParams(max_tokens=60, **g))
    most = 0
    while sched.has_work:
        for u in sched.step():
            out.setdefault(u.seq_id, []).extend(u.token_ids)
        assert sched.cache_bytes_allocated <= sched.kv_cache_bytes
        most = max(most, sched.num_running)
    assert most == 4  # the short rows ran together
    for sid, prompt in [("short", [8, 9])] + [(f"c{i}", [10 + i, 11]) for i in range(3)]:
        assert out[sid] == engine.generate(prompt, SamplingParams(max_tokens=60, **g)).token_ids


def test_growing_the_pool_stays_within_the_budget(engine):
    # the pool doubles as rows join (1 -> 2 -> 4 -> 8 slots): the old and the new pool must not
    # both be alive, or the memory in use passes the budget on the way
    import weakref

    bpt = probe_bpt(engine)
    budget = 8 * 256 * bpt
    sched = Scheduler(engine, max_batch=8, kv_cache_bytes=budget)
    live = {"now": 0, "peak": 0}
    make = sched._new_layer

    def tracked(slots, capacity):
        t = make(slots, capacity)
        n = t.numel() * t.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(t, lambda: live.__setitem__("now", live["now"] - n))
        return t

    sched._new_layer = tracked
    for i in range(8):
        sched.add(i, [7 + i] * 20, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        sched.step()
        sched.step()
    assert sched.slots == 8
    while sched.has_work:
        sched.step()
    layer = budget // sched.n_layers
    assert live["peak"] <= budget + layer, (live["peak"], budget)


def probe_bpt(engine) -> int:
    return engine.kv_cache_bytes_per_token()


def test_prefill_and_decode_alternate_and_zero_max_tokens(engine):
    sched = Scheduler(engine, max_batch=8)
    sched.add("a", [5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    sched.step()  # prefill a
    assert sched.prefill_steps == 1 and sched.stats.decode_forwards == 0
    sched.add("b", [8, 9], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    sched.step()  # a decode is due before the next prefill
    assert sched.prefill_steps == 1 and sched.stats.decode_forwards == 1
    sched.step()  # now b joins
    assert sched.prefill_steps == 2 and sched.num_running == 2
    sched.add("zero", [1, 2], SamplingParams(max_tokens=0))
    out = sched.run_until_done()
    assert [(u.token_ids, u.finish_reason) for u in out["zero"]] == [([], "length")]
    assert sum(len(u.token_ids) for u in out["a"]) == 8  # 10 - the prefill's token - the first decode's


def test_reset_after_a_failed_step(engine):
    sched = Scheduler(engine, max_batch=2)
    sched.add("a", [5, 6], SamplingParams(max_tokens=5, temperature=0))
    sched.add("b", [7], SamplingParams(max_tokens=5, temperature=0))
    sched.step()
    assert sorted(sched.reset()) == ["a", "b"] and not sched.has_work
    sched.add("c", [5, 6], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    out = sched.run_until_done()
    assert [t for u in out["c"] for t in u.token_ids] == engine.generate([5, 6], max_tokens=5, temperature=0,
                                                                        ignore_eos=True).token_ids


# ---- a failed prefill ends only its own sequences ------------------------------------------------------

POISON = 1000  # a token id: the prefill of a prompt holding it raises


class _FailingPrefill(torch.nn.Module):
    """The model, except that a forward over ids holding POISON raises (a prompt too large for the
    device's memory, say): every such forward, or only the ones numbered in `fail` (0 = the first
    with POISON). Decode steps go through the engine's own model, not this one."""

    def __init__(self, model, fail: set[int] | None = None):
        super().__init__()
        self.inner, self.fail = model, fail
        self.poisoned = 0
        self.calls = 0

    def forward(self, ids, **kw):
        self.calls += 1
        if bool((ids == POISON).any()):
            self.poisoned += 1
            if self.fail is None or self.poisoned - 1 in self.fail:
                raise RuntimeError("out of memory (test)")
        return self.inner(ids, **kw)


def _tokens(out, sid):
    return [t for u in out.get(sid, []) for t in u.token_ids]


def _steps(sched, out, n=None, forwards=None):
    """Step (n times, or to the end: at most 500), collecting updates; at most one prefill forward
    per step."""
    for _ in range(n if n is not None else 500):
        if not sched.has_work:
            return
        before = forwards.calls if forwards is not None else 0
        for u in sched.step():
            out.setdefault(u.seq_id, []).append(u)
        assert forwards is None or forwards.calls - before <= 1
    assert n is not None or not sched.has_work, "still running after 500 steps"


@pytest.mark.parametrize("k", [0, 1])
def test_a_failed_prefill_ends_only_its_own_sequence(engine, k):
    """The poisoned joiner and its neighbour fail together, go back to the queue, are prefilled
    one per step (the batch decodes in between); only the poisoned one ends, with an error update.
    The others' outputs are the engine's own, their counters count each token once."""
    sched = Scheduler(engine, max_batch=8, speculative=k, prefix_cache_bytes=None)
    sched.model = failing = _FailingPrefill(engine.model)
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = {"a": [5, 6, 7], "b": [8, 9], "poisoned": [11, POISON, 12], "d": [13, 14, 15, 16]}
    out: dict = {}
    for sid in ("a", "b"):
        sched.add(sid, prompts[sid], SamplingParams(**greedy))
    _steps(sched, out, 3)  # a and b are decoding when the next two join in one prefill
    sched.add("poisoned", prompts["poisoned"], SamplingParams(**greedy))
    sched.add("d", prompts["d"], SamplingParams(**greedy))
    _steps(sched, out, forwards=failing)
    [failed] = out["poisoned"]
    assert failed.error == "RuntimeError" and failed.finished and not failed.token_ids
    assert sched.failed_count == 1 and not sched.has_work and sched.cache_bytes_allocated == 0
    for sid in ("a", "b", "d"):  # the running batch went on, and the joiner beside the failed one too
        ref = engine.generate(prompts[sid], speculative=k, **greedy).token_ids
        assert _tokens(out, sid) == ref, sid
        assert out[sid][-1].finish_reason == "length" and out[sid][-1].error is None
    assert sched.stats.generated_tokens == 3 * 12 and sched.stats.prompt_tokens == 2 + 3 + 4


@pytest.mark.parametrize("where, k", [("_cat_q", 1), ("_combine", 0)])
def test_a_transient_failure_after_sampling_restarts_the_joiners(engine, monkeypatch, where, k):
    """A prefill can fail after its rows sampled their first tokens (the MTP drafts, or the join
    itself). The joiners restart from their prompts and get the engine's outputs; what the failed
    attempt counted is taken back (the prefix cache's too: it records and stores only after the
    join). The running rows' state is assigned only once the whole join is computed (failing in
    `_cat_q` used to leave the batch's positions longer than its rows)."""
    prefix = None if k else 1 << 24
    sched = Scheduler(engine, max_batch=8, speculative=k, prefix_cache_bytes=prefix)
    greedy = dict(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = dict(max_tokens=10, temperature=0.9, seed=3, logprobs=1, frequency_penalty=0.5, ignore_eos=True)
    prompts = {"a": [5, 6, 7], "x": [9, 10] * 20, "y": [11] * 33}
    out: dict = {}
    sched.add("a", prompts["a"], SamplingParams(**greedy))
    _steps(sched, out, 2)
    real, failed = getattr(Scheduler, where), []

    def once(self, *a):
        if not failed:
            failed.append(True)
            raise RuntimeError("late failure (test)")
        return real(self, *a)

    monkeypatch.setattr(Scheduler, where, once)
    sched.add("x", prompts["x"], SamplingParams(**greedy))
    sched.add("y", prompts["y"], SamplingParams(**seeded))
    _steps(sched, out)
    assert failed and sched.failed_count == 0 and not any(u.error for ups in out.values() for u in ups)
    assert _tokens(out, "a") == engine.generate(prompts["a"], speculative=k, **greedy).token_ids
    assert _tokens(out, "x") == engine.generate(prompts["x"], speculative=k, **greedy).token_ids
    ref = engine.generate(prompts["y"], speculative=k, **seeded)
    assert _tokens(out, "y") == ref.token_ids
    assert [x for u in out["y"] for x in u.logprobs] == pytest.approx(ref.logprobs, abs=1e-5)
    # each prompt counted once: the prefills of a, then x and y alone (the failed one taken back)
    assert sched.prefill_steps == 3 and sched.stats.prompt_tokens == 3 + 40 + 33
    assert sched.stats.generated_tokens == 30
    if prefix:
        assert (sched.prefix.queried_tokens, sched.prefix.hit_tokens) == (76, 0)
        assert all(u.num_cached_tokens == 0 for sid in ("x", "y") for u in out[sid])


def test_a_lone_failed_prefill_on_an_empty_batch_frees_the_pool(engine):
    sched = Scheduler(engine, max_batch=4)
    sched.model = _FailingPrefill(engine.model)
    sched.add("p", [11, POISON, 12], SamplingParams(max_tokens=5, temperature=0))
    [u] = sched.step()
    assert u.error == "RuntimeError" and not sched.has_work
    assert sched.cache_bytes_allocated == 0 and sched.stats.prompt_tokens == 0 and sched.prefill_steps == 0


def test_a_failure_after_joining_is_the_step_s(engine, monkeypatch):
    """Once the new rows are part of the batch they cannot be told apart: step raises (the server
    then fails every request and resets)."""
    sched = Scheduler(engine, max_batch=4)
    sched.add("a", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
    sched.step()
    sched.step()  # a's decode: the next step is a prefill

    def broken(self, *a, **kw):
        raise RuntimeError("after the join (test)")

    monkeypatch.setattr(Scheduler, "_collect", broken)
    sched.add("b", [8], SamplingParams(max_tokens=5, temperature=0))
    with pytest.raises(RuntimeError, match="after the join"):
        sched.step()
    assert len(sched.running) == 2 and sched.failed_count == 0
    assert sorted(sched.reset()) == ["a", "b"]


@pytest.mark.parametrize("fail, sibling_was", [({0, 1}, "waiting"), ({0, 2}, "running")])
def test_the_worker_ends_only_the_request_whose_prefill_failed(engine, fail, sibling_was):
    """The server's side: that request's reader gets GenerationFailed (a 500 with OpenAI's error JSON,
    or an error event in a stream), its other choice stops (still waiting to be prefilled alone, or
    already running), and every other request streams on to the engine's output."""
    import asyncio

    from nanoseek.server.worker import GenerationFailed, Worker

    sched = Scheduler(engine, max_batch=8)
    sched.model = _FailingPrefill(engine.model, fail)
    worker = Worker(sched)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def drain(stream) -> dict:
        got: dict = {}
        while not (stream.done and stream.queue.empty()):
            u = await stream.get(time.perf_counter() + 60)
            got.setdefault(u.seq_id, []).extend(u.token_ids)
        return got

    async def main():
        worker.start(asyncio.get_running_loop())
        try:
            good = worker.submit([sched.make_sequence("g", [5, 6, 7], greedy)])
            first = await good.get(time.perf_counter() + 60)  # "g" is in the batch
            # n = 2: the choices fail together, then one alone (the other then waits, or runs)
            bad = worker.submit([sched.make_sequence(f"p{i}", [11, POISON], greedy) for i in range(2)])
            with pytest.raises(GenerationFailed, match="generation failed: RuntimeError"):
                await drain(bad)
            other = worker.submit([sched.make_sequence("o", [8, 9], greedy)])
            rest, o = await drain(good), await drain(other)
            return first.token_ids + rest.get("g", []), o["o"]
        finally:
            worker.stop()

    g, o = asyncio.run(asyncio.wait_for(main(), 120))
    assert g == engine.generate([5, 6, 7], max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert o == engine.generate([8, 9], max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert worker.failed_requests == 1 and worker.failures == 0 and not sched.has_work
    assert (sched.failed_count, sched.aborted_count) == (1, 1)  # the other choice stopped with it
    assert sched.model.poisoned == max(fail) + 1  # ("waiting": the other choice was never prefilled)
