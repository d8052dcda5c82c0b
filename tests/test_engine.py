"""The engine: latent-cache decode equals the full forward, batched equals one-by-one, speculative
greedy equals plain greedy, the prepacked fast path equals the plain one, context and stop rules."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from conftest import CharTokenizer, randomize
from nanoseek.engine import Engine, SamplingError, SamplingParams

TOL = 1e-4


def _model(seed: int = 1, **overrides):
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny", **overrides)).eval()
    randomize(model, seed, bias_std=0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, seed=0)


PROMPTS = [[5, 17, 3, 99, 250, 7], [8, 1000], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [42]]


# ---- the model's per-row positions (what batched decode runs on) -----------------------------------

def test_per_row_decode_on_the_latent_cache_matches_full_forward(model):
    """Rows of different lengths share one cache; each row's decode logits equal its own full forward."""
    lens = [9, 4, 6]
    total = 14
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1024, (total,), generator=g) for _ in lens]
    B, T = len(lens), max(lens)
    with torch.no_grad():
        cache = model.new_cache(B, total + 2)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(lens):
            ids[b, :n] = seqs[b][:n]
        n = torch.tensor(lens)
        steps = {b: [model(ids, cache=cache, logits_at=n - 1).logits[b]] for b in range(B)}
        while int(n.min()) < total - 1:
            step_ids = torch.stack([seqs[b][min(int(n[b]), total - 1)] for b in range(B)])[:, None]
            logits = model(step_ids, start_pos=n, cache=cache).logits[:, -1]
            for b in range(B):
                if int(n[b]) < total - 1:
                    steps[b].append(logits[b])
            n = (n + 1).clamp(max=total - 1)
        for b, ln in enumerate(lens):
            full = model(seqs[b][None, :total - 1]).logits[0, ln - 1:]
            got = torch.stack(steps[b])
            assert got.shape == full.shape
            diff = (got - full).abs().max().item()
            assert diff <= TOL, (b, diff)


def test_per_row_multi_token_blocks_are_causal(model):
    """Speculative verification: blocks of several tokens at per-row positions equal the full forward."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 1024, (12,), generator=g), torch.randint(0, 1024, (12,), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        ids = torch.stack([a[:8], torch.cat([b[:5], torch.zeros(3, dtype=torch.long)])])
        model(ids, cache=cache)
        block = torch.stack([a[8:11], b[5:8]])
        got = model(block, start_pos=torch.tensor([8, 5]), cache=cache).logits
        ref_a = model(a[None, :11]).logits[0, 8:11]
        ref_b = model(b[None, :8]).logits[0, 5:8]
    assert (got[0] - ref_a).abs().max() <= TOL
    assert (got[1] - ref_b).abs().max() <= TOL


def test_logits_at_and_per_row_positions_need_a_cache(model):
    ids = torch.randint(0, 1024, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        at = model(ids, logits_at=torch.tensor([6, 2])).logits
        at2 = model(ids, logits_at=torch.tensor([[0, 6], [1, 2]])).logits
    assert torch.allclose(at, torch.stack([full[0, 6], full[1, 2]]), atol=1e-6)
    assert torch.allclose(at2[1], full[1, 1:3], atol=1e-6)
    with pytest.raises(ValueError, match="need a cache"):
        model(ids, start_pos=torch.tensor([0, 0]))


def test_prefill_runs_the_last_layer_only_where_logits_are_wanted(model):
    """With a cache, logits_at prunes the last layer to those tokens (absorbed attention from them);
    logits still equal the full forward's, every token is cached, and decoding on goes on right."""
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(3))
    last = model.model.layers[model.config.num_hidden_layers - 1]
    seen = []
    hook = last.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            full = model(ids).logits
            cache = model.new_cache(2, 12)
            at = model(ids, cache=cache, logits_at=torch.tensor([8, 4])).logits
            at2 = model(ids, cache=model.new_cache(2, 12), logits_at=torch.tensor([[0, 8], [3, 4]])).logits
            seven = torch.full((2, 1), 7)
            nxt = model(seven, start_pos=9, cache=cache).logits[:, -1]
            ref = model(torch.cat((ids, seven), dim=1)).logits[:, -1]
    finally:
        hook.remove()
    assert seen[1:3] == [1, 2]  # the pruned calls ran the last block on 1 and 2 tokens per row
    assert (at - torch.stack([full[0, 8], full[1, 4]])).abs().max() <= TOL
    assert (at2[0] - full[0, [0, 8]]).abs().max() <= TOL and (at2[1] - full[1, 3:5]).abs().max() <= TOL
    assert (nxt - ref).abs().max() <= TOL


