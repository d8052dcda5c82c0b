"""Prefix caching (engine/prefix_cache.py, the scheduler's `prefix_cache_bytes`, `serve
--enable-prefix-caching`).

Oracles: the store's lookups against a brute-force longest stored prefix (hypothesis); outputs
with the cache against the engine's one-by-one outputs without it (greedy tokens equal, logprobs
within 1e-4), for prompts that share a system prompt, a chat's second turn, and batches mixing
hits and misses; the server through the `openai` client, its /metrics counting the hits.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.engine import Engine, SamplingError
from nanoseek.engine.prefix_cache import PrefixCache
from nanoseek.engine.scheduler import Scheduler

# ---- the store ---------------------------------------------------------------------------------------


def _rows(tokens: list[int], layers: int = 2, dim: int = 3) -> list[torch.Tensor]:
    """A fake cache whose row 0 holds, at each position, a value made of that position's whole
    prefix: a block copied from the wrong prefix would show."""
    out = []
    for layer in range(layers):
        vals = torch.tensor([float(hash((layer, tuple(tokens[:i + 1]))) % 1000) for i in range(len(tokens))])
        out.append(vals[None, :, None].expand(1, len(tokens), dim).clone())
    return out


@settings(max_examples=200, deadline=None, derandomize=True)
@given(stored=st.lists(st.lists(st.integers(0, 2), max_size=14), max_size=6),
       query=st.lists(st.integers(0, 2), min_size=1, max_size=14))
def test_lookup_is_the_longest_stored_block_prefix(stored, query):
    cache = PrefixCache(2, 3, max_bytes=1 << 20, block=2)
    for seq in stored:
        cache.store(seq, _rows(seq), 0)
    hit = cache.lookup(query)
    # brute force: the most whole blocks of the query (one token short of it) that some stored
    # sequence began with
    best = max((m for seq in stored for m in range(0, (len(query) - 1) // 2 + 1)
                if len(seq) >= 2 * m and seq[:2 * m] == query[:2 * m]), default=0)
    assert len(hit) == best
    out = [torch.zeros(1, 16, 3) for _ in range(2)]
    cache.fill(hit, out, 0)
    want = _rows(query)
    for o, w in zip(out, want):
        assert torch.equal(o[0, :2 * best], w[0, :2 * best])


def test_the_budget_drops_least_recently_used_blocks_and_their_followers():
    cache = PrefixCache(1, 4, max_bytes=3 * 4 * 4 * 2, block=2)  # 3 blocks of 2 tokens, float32
    a, b = [1, 2, 3, 4, 5], [7, 8, 9, 9, 5]
    assert cache.store(a, _rows(a, 1, 4), 0) == 2
    assert cache.lookup(a + [0]) and len(cache.lookup(a)) == 2
    assert cache.store(b, _rows(b, 1, 4), 0) == 2  # one of a's blocks must go: the older first
    assert cache.bytes_used <= cache.max_bytes and len(cache) == 2
    assert cache.lookup(a) == [] and len(cache.lookup(b)) == 2  # a's second block went with its first
    with pytest.raises(ValueError, match="holds no block"):
        PrefixCache(1, 4, max_bytes=10, block=2)
    # a sequence longer than the budget keeps its first blocks rather than evicting them for its
    # later ones (which would then hang from a parent no longer stored)
    long = list(range(20))
    assert cache.store(long, _rows(long, 1, 4), 0) == 3 and len(cache.lookup(long)) == 3
    # an evicted block leaves its parent's list of followers (a shared first block must not
    # collect the keys of every continuation ever evicted)
    for k in range(50):
        seq = [1, 2, 100 + k, 100 + k]
        cache.store(seq, _rows(seq, 1, 4), 0)
    first = cache.lookup([1, 2, 0])[0]
    assert len(first.children) <= len(cache) <= 3


def test_each_block_owns_its_memory_and_a_failed_copy_stores_nothing(monkeypatch):
    """The new blocks of a sequence are copied out together (one gather, one multi-tensor copy), but
    into a tensor per block: a view of a shared one would keep all of it alive after its block was
    evicted, past the budget. A copy that fails leaves no block without data behind."""
    monkeypatch.setattr(PrefixCache, "COPY_BLOCKS", 2)  # (gathered 2 blocks at a time: its scratch memory is bounded)
    cache = PrefixCache(2, 3, max_bytes=1 << 20, block=2, dtype=torch.float64)
    seq = list(range(11))
    assert cache.store(seq, _rows(seq), 0) == 5
    blocks = cache.lookup(seq)
    out = [torch.zeros(1, 12, 3, dtype=torch.float64) for _ in range(2)]
    cache.fill(blocks, out, 0)
    assert all(torch.equal(o[0, :10], w[0, :10].double()) for o, w in zip(out, _rows(seq)))
    assert len({b.data.untyped_storage().data_ptr() for b in blocks}) == 5
    assert all(b.data._base is None and b.data.dtype == torch.float64 and b.data.shape == (2, 2, 3) for b in blocks)
    assert all(b.data.untyped_storage().nbytes() == cache.block_bytes for b in blocks)

    def broken(*a):
        raise RuntimeError("out of memory (test)")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    longer = seq + [20, 21, 22, 23]
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.store(longer, _rows(longer), 0)
    assert len(cache) == 5 and all(b.data is not None for b in cache._blocks.values())
    assert len(cache.lookup(longer)) == 5


# ---- the scheduler against the engine ---------------------------------------------------------------

from conftest import TEST_DEVICE  # noqa: E402
from test_server_support import random_model_dir  # noqa: E402

SYSTEM = "You are a careful assistant. Answer in one short sentence, in plain English, and cite nothing. " * 2


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(str(random_model_dir(tmp_path_factory.mktemp("prefix"))), seed=0, device=TEST_DEVICE)


def _run(sched: Scheduler, batches: list[list[tuple[str, list[int] | str]]]) -> dict:
    """Add each batch, run it to the end; {id: (tokens, logprobs)}."""
    out = {}
    for batch in batches:
        for sid, prompt in batch:
            sched.add(sid, prompt, max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
        for sid, ups in sched.run_until_done().items():
            out[sid] = ([t for u in ups for t in u.token_ids], [x for u in ups for x in (u.logprobs or [])])
    return out


def _check(engine: Engine, prompts: dict, got: dict) -> None:
    for sid, prompt in prompts.items():
        ref = engine.generate(prompt, max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
        assert got[sid][0] == ref.token_ids, sid
        assert got[sid][1] == pytest.approx(ref.logprobs, abs=1e-4), sid


def test_shared_prefixes_and_a_second_turn_equal_the_engine(engine):
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=1 << 24)
    first = {"a": SYSTEM + "What is a cat?", "b": SYSTEM + "Name a river."}
    got = _run(sched, [[("a", first["a"])]])
    turn1 = engine.encode(first["a"]) + got["a"][0]
    later = {"b": first["b"],  # the system prompt: a hit
             "c": turn1 + engine.encode(" And a dog?", add_bos=False),  # prompt + answer: a longer hit
             "d": "No shared start at all, a miss."}
    got |= _run(sched, [list(later.items())])  # hits and a miss in one prefill
    _check(engine, first | later, got)
    p = sched.prefix
    assert p.hit_tokens >= len(turn1) // p.block * p.block  # the whole first turn came from the store
    looked_up = [first["a"], *later.values()]
    assert p.bytes_used > 0 and p.queried_tokens == sum(len(engine.encode(x)) for x in looked_up)


def test_a_joiner_with_a_hit_enters_a_running_batch(engine):
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=1 << 24)
    prompts = {"x": SYSTEM + "First question?", "y": SYSTEM + "Second question, longer than the first one?"}
    sched.add("x", prompts["x"], max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    ups: dict = {}
    steps = 0
    while sched.has_work:
        for u in sched.step():
            ups.setdefault(u.seq_id, []).append(u)
        steps += 1
        if steps == 3:  # x is decoding: y joins with x's system prompt from the store
            sched.add("y", prompts["y"], max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    assert sched.prefix.hit_tokens > 0
    _check(engine, prompts, {k: ([t for u in v for t in u.token_ids], [x for u in v for x in (u.logprobs or [])])
                             for k, v in ups.items()})


def test_a_late_hit_beside_a_longer_rest_stays_within_the_pool(engine):
    """Review regression: one prefill pads every row to the longest rest, so a row that starts
    late (a 96-token hit) beside a row with a long rest wrote past the pool (a crash that failed the
    batch); the late row now starts early enough to fit."""
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=1 << 24)
    warm = list(range(2, 102))
    _run(sched, [[("warm", warm)]])
    prompts = {"hit": warm + [5, 6], "longer rest": warm[:64] + [7] * 40}
    block = sched.prefix.block
    assert [len(sched._usable_hit(p)) * block for p in prompts.values()] == [96, 64]
    starts = []
    real = sched._prefix_starts
    sched._prefix_starts = lambda lens, st: starts.append(list(st)) or real(lens, st)
    _check(engine, prompts, _run(sched, [list(prompts.items())]))
    assert starts == [[96, 64]] and sched.capacity < 96 + 40  # (one prefill, and 96 + 40 would not fit)


def test_an_empty_store_still_reports_its_counters(engine):
    """PrefixCache has a length, so an empty store is falsy: the metrics snapshot read `if s.prefix`
    and reported 0 hit tokens after the store was emptied (a Prometheus counter going back), and the
    serve banner left out the prefix cache until its first block."""
    from nanoseek.server.worker import Worker

    sched = Scheduler(engine, max_batch=2, prefix_cache_bytes=1 << 24)
    stem = list(range(2, 66))
    _run(sched, [[("a", stem + [3])], [("b", stem + [4])]])
    hits = sched.prefix.hit_tokens
    assert hits > 0
    sched.prefix.clear()  # (as when the weights change)
    assert len(sched.prefix) == 0
    snap = Worker(sched)._snapshot()
    assert snap["prefix_hit"] == hits and snap["prefix_queried"] == sched.prefix.queried_tokens


def test_a_short_hit_on_a_long_prompt_is_computed_whole_and_apart_from_hits(engine, monkeypatch):
    """The rest of a prompt after a hit runs on the absorbed path, which reads every cached position
    for each query: a short hit on a long prompt costs more than the whole prompt cold (bench, 3,000
    tokens, 25% cached: 1.81 s against 0.51 s), and a row with a hit used to take every row of its
    prefill onto that path. Short hits are now ignored, and hit and cold rows prefill apart."""
    from nanoseek.model.attention import MLA

    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=1 << 24)
    stem = list(range(2, 66))  # 64 tokens
    _run(sched, [[("stem", stem + [3])]])
    long_tail = stem[:16] + [9] * 300  # 16 cached of 316
    assert sched._usable_hit(long_tail) == [] and len(sched.prefix.lookup(long_tail)) == 1
    absorbed_rows = []
    real = MLA.forward_absorbed
    monkeypatch.setattr(MLA, "forward_absorbed", lambda self, qn, qp, c, pos: (
        absorbed_rows.append(qn.shape[1]), real(self, qn, qp, c, pos))[1])
    prompts = {"hit": stem + [4, 5, 6], "cold": [8] * 120, "short hit, long prompt": long_tail}
    before = sched.prefill_steps
    got = _run(sched, [list(prompts.items())])
    assert sched.prefill_steps - before == 2  # the hit, then the two cold prompts together
    assert max(absorbed_rows) <= 3  # the hit's rest (and decode steps): no cold prompt on the absorbed path
    _check(engine, prompts, got)
    # a short cold prompt shares the hit's prefill (on the absorbed path it costs little more), so
    # alternating hits and short cold prompts do not take one prefill each
    short = {"hit 2": stem + [7, 8], "short cold": [6] * 30, "hit 3": stem + [9], "short cold 2": [5] * 20}
    assert sched._absorbed_cost * 30 <= 0.25  # (MIX_SLACK)
    before = sched.prefill_steps
    got = _run(sched, [list(short.items())])
    assert sched.prefill_steps - before == 1
    _check(engine, short, got)
    # but not beside a hit on a long prompt: every query of a mixed prefill reads up to the
    # furthest row's end, so the short cold prompt would attend over the whole long history
    long_stem = list(range(100, 300))
    _run(sched, [[("long stem", long_stem + [3])]])
    mixed = {"long hit": long_stem + [7, 8], "short cold 3": [4] * 20}
    assert sched._usable_hit(mixed["long hit"]) and sched._absorbed_cost * len(mixed["long hit"]) > 0.25
    before = sched.prefill_steps
    got = _run(sched, [list(mixed.items())])
    assert sched.prefill_steps - before == 2
    _check(engine, mixed, got)


class _NoIntReads(torch.nn.Module):
    """The model, refusing `int(tensor)` during its forward (how attention read a position back)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids, **kw):
        own = vars(torch.Tensor).get("__int__")  # (inherited from TensorBase unless set here)

        def refuse(t):
            raise AssertionError("a position read back from the device inside the prefill")

        torch.Tensor.__int__ = refuse
        try:
            return self.inner(ids, **kw)
        finally:
            if own is None:
                del torch.Tensor.__int__
            else:
                torch.Tensor.__int__ = own