# ---- batching ------------------------------------------------------------------------------------

def test_engine_is_exported_at_the_top_level(model):
    """`nanoseek.Engine(...)` is the documented entry point; a misspelt name still fails clearly."""
    assert nanoseek.Engine is Engine and nanoseek.SamplingError is SamplingError
    out = nanoseek.Engine(model).generate([5, 17, 3], max_tokens=3, temperature=0)
    assert len(out.token_ids) == 3
    with pytest.raises(AttributeError, match="Engin"):
        nanoseek.Engin  # noqa: B018


def test_engine_loads_a_directory_in_the_dtype_asked(tmp_path):
    from nanoseek.checkpoint import save_model

    save_model(nanoseek.load_model("tiny"), tmp_path)  # an fp32 checkpoint
    for dtype, want in (("bf16", torch.bfloat16), ("fp16", torch.float16), (None, torch.float32)):
        eng = Engine(tmp_path, dtype=dtype, tokenizer=None)
        assert {p.dtype for p in eng.model.parameters()} == {want} and eng.cache_dtype == want
        assert len(eng.generate([5, 6, 7], max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="unknown dtype 'fp7'"):
        Engine(tmp_path, dtype="fp7")


def test_batched_generation_equals_one_by_one(engine):
    batch = engine.generate(PROMPTS, max_tokens=10, temperature=0, logprobs=0, ignore_eos=True)
    for prompt, r in zip(PROMPTS, batch):
        alone = engine.generate(prompt, max_tokens=10, temperature=0, logprobs=0, ignore_eos=True)
        assert r.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(r.logprobs, alone.logprobs)) <= TOL
        assert r.prompt_token_ids == prompt and r.finish_reason == "length" and len(r.token_ids) == 10


def test_seeded_sampling_is_batch_independent(engine):
    kw = dict(max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    batch = engine.generate(PROMPTS, **kw)
    for prompt, r in zip(PROMPTS, batch):
        assert engine.generate(prompt, **kw).token_ids == r.token_ids
    assert engine.generate(PROMPTS[0], **{**kw, "seed": 99}).token_ids != batch[0].token_ids


def test_logprobs_are_the_raw_model_distribution(engine, model):
    r = engine.generate(PROMPTS[0], max_tokens=3, temperature=0, logprobs=3, ignore_eos=True)
    seq = torch.tensor([PROMPTS[0] + r.token_ids[:-1]])
    with torch.no_grad():
        lp = model(seq).logits[0, len(PROMPTS[0]) - 1:].log_softmax(-1)
    for i, t in enumerate(r.token_ids):
        assert abs(lp[i, t].item() - r.logprobs[i]) <= TOL
        assert len(r.top_logprobs[i]) == 3 and t in r.top_logprobs[i]  # greedy: the top token
        assert max(r.top_logprobs[i].values()) == pytest.approx(r.logprobs[i], abs=1e-6)


def test_streaming_yields_what_generate_returns(engine):
    chunks = list(engine.stream(PROMPTS[:2], max_tokens=6, temperature=0, ignore_eos=True))
    ref = engine.generate(PROMPTS[:2], max_tokens=6, temperature=0, ignore_eos=True)
    for i in range(2):
        mine = [c for c in chunks if c.index == i]
        assert [t for c in mine for t in c.token_ids] == ref[i].token_ids
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])


def test_top_logprobs_are_per_row_in_a_batch_and_streamed(engine):
    ps = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=n) for n in (2, 5, 0)]
    res = engine.generate(PROMPTS[:3], ps)
    assert [len(t) for t in res[0].top_logprobs] == [2] * 4 and [len(t) for t in res[1].top_logprobs] == [5] * 4
    assert res[2].top_logprobs is None and len(res[2].logprobs) == 4
    alone = engine.generate(PROMPTS[0], ps[0]).top_logprobs
    assert [list(t) for t in alone] == [list(t) for t in res[0].top_logprobs]
    chunks = list(engine.stream(PROMPTS[:3], ps))
    for i in range(3):
        mine = [c for c in chunks if c.index == i]
        tops = None if res[i].top_logprobs is None else [t for c in mine for t in c.top_logprobs]
        assert tops == res[i].top_logprobs
        assert [x for c in mine for x in c.logprobs] == res[i].logprobs


def test_prompt_logprobs_score_what_generate_produced(engine):
    # one full forward over prompt + output agrees with the logprobs the decode path reported
    r = engine.generate(PROMPTS[0], max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    for chunk in (512, 2):  # the head in one piece and in pieces
        ids, lps, tops = engine.prompt_logprobs(PROMPTS[0] + r.token_ids, top=3, chunk=chunk)
        n = len(PROMPTS[0])
        assert ids == PROMPTS[0] + r.token_ids and lps[0] is None and tops[0] is None
        assert lps[n:] == pytest.approx(r.logprobs, abs=TOL)
        assert [list(t) for t in tops[n:]] == [list(t) for t in r.top_logprobs]
        assert all(x <= 0 for x in lps[1:]) and all(len(t) == 3 for t in tops[1:])
    with pytest.raises(SamplingError, match="top must be"):
        engine.prompt_logprobs(PROMPTS[0], top=-1)
    with pytest.raises(SamplingError, match="empty"):
        engine.prompt_logprobs([])


# ---- the fast path -----------------------------------------------------------------------------

def test_packed_products_run_at_few_row_counts(monkeypatch):
    """oneDNN compiles and caches a primitive per input row count, memory it never gives back: row
    counts are padded up to a few sizes per power of two, so prompts of 60 lengths reach the packed
    product at a bounded set of sizes, and the padding changes no output."""
    from nanoseek.engine import fastpath

    counts = [fastpath.rows_bucket(m) for m in range(1, 16385)]
    assert counts[:16] == list(range(1, 17))  # decode-sized products run exactly
    assert all(m <= b <= 1.25 * m for m, b in enumerate(counts, 1)) and len(set(counts)) <= 60
    monkeypatch.setattr(fastpath, "PACK_MIN_FP32", 0)
    model = _model(seed=4)
    fast_engine = Engine(model, fast=True)
    if fast_engine.packed is None or not fast_engine.packed.linears:
        pytest.skip("oneDNN linear not available on this CPU/build")
    real, seen = torch.ops.mkldnn._linear_pointwise, set()

    def spy(x, w, *rest):
        seen.add(x.shape[:-1])
        return real(x, w, *rest)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in range(17, 77)]
    kw = dict(max_tokens=2, temperature=0, logprobs=0, ignore_eos=True)
    fast = [fast_engine.generate(p, **kw) for p in prompts]
    assert seen and all(len(s) == 1 and s[0] == fastpath.rows_bucket(s[0]) for s in seen)
    assert len({s[0] for s in seen if s[0] > 16}) <= 20  # 60 prompt lengths, a few sizes
    plain = Engine(model, fast=False)
    for p, f in zip(prompts[::7], fast[::7]):
        ref = plain.generate(p, **kw)
        assert ref.token_ids == f.token_ids and max(abs(x - y) for x, y in zip(ref.logprobs, f.logprobs)) <= TOL