def test_the_prefill_after_a_hit_reads_no_position_back_from_the_device(engine):
    """Rows that start at different positions are written up to the furthest one, which the
    scheduler knows; each attention layer used to read it off the device instead
    (`int(pos.max())`): a GPU sync per layer, the queued launches stalled at each. (The MoE layers'
    grouped path still reads its token counts.)"""
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=1 << 24)
    greedy = dict(max_tokens=3, temperature=0, logprobs=0, ignore_eos=True)
    stem = list(range(5, 5 + 64))
    sched.add("stem", stem + [3], **greedy)
    sched.run_until_done()
    sched.model = _NoIntReads(engine.model)
    sched.add("a", stem + [7, 8], **greedy)
    sched.add("b", stem[:32] + [9] * 40, **greedy)
    out = sched.run_until_done()
    assert [out[s][-1].error for s in "ab"] == [None, None]
    assert out["a"][0].num_cached_tokens == 64 and out["b"][0].num_cached_tokens == 32
    for sid, prompt in (("a", stem + [7, 8]), ("b", stem[:32] + [9] * 40)):
        ref = engine.generate(prompt, **greedy)
        assert [t for u in out[sid] for t in u.token_ids] == ref.token_ids
        assert [x for u in out[sid] for x in u.logprobs] == pytest.approx(ref.logprobs, abs=1e-4)