def test_prepacked_fast_path_matches_plain_and_leaves_training_alone(monkeypatch):
    from nanoseek.engine import fastpath

    monkeypatch.setattr(fastpath, "PACK_MIN_FP32", 0)  # pack every weight of the tiny model
    model = _model(seed=3)
    plain = Engine(model, fast=False).generate(PROMPTS, max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    fast_engine = Engine(model, fast=True)
    if fast_engine.packed is None or not fast_engine.packed.linears:
        pytest.skip("oneDNN linear not available on this CPU/build")
    fast = fast_engine.generate(PROMPTS, max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    for a, b in zip(plain, fast):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= TOL
    # Training the same object: autograd takes the plain path, and an optimizer step is picked up.
    ids = torch.randint(0, 1024, (2, 9))
    loss = model(ids).logits.logsumexp(-1).mean()
    loss.backward()
    assert model.lm_head.weight.grad is not None
    before = fast_engine.generate(PROMPTS[0], max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an "optimizer step" that changes the argmax
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)  # a fused (gate|up) MLP weight
        model.model.layers[1].mlp.experts.down_proj.mul_(1.5)
    after = fast_engine.generate(PROMPTS[0], max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
    ref = Engine(model, fast=False).generate(PROMPTS[0], max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
    assert after.token_ids == ref.token_ids != before.token_ids
    # updates that leave the version counter alone (fused AdamW, .data) are picked up too (no other
    # Engine in between: constructing one unpacks the model)
    kw = dict(max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
    fast_engine = Engine(model, fast=True)
    first = fast_engine.generate(PROMPTS[0], **kw)
    for p in (model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.experts.down_proj):
        p.data.mul_(-1.0)
    again = fast_engine.generate(PROMPTS[0], **kw)
    assert again.token_ids == Engine(model, fast=False).generate(PROMPTS[0], **kw).token_ids != first.token_ids


# ---- speculative decoding -----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(engine, k):
    plain = engine.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    spec = engine.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0, speculative=k)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= TOL
    s = engine.last_stats
    assert s.speculative == k and s.drafted > 0 and 0 <= s.acceptance_rate <= 1


def _oracle(engine, refs, wrong_every: int):
    """Replace the MTP drafter with one that proposes the true continuation, wrong every so often,
    so that acceptance paths (all / some / none accepted, different per row) all run."""
    calls = [0]
    real = engine._draft

    def draft(proc, h_last, mtp_logits, n_next, cache, k, host):
        real(proc, h_last, mtp_logits, n_next, cache, k, host)  # keep the MTP cache work identical
        rows = []
        for b in range(len(n_next)):
            pos = int(n_next[b]) + 1
            row = [refs[b][pos + j] if pos + j < len(refs[b]) else 0 for j in range(k)]
            for j in range(k):
                calls[0] += 1
                if calls[0] % wrong_every == 0:
                    row[j] = (row[j] + 1) % 1024
            rows.append(row)
        return torch.tensor(rows), None

    engine._draft = draft
    return calls


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_with_accepted_drafts(model, k):
    engine = Engine(model, seed=0)
    plain = engine.generate(PROMPTS, max_tokens=16, temperature=0, ignore_eos=True)
    refs = [p + r.token_ids for p, r in zip(PROMPTS, plain)]
    _oracle(engine, refs, wrong_every=3)
    spec = engine.generate(PROMPTS, max_tokens=16, temperature=0, ignore_eos=True, speculative=k)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    s = engine.last_stats
    assert 0.3 < s.acceptance_rate < 0.9 and s.tokens_per_forward > 1.3
    assert s.decode_forwards < 15


def test_speculative_with_penalties_and_stops_equals_plain(model):
    engine = Engine(model, seed=0)
    kw = dict(max_tokens=14, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)
    plain = engine.generate(PROMPTS, **kw)
    refs = [p + r.token_ids for p, r in zip(PROMPTS, plain)]
    stop = plain[0].token_ids[5]
    plain_stop = engine.generate(PROMPTS, stop_token_ids=[stop], **kw)
    _oracle(engine, refs, wrong_every=4)
    assert [r.token_ids for r in engine.generate(PROMPTS, speculative=2, **kw)] == [r.token_ids for r in plain]
    spec_stop = engine.generate(PROMPTS, speculative=2, stop_token_ids=[stop], **kw)
    assert [r.token_ids for r in spec_stop] == [r.token_ids for r in plain_stop]
    assert spec_stop[0].finish_reason == "stop" and spec_stop[0].stop_reason == stop


def test_speculative_needs_an_mtp_module():
    engine = Engine(_model(num_nextn_predict_layers=0))
    with pytest.raises(SamplingError, match="MTP"):
        engine.generate([1, 2], max_tokens=2, speculative=True)


# ---- limits and stops ------------------------------------------------------------------------------

def test_context_policy(model):
    engine = Engine(model, max_context=32)
    with pytest.raises(SamplingError, match="context holds 32"):
        engine.generate(list(range(32)), max_tokens=1)
    r = engine.generate(list(range(1, 28)), max_tokens=50, temperature=0, ignore_eos=True)
    assert len(r.token_ids) == 5 and r.finish_reason == "length"  # 27 + 5 = the context


def test_stop_tokens_eos_and_max_tokens_zero(engine):
    ref = engine.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True)
    stop = ref.token_ids[3]
    r = engine.generate(PROMPTS[0], max_tokens=8, temperature=0, stop_token_ids=[stop])
    first = ref.token_ids.index(stop)
    assert r.token_ids == ref.token_ids[:first + 1] and r.finish_reason == "stop" and r.stop_reason == stop
    eos_engine = Engine(engine.model)
    eos_engine.eos_ids = {stop}
    assert eos_engine.generate(PROMPTS[0], max_tokens=8, temperature=0).token_ids == r.token_ids
    assert eos_engine.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True).token_ids == ref.token_ids
    z = engine.generate(PROMPTS[:2], max_tokens=0)
    assert [x.token_ids for x in z] == [[], []] and z[0].finish_reason == "length"


def test_token_id_prompts_only_without_tokenizer(engine):
    with pytest.raises(SamplingError, match="needs a tokenizer"):
        engine.generate("hello")
    with pytest.raises(SamplingError, match="stop strings need a tokenizer"):
        engine.generate([1, 2], stop="x")
    with pytest.raises(SamplingError, match=r"token ids must be in \[0, 1024\)"):
        engine.generate([1, 5000])
    with pytest.raises(SamplingError, match="empty"):
        engine.generate([[1], []])


def test_kv_cache_is_exactly_the_latent(engine):
    cfg = engine.config
    assert engine.kv_cache_bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_stop_strings_and_streamed_text(model):
    engine = Engine(model, tokenizer=CharTokenizer(), seed=0)
    prompt = CharTokenizer().decode([3, 17, 99])
    ref = engine.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)
    assert ref.prompt_token_ids[0] == 0 and len(ref.text) == 20
    stop = ref.text[7:10]
    cut = ref.text.find(stop)
    r = engine.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True, stop=[stop, "never-there"])
    assert r.text == ref.text[:cut] and r.finish_reason == "stop" and r.stop_reason == stop
    assert len(r.token_ids) == cut + len(stop)
    chunks = list(engine.stream(prompt, max_tokens=20, temperature=0, ignore_eos=True, stop=stop))
    assert "".join(c.text for c in chunks) == r.text
    assert chunks[-1].finish_reason == "stop"


class ByteTokenizer:
    """Byte-level like DeepSeek's tokenizer: ids < 256 are bytes (a character may span several
    tokens), 256 is a special token, and, like SentencePiece, decoding drops one leading space."""

    bos_id, eos_id = None, 256

    def decode(self, ids, skip_special=False):
        text = b"".join(b"<s>" if i == 256 else bytes([i]) for i in ids if not (skip_special and i == 256))
        text = text.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def _feed(tokens, **params):
    from nanoseek.engine.engine import _Request

    r = _Request(0, [1], SamplingParams(**params), set(), ByteTokenizer(), 10**6)
    for t in tokens:
        if r.add(t):
            break
    return r


def test_stop_string_completed_by_a_later_byte_of_its_character():
    ids = list(b"ab") + list("中".encode()) + list(b"cd")  # 中 is three tokens
    for stop, text, used in [("中", "ab", 5), ("b中", "a", 5), ("中c", "ab", 6), ("d", "ab中c", 7)]:
        r = _feed(ids, stop=stop, max_tokens=10)
        assert (r.text, r.finish_reason, r.stop_reason, len(r.output)) == (text, "stop", stop, used), stop


def test_streamed_text_holds_back_a_stop_string_ending_in_a_split_character():
    from nanoseek.engine.engine import _Request

    ids = list(b"ab") + list("中".encode()) + list(b"cd")
    for stop, text in [("b中", "a"), ("ab中", ""), ("中", "ab"), ("b中d", "ab中cd")]:
        r = _Request(0, [1], SamplingParams(stop=stop, max_tokens=len(ids)), set(), ByteTokenizer(), 10**6)
        sent = []
        for t in ids:
            done = r.add(t)
            c = r.chunk()
            sent.append(c.text if c else "")
            # never ahead of what the finished text keeps
            assert text.startswith("".join(sent)), (stop, sent)
            if done:
                break
        assert "".join(sent) == r.text == text, stop