def test_cached_prefixes_do_not_count_against_the_prefill_budget(engine):
    """Joiners whose prompts the cache mostly holds are prefilled together: only the tokens left
    to compute count against max_prefill_tokens."""
    shared = list(range(3, 403))
    counts = {}
    for cache in (None, 1 << 24):
        sched = Scheduler(engine, max_batch=8, prefix_cache_bytes=cache, max_prefill_tokens=512)
        _run(sched, [[("warm", shared + [5])]])
        before = sched.prefill_steps
        prompts = {i: shared + [10 + i, 11] for i in range(4)}
        got = _run(sched, [list(prompts.items())])
        counts[cache] = sched.prefill_steps - before
    _check(engine, prompts, got)
    assert counts == {None: 4, 1 << 24: 1}


def test_changed_weights_empty_the_cache(tmp_path):
    """Blocks computed with other weights (an optimizer step, a reload) are never reused."""
    e = Engine(str(random_model_dir(tmp_path, seed=7)), seed=0)
    sched = Scheduler(e, max_batch=2, prefix_cache_bytes=1 << 24)
    prompt = SYSTEM + "Hi?"
    _run(sched, [[("a", prompt)]])
    assert len(sched.prefix) > 0
    with torch.no_grad():
        e.model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.mul_(1.5)
    got = _run(sched, [[("b", prompt)]])
    assert sched.prefix.hit_tokens == 0
    _check(e, {"b": prompt}, got)