def test_incremental_detokenization_equals_decoding_everything():
    g = torch.Generator().manual_seed(0)
    # text-like bytes, multi-byte characters, stray continuation bytes, spaces and special tokens
    pool = list(b" abcxyz\n") + list("é中🙂".encode()) + [0x80, 0xBF, 0xF0, 256]
    tokens = [pool[i] for i in torch.randint(0, len(pool), (3000,), generator=g).tolist()]
    for skip in (True, False):
        r = _feed([], max_tokens=10**6, skip_special_tokens=skip)
        tok = ByteTokenizer()
        for i, t in enumerate(tokens):
            r.add(t)
            if i % 97 == 0 or i == len(tokens) - 1:
                assert r.text == tok.decode(r.output, skip_special=skip), i
        assert r._prefix > 2900  # the decode window moved on with the text


def test_a_prompt_ending_inside_a_character_is_finished_by_the_output():
    """Token ids can stop between the bytes of one character: the output's first tokens complete
    it, so the output's text begins with that character, not with U+FFFD for its last bytes."""
    from nanoseek.engine.engine import _Request
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["plain ascii text, nothing else\n"] * 10, 300, show_progress=False)
    byte = {b[0]: i for i, b in enumerate(tok.token_bytes()) if b is not None and len(b) == 1}
    head = tok.encode("ab")
    e4, b8, ad = (byte[x] for x in "中".encode())
    cases = [  # prompt, output, the output's text
        (head + [e4, b8], [ad, byte[ord("c")]], "中c"),
        (head + [e4], [b8, ad, ad], "中\ufffd"),
        (head + [e4, b8], [byte[ord("c")]], "\ufffdc"),  # never completed: still shown, once
        (head + [ad], [byte[ord("c")]], "c"),  # a stray last byte is the prompt's alone
    ]
    for prompt, output, text in cases:
        r = _Request(0, prompt, SamplingParams(max_tokens=10), set(), tok, 10**6)
        for t in output:
            r.add(t)
        assert r.text == text, (prompt, output)
        seed = tok.unfinished_tail(prompt)
        # the prompt's text without its unfinished character, then the output's: the whole decode
        whole = tok.decode(prompt + output, skip_special=True)
        assert tok.decode(prompt, skip_special=True)[:len(whole) - len(text)] + text == whole
        assert seed[1] == bytes(tok.token_bytes()[i][0] for i in prompt[len(prompt) - seed[0]:]) if seed[0] else True


def test_inputs_outside_the_rules_raise_sampling_errors(model):
    import numpy as np

    engine = Engine(model, seed=0)
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ref = engine.generate([5, 6], p).token_ids
    assert engine.generate([np.int64(5), np.int64(6)], p).token_ids == ref
    assert engine.generate(np.array([5, 6]), p).token_ids == ref
    assert [r.token_ids for r in engine.generate(np.array([[5, 6], [5, 6]]), p)] == [ref, ref]
    assert engine.generate(torch.tensor([5, 6]), p).token_ids == ref
    for bad in ([5.7, 6.2], [[5.7, 6.2]], [[True, 2]]):
        with pytest.raises(SamplingError, match="integer token ids"):
            engine.generate(bad, p)
    with pytest.raises(SamplingError, match="more alternatives than the vocabulary"):
        engine.generate([5, 6], max_tokens=2, logprobs=model.config.vocab_size + 1)
    with pytest.raises(SamplingError, match="seed must be"):
        engine.generate([5, 6], max_tokens=2, seed=2**64)
    # fields assigned after construction are validated, and stop strings follow `stop`
    q = SamplingParams(max_tokens=3)
    q.temperature = -5
    with pytest.raises(SamplingError, match="temperature"):
        engine.generate([5, 6], q)
    chars = Engine(model, tokenizer=CharTokenizer(), seed=0)
    prompt = CharTokenizer().decode([3, 17, 99])
    full = chars.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True).text
    q = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    q.stop = full[4]
    assert chars.generate(prompt, q).text == full[:full.find(full[4])]
    # a tokenizer whose ids go past the model's vocabulary
    wide = Engine(model, tokenizer=CharTokenizer(), seed=0)
    with pytest.raises(SamplingError, match="outside the model's vocabulary"):
        wide.generate(CharTokenizer().decode([model.config.vocab_size + 3]), max_tokens=2)