def test_prefix_caching_refuses_speculation(engine):
    with pytest.raises(SamplingError, match="does not combine with speculative"):
        Scheduler(engine, speculative=1, prefix_cache_bytes=1 << 20)
    with pytest.raises(SamplingError, match="holds no block"):
        Scheduler(engine, prefix_cache_bytes=16)


# ---- the server ---------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_server_support import served  # noqa: E402


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    yield from served(engine.model_dir, tmp_path_factory, "prefix", "--max-model-len", "512", "--enable-prefix-caching",
                      "--device", TEST_DEVICE)


def test_served_chat_turns_reuse_the_cache(server, engine):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a cat?"}]
    for turn in range(2):
        r = server.client().chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0)
        ref = engine.chat(msgs, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == ref.text
        msgs += [{"role": "assistant", "content": ref.text}, {"role": "user", "content": "And a dog?"}]
    m = server.metrics()
    assert m["nanoseek_prefix_cache_hit_tokens_total"] >= 16  # the second turn began with the first
    assert 0 < m["nanoseek_prefix_cache_bytes"] and m["nanoseek_prefix_cache_queried_tokens_total"] > 0


def test_usage_reports_the_cached_prompt_tokens(server, engine):
    """OpenAI's `prompt_tokens_details.cached_tokens` and DeepSeek's `prompt_cache_hit_tokens` /
    `prompt_cache_miss_tokens`: whole 16-token blocks of the longest start shared with what the
    server stored, what the cache counted, streamed or not."""
    msgs = [{"role": "system", "content": "Colours only. " + SYSTEM}, {"role": "user", "content": "Name a colour."}]
    client = server.client()
    stored: list[int] = []
    for turn in range(3):
        before = server.metrics()["nanoseek_prefix_cache_hit_tokens_total"]
        kw = dict(model="m", messages=msgs, max_tokens=10, temperature=0)
        if turn == 2:
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            usage, text = chunks[-1].usage, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            usage, text = r.usage, r.choices[0].message.content
        hit = server.metrics()["nanoseek_prefix_cache_hit_tokens_total"] - before
        ids = engine.chat_prompt(msgs)
        shared = next((i for i, (a, b) in enumerate(zip(ids, stored)) if a != b), min(len(ids), len(stored)))
        cached = usage.prompt_tokens_details.cached_tokens
        assert usage.prompt_tokens == len(ids) and cached == hit and cached % 16 == 0
        assert (cached == 0) if turn == 0 else (shared - 16 < cached <= min(shared, len(ids) - 1) and cached >= 16)
        extra = usage.model_extra
        assert extra["prompt_cache_hit_tokens"] == cached
        assert extra["prompt_cache_miss_tokens"] == usage.prompt_tokens - cached
        out = engine.chat(msgs, max_tokens=10, temperature=0)
        assert text == out.text
        stored = ids + out.token_ids[:-1]  # the answer's last token has no cache entry yet
        msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "Another?"}]


@pytest.mark.parametrize("max_batch", [4, 1])
def test_n_choices_report_the_first_prefill_s_cached_tokens(engine, max_batch):
    """With n = 2 the prompt counts once; admitted one at a time (max_batch 1), the second choice
    finds the blocks the first stored, but the prompt was computed in full once: 0 cached."""
    from starlette.testclient import TestClient

    from nanoseek.server.app import ServerConfig, create_app

    sched = Scheduler(engine, max_batch=max_batch, prefix_cache_bytes=1 << 24)
    msgs = [{"role": "system", "content": "Two choices. " + SYSTEM}, {"role": "user", "content": "Name a colour."}]
    with TestClient(create_app(engine, sched, ServerConfig())) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "n": 2, "max_tokens": 4,
                                                 "temperature": 0})
    u = r.json()["usage"]
    assert u["prompt_tokens"] == len(engine.chat_prompt(msgs)) and u["prompt_tokens_details"]["cached_tokens"] == 0
    assert u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert sched.prefix.hit_tokens == (0 if max_batch > 1 else (u["prompt_tokens"] - 1) // 16 * 16)


def test_serve_refuses_prefix_caching_with_speculation():
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "serve", "tiny", "--port", "0",
                        "--enable-prefix-caching", "--speculative"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not combine with --speculative" in r.stderr