def test_a_vanishing_temperature_is_greedy(engine):
    greedy = engine.generate(PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True).token_ids
    for t in (1e-6, 1e-39):
        assert engine.generate(PROMPTS[0], max_tokens=6, temperature=t, ignore_eos=True, seed=1).token_ids == greedy


def test_compile_option_falls_back_to_the_plain_path(model, monkeypatch):
    """Engine(compile=True): a compile failure warns once and decodes on the eager path, same tokens."""
    from nanoseek.engine import compiled

    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    ref = Engine(model).generate(PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True)
    eng = Engine(model, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no compiler here"):
        out = eng.generate(PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True)
    assert out.token_ids == ref.token_ids
    assert eng.compiled.failed and not eng.compiled.usable(torch.zeros(1, 1))


def test_compiled_decode_equals_eager_decode():
    """The whole-step compiled decode (fused graph, matmuls as reductions, traced expert dispatch)
    gives the eager logits within fp32 rounding and the same greedy tokens, plain and speculative."""
    m = _model(seed=5)
    eager, comp = Engine(m), Engine(m, compile=True)
    prompt = PROMPTS[0]
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    ref = eager.generate(prompt, **kw)
    got = comp.generate(prompt, **kw)
    if comp.compiled.failed:  # e.g. no C++ compiler on this machine: the fallback test covers that
        pytest.skip(f"torch.compile unavailable here: {comp.compiled.failed}")
    assert got.token_ids == ref.token_ids
    assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) < TOL
    fused = []
    verify = comp.compiled.greedy_verify
    comp.compiled.greedy_verify = lambda *a: fused.append(1) or verify(*a)
    for k in (1, 2):  # greedy verification, acceptance and the next draft run as one compiled graph
        fused.clear()
        spec = comp.generate(prompt, **kw, speculative=k)
        assert spec.token_ids == ref.token_ids and comp.last_stats.drafted > 0 and fused
        assert max(abs(a - b) for a, b in zip(spec.logprobs, ref.logprobs)) < TOL
    fused.clear()
    sampled = comp.generate(prompt, max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, speculative=1)
    assert len(sampled.token_ids) == 10 and not fused  # sampled rows keep the rejection-sampling path
    # rows of different lengths (per-row positions, as in a server's batch) run compiled too,
    # with the expert dispatch per token inside the graph
    rows = PROMPTS[:3]
    got_rows, ref_rows = comp.generate(rows, **kw), eager.generate(rows, **kw)
    assert [r.token_ids for r in got_rows] == [r.token_ids for r in ref_rows]
    fused.clear()  # the fused speculative step with per-row positions (rows accept different counts)
    spec_rows = comp.generate(rows, **{**kw, "max_tokens": 7}, speculative=1)
    assert [r.token_ids for r in spec_rows] == [r.token_ids[:7] for r in ref_rows] and fused
    assert max(abs(a - b) for g, r in zip(got_rows, ref_rows) for a, b in zip(g.logprobs, r.logprobs)) < TOL
    assert comp.compiled.failed is None


def test_warm_up_covers_every_compiled_step_shape(model, monkeypatch):
    """`warm_up` (a server's start with --compile) runs each row-count bucket with shared and per-row
    positions, and with speculation both the greedy (one fused graph) and the sampled step."""
    eng = Engine(model)
    assert eng.warm_up() == 0  # nothing to compile without compile=True
    eng.compiled = object()  # only its presence matters here: generate is recorded, not run
    calls = []
    monkeypatch.setattr(eng, "generate", lambda prompts, **kw: calls.append((len(prompts), len(set(map(len, prompts))),
                                                                            kw["temperature"], kw["speculative"])))
    assert eng.warm_up(max_batch=8, speculative=2) == len(calls)
    rows = {b for b, _, _, _ in calls}
    assert rows == {1, 2, 4, 8}
    assert {(b, mixed > 1) for b, mixed, _, _ in calls} >= {(b, m) for b in (2, 4, 8) for m in (False, True)}
    spec = {(t > 0) for _, _, t, k in calls if k == 2}
    assert spec == {False, True} and any(k == 0 for *_, k in calls)
    calls.clear()
    eng.warm_up(max_batch=2)
    assert {k for *_, k in calls} == {0} and {b for b, *_ in calls} == {1, 2}
