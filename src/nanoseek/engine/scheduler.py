"""Continuous batching: sequences join and leave the running batch between forwards.

`Engine.generate` runs a fixed set of prompts to completion. A server needs more: requests arrive
while others are decoding, finish at different times, and clients hang up. `Scheduler` is the
step-level API for that, on the same model, cache layout, sampler and speculative rule as the
engine (it reuses the engine's request bookkeeping, `_emit`, `_prefill_drafts` and `_draft`, so
outputs are the engine's outputs):

    sched = Scheduler(engine, max_batch=32, kv_cache_bytes=2**30)
    sched.add("a", "Once upon a time", SamplingParams(max_tokens=50, temperature=0))
    while sched.has_work:
        for u in sched.step():              # SeqUpdate: new tokens/text of one sequence
            print(u.seq_id, u.text, u.finish_reason)
        sched.add(...)                      # any time between steps
        sched.abort("a")                    # frees its batch row and cache at once

**The cache pool.** Every running sequence owns one row of a latent-cache pool (one
`[slots, capacity, kv_lora_rank + qk_rope_head_dim]` tensor per layer); the running batch is rows
0..B-1, so a forward sees the plain `[B, capacity, D]` cache the model already handles (per-row
positions, masked absorbed attention). A joining sequence is prefilled straight into the free
rows B.. (a view of the pool: no copy); a leaving sequence's row is refilled with the batch's last
row (one row copied, not the whole cache). The pool grows when a longer request or more rows need
it, within the budget, and is freed when the batch empties.

**Admission.** A sequence reserves prompt + max_tokens positions (+ speculative slack), so an
admitted sequence never runs out of cache and nothing is ever preempted. Waiting sequences are
admitted first-come first-served while the batch has fewer than `max_batch` rows and the pool
(rows x the longest reservation x bytes per position) fits `kv_cache_bytes`; the head of the
queue is never skipped, so a long request is not starved by short ones. A prompt that fills the
per-sequence limit (`max_tokens_per_sequence`: the context, or what the budget holds for one row)
is refused in `make_sequence` / `add` (SamplingError); a shorter one has its max_tokens clipped to
the room left, as `Engine.generate` clips it to the context (it then ends with "length"). The
server checks prompt + an explicit max_tokens first and answers 400.

**Prefix caching** (`prefix_cache_bytes`, off by default; see prefix_cache.py). A joining prompt
that begins like an earlier one copies that prefix's latent blocks into its row and prefills only
the rest, at per-row start positions on the absorbed path, where that is cheaper than the whole
prompt cold (`_usable_hit`: the absorbed path's attention grows as rest x length); rows with a hit
and cold rows share a prefill only while all its prompts are short (`_admit`). Every prompt's blocks
are stored after its prefill and a finished sequence's prompt-and-output blocks when it finishes. Not with
speculation (the MTP layer's cache at a prefix's last position depends on the token after it).

**Steps.** One `step()` runs one forward: a prefill of newly admitted sequences (each
distinct prompt once, padded to the longest: up to `max_prefill_tokens` positions in all; they get
their first token from it) or a decode step of the
whole batch (one token per row, or up to k + 1 with MTP speculation). After a prefill the next
step is always a decode when older rows are waiting for one, so a stream of arrivals cannot stall
the running batch for more than one prefill at a time.

**Failures.** A prefill that raises (a prompt whose activations do not fit the device's memory, a
bug that one request's parameters reach) has touched no running row: it writes only free rows and
joins them last. A lone joiner then ends, with an update whose `error` is set; several go back to
the head of the queue as they were before the attempt, each to be prefilled alone in a step of its
own, so only those whose own prefill fails end, and the batch decodes on in between. A decode step
that raises cannot tell its rows apart: `step` raises, and the caller `reset`s.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..model import LatentCache
from .engine import Engine, GenerationStats, Prompt, _Request, right_padded
from .prefix_cache import PrefixCache
from .sampling import LogitsProcessor, SamplingError, SamplingParams

log = logging.getLogger(__name__)

ABORTED = "abort"


@dataclass
class SeqUpdate:
    """What one step produced for one sequence (like the engine's StreamChunk, plus top logprobs)."""

    seq_id: Hashable
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last update
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, this update included
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache rather than computed
    error: str | None = None  # the sequence failed (its prefill raised): the exception's type; its last update

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class ScheduledSequence:
    seq_id: Hashable
    req: _Request
    reservation: int  # cache positions this sequence may use
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    alone: bool = False  # prefilled by itself (a prefill it shared failed)
    cached_tokens: int = 0  # of its prompt, found in the prefix cache at prefill

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt


def _first_of_each(reqs: list[_Request]) -> list[int]:
    """For each request, the index of the first request with the same prompt."""
    first: dict[tuple, int] = {}
    return [first.setdefault(tuple(r.prompt), i) for i, r in enumerate(reqs)]


# Calibrated on this project's CPU (bench preset, fp32, 2 threads): the absorbed prefill's
# attention ran at about half the efficiency of the linear layers per flop.
ABSORBED_OVERHEAD = 1.75
# Hit and cold rows share a prefill (all of it on the absorbed path) while kappa x the longest
# prompt in it is at most this (bench: prompts up to ~200 tokens).
MIX_SLACK = 0.25


def absorbed_prefill_cost(config) -> float:
    """kappa in: a prefill of `rest` new tokens after a cached prefix, on a prompt of n tokens,
    costs ~ rest x (1 + kappa x n) against ~ n for the whole prompt computed from scratch. kappa =
    the absorbed attention's flops per query and cached position (scores over C + rope dims, then C
    of output, per head and layer) over the matmul flops per token, times ABSORBED_OVERHEAD."""
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * (2 * config.kv_lora_rank +
                                                                               config.qk_rope_head_dim)
    try:
        from ..summary import summarize

        matmul = 2 * summarize(config)["flops"]["matmul_params_per_token"]
    except Exception:  # noqa: BLE001 - a config the summary cannot read: bench's measured value
        return 1.2e-3
    return ABSORBED_OVERHEAD * attention / max(matmul, 1)


class Scheduler:
    """Continuous batching over one `Engine` (see the module docstring). Not thread-safe: one
    thread owns it and calls add / abort / step."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, kv_cache_bytes: int | None = None,
                 speculative: bool | int = False, max_prefill_tokens: int | None = None,
                 capacity_step: int = 64, prefix_cache_bytes: int | None = None) -> None:
        if max_batch < 1:
            raise SamplingError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.model, self.config = engine.model, engine.config
        self.device, self.dtype = engine.device, engine.cache_dtype  # the latent pool's dtype
        self.k = engine._spec_k(speculative)
        self.slack = 2 * self.k + 2 if self.k else 1  # positions written past the last kept token
        self.max_batch = max_batch
        self.n_layers = self.config.num_hidden_layers + (1 if self.k else 0)
        self.bytes_per_token = engine.kv_cache_bytes_per_token(speculative=bool(self.k))
        full = max_batch * (engine.max_context + self.slack) * self.bytes_per_token
        self.kv_cache_bytes = int(kv_cache_bytes) if kv_cache_bytes is not None else full
        if self.kv_cache_bytes < (2 + self.slack) * self.bytes_per_token:
            raise SamplingError(f"kv_cache_bytes={self.kv_cache_bytes} holds no sequence "
                                f"({self.bytes_per_token} bytes per position)")
        self.max_prefill_tokens = max_prefill_tokens or max(engine.max_context, 2048)
        self.capacity_step = capacity_step
        self.waiting: deque[ScheduledSequence] = deque()
        self.running: list[ScheduledSequence] = []
        self._by_id: dict[Hashable, ScheduledSequence] = {}
        self._pool: list[torch.Tensor] | None = None
        self._n = self._last = self._drafts = self._q = None
        self._proc: LogitsProcessor | None = None
        self._decode_due = False
        self._joined = False  # set by _prefill once its rows are part of the batch
        seed = int(torch.randint(0, 2**62, (), generator=engine._rng))
        self._shared = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = GenerationStats(speculative=self.k)  # cumulative over the scheduler's life
        self.prefill_steps = 0
        self.finished_count = 0
        self.aborted_count = 0
        self.failed_count = 0
        self.prefix: PrefixCache | None = None
        self._weights_stamp: tuple | None = None  # the weights the prefix cache's blocks were computed with
        self._absorbed_cost = 0.0  # (see absorbed_prefill_cost; set with the prefix cache)
        if prefix_cache_bytes:
            if self.k:
                raise SamplingError("prefix caching does not combine with speculative decoding (the MTP layer's "
                                    "cache at a prefix's last position depends on the token after it)")
            try:
                self.prefix = PrefixCache(self.n_layers, self.config.kv_cache_dim, max_bytes=int(prefix_cache_bytes),
                                          dtype=self.dtype, device=self.device)
            except ValueError as e:
                raise SamplingError(f"prefix_cache_bytes: {e}") from None
            self._absorbed_cost = absorbed_prefill_cost(self.config)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def max_tokens_per_sequence(self) -> int:
        """The most cache positions one sequence may reserve (the budget or the context)."""
        return min(self.engine.max_context, self.kv_cache_bytes // self.bytes_per_token - self.slack)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def capacity(self) -> int:
        return self._pool[0].shape[1] if self._pool else 0

    @property
    def slots(self) -> int:
        return self._pool[0].shape[0] if self._pool else 0

    @property
    def cache_bytes_allocated(self) -> int:
        return self.slots * self.capacity * self.bytes_per_token

    @property
    def cache_bytes_reserved(self) -> int:
        return sum(s.reservation for s in self.running) * self.bytes_per_token

    @property
    def cache_bytes_used(self) -> int:
        # host-side positions: summing the device's would wait for the device after every step
        return sum(s.req.position for s in self.running) * self.bytes_per_token

    # -- requests -------------------------------------------------------------------------------
    def make_sequence(self, seq_id: Hashable, prompt: Prompt, params: SamplingParams | None = None,
                      **kwargs) -> ScheduledSequence:
        """Validate and tokenize (raises SamplingError), without queueing: safe to call from another
        thread than the one stepping (it only reads the engine)."""
        _, reqs = self.engine._requests([prompt], params, kwargs)
        req = reqs[0]
        if self.k and req.params.constrained:
            raise SamplingError("constrained decoding (JSON mode, forced tool calls) does not combine with "
                                "speculative decoding (this server runs "
                                f"--speculative {self.k})")
        cap = self.max_tokens_per_sequence
        if len(req.prompt) >= cap:
            raise SamplingError(f"the prompt has {len(req.prompt)} tokens; this server's cache holds at most "
                                f"{cap} per sequence, so nothing could be generated")
        req.max_tokens = min(req.max_tokens, cap - len(req.prompt))
        return ScheduledSequence(seq_id, req, len(req.prompt) + max(req.max_tokens, 0) + self.slack)

    def add(self, seq_id: Hashable, prompt: Prompt | None = None, params: SamplingParams | None = None,
            *, sequence: ScheduledSequence | None = None, **kwargs) -> ScheduledSequence:
        """Queue a sequence (or a ScheduledSequence from make_sequence); returns it."""
        s = sequence if sequence is not None else self.make_sequence(seq_id, prompt, params, **kwargs)
        if s.seq_id in self._by_id:
            raise SamplingError(f"sequence id {s.seq_id!r} is already scheduled")
        self._by_id[s.seq_id] = s
        self.waiting.append(s)
        return s

    @torch.inference_mode()
    def abort(self, seq_id: Hashable) -> bool:
        """Drop a waiting or running sequence now (its batch row and cache are freed); False if unknown."""
        s = self._by_id.pop(seq_id, None)
        if s is None:
            return False
        self.aborted_count += 1
        if s in self.waiting:
            self.waiting.remove(s)
            return True
        self._remove([self.running.index(s)])
        return True

    def reset(self) -> list[Hashable]:
        """Drop everything (after a failed step): returns the ids that were waiting or running."""
        ids = list(self._by_id)
        self.waiting.clear()
        self._by_id.clear()
        self._empty_batch()
        return ids

    def _empty_batch(self) -> None:
        """No running rows: the pool and the batch's state are freed."""
        self.running = []
        self._pool = self._n = self._last = self._drafts = self._q = self._proc = None
        self._decode_due = False

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SeqUpdate]:
        """One forward (a prefill of admitted sequences, or a decode of the batch); the updates it made."""
        updates: list[SeqUpdate] = []
        if not (self._decode_due and self.running):
            joiners = self._admit(updates)
            if joiners:
                self._prefill_or_requeue(joiners, updates)
                self._decode_due = True
                return updates
        if self.running:
            self._decode(updates)
        self._decode_due = False
        return updates

    def run_until_done(self) -> dict[Hashable, list[SeqUpdate]]:
        """Step until nothing is left (tests, offline batches): every sequence's updates."""
        out: dict[Hashable, list[SeqUpdate]] = {}
        while self.has_work:
            for u in self.step():
                out.setdefault(u.seq_id, []).append(u)
        return out

    # -- admission and the pool -----------------------------------------------------------------
    def _fits(self, rows: int, longest: int) -> bool:
        return rows * longest * self.bytes_per_token <= self.kv_cache_bytes

    def _admit(self, updates: list[SeqUpdate]) -> list[ScheduledSequence]:
        joiners: list[ScheduledSequence] = []
        longest = max((s.reservation for s in self.running), default=0)
        # The prefill computes each distinct prompt once (n choices share it), every row padded to
        # the widest: its work is rows x width, which max_prefill_tokens bounds.
        prompts: set[tuple[int, ...]] = set()
        width = 0
        with_hits, with_cold, longest_prompt = False, False, 0
        while self.waiting and len(self.running) + len(joiners) < self.max_batch:
            s = self.waiting[0]
            if s.req.finished:  # max_tokens 0: nothing to run
                self.waiting.popleft()
                self._by_id.pop(s.seq_id, None)
                self.finished_count += 1
                updates.append(self._update(s))
                continue
            if s.alone and joiners:
                break
            need = max(longest, s.reservation)
            if not self._fits(len(self.running) + len(joiners) + 1, need):
                break
            key = tuple(s.prompt)
            if key not in prompts:
                # (prompt tokens to compute: a prefix the cache holds costs nothing)
                hit = len(self._usable_hit(s.prompt)) * self.prefix.block if self.prefix is not None else 0
                cost = len(s.prompt) - hit
                if joiners and (len(prompts) + 1) * max(width, cost) > self.max_prefill_tokens:
                    break
                # Rows with a hit prefill on the absorbed path (per-row starts), and take every row
                # of their prefill with them, each row's queries reading up to the furthest row's
                # end: hit and cold rows share a prefill only while every prompt in it is short
                # (kappa x longest <= MIX_SLACK: at most that much more than apart); otherwise the
                # next kind waits for a prefill of its own (first come, first served).
                hits_after, cold_after = with_hits or bool(hit), with_cold or not hit
                longest_after = max(longest_prompt, len(s.prompt))
                if joiners and hits_after and cold_after and self._absorbed_cost * longest_after > MIX_SLACK:
                    break
                with_hits, with_cold, longest_prompt = hits_after, cold_after, longest_after
                prompts.add(key)
                width = max(width, cost)
            joiners.append(self.waiting.popleft())
            longest = need
            if s.alone:
                break
        if joiners:
            self._ensure_pool(len(self.running) + len(joiners), longest)
        return joiners

    def _ensure_pool(self, rows: int, longest: int) -> None:
        slots, cap = self.slots, self.capacity
        if self._pool is not None and slots >= rows and cap >= longest:
            return
        # Every row, running or joining, stays below `longest` positions (its reservation), so the
        # new capacity may be smaller than the old one: only the budget decides, not the history.
        step = self.capacity_step
        new_cap = -(-longest // step) * step
        if not self._fits(rows, new_cap):
            new_cap = longest  # admission checked that this fits
        new_slots = max(rows, min(self.max_batch, 2 * slots))
        new_slots = max(rows, min(new_slots, self.kv_cache_bytes // (new_cap * self.bytes_per_token)))
        # One layer at a time, each old layer freed once copied: the memory in use never exceeds the
        # larger pool by more than one layer (both pools at once could pass the budget).
        old, self._pool = self._pool, None
        B = len(self.running) if old is not None else 0
        keep = min(cap, new_cap)
        pool = []
        for i in range(self.n_layers):
            layer = self._new_layer(new_slots, new_cap)
            if B:
                layer[:B, :keep] = old[i][:B, :keep]
            if old is not None:
                old[i] = None
            pool.append(layer)
        self._pool = pool

    def _new_layer(self, slots: int, capacity: int) -> torch.Tensor:
        return torch.zeros(slots, capacity, self.config.kv_cache_dim, dtype=self.dtype, device=self.device)

    def _view(self, lo: int, hi: int) -> LatentCache:
        cache = LatentCache(self.config, 0, self.capacity, n_layers=0, dtype=self.dtype, device=self.device)
        cache.layers = [p[lo:hi] for p in self._pool]
        return cache

    # -- forwards -------------------------------------------------------------------------------
    def _prefill(self, joiners: list[ScheduledSequence], updates: list[SeqUpdate]) -> None:
        engine, model, k = self.engine, self.model, self.k
        engine._refresh()
        t0 = time.perf_counter()
        B0, b = len(self.running), len(joiners)
        if self.prefix is not None:
            stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
            if stamp != self._weights_stamp:  # trained or reloaded since: the stored latents are stale
                self.prefix.clear()
                self._weights_stamp = stamp
        # a request's n choices share one prompt: it is computed once, for the first of them, and
        # its cache rows copied to the others (rows computed first, copies after)
        reqs = [s.req for s in joiners]
        src = _first_of_each(reqs)
        if len(set(src)) < b:
            order = [i for i in range(b) if src[i] == i] + [i for i in range(b) if src[i] != i]
            joiners = [joiners[i] for i in order]
            reqs = [s.req for s in joiners]
            src = _first_of_each(reqs)
        u = len(set(src))
        cache = self._view(B0, B0 + b)
        lens = [len(r.prompt) for r in reqs]
        starts = [0] * u
        if self.prefix is not None:  # rows that begin like an earlier prompt start from its blocks
            hits = [self._usable_hit(r.prompt) for r in reqs[:u]]
            starts = self._prefix_starts(lens[:u], [len(h) * self.prefix.block for h in hits])
            for i, (h, s) in enumerate(zip(hits, starts)):
                self.prefix.fill(h[:s // self.prefix.block], cache.layers, i)
        for s, j in zip(joiners, src):
            s.cached_tokens = starts[j]
        rest = [n - s for n, s in zip(lens, starts)]
        ids = right_padded([r.prompt[s:] for r, s in zip(reqs[:u], starts)], self.device)
        n = torch.tensor(lens, device=self.device)
        proc = LogitsProcessor([r.params for r in reqs], [r.prompt for r in reqs], self.config.vocab_size,
                               self.device, engine._generators(reqs), self._shared, engine._constraints(reqs))
        # (per-row start positions only where the prefix cache supplied a start; never with k > 0)
        view, start = self._view(B0, B0 + u), 0
        if any(starts):
            start = torch.tensor(starts, device=self.device)
            # the furthest position written (padding included), known here: without it every
            # attention layer reads it off the device, a GPU sync per layer that stalls the
            # queued launches (_prefix_starts keeps it within the pool)
            view.attend_len = max(starts) + ids.shape[1]
            if view.attend_len > view.max_len:
                raise ValueError(f"a prefill would write position {view.attend_len - 1} of {view.max_len}")
        out = model(ids, cache=view, return_hidden=bool(k), start_pos=start,
                    logits_at=torch.tensor(rest, device=self.device) - 1)
        logits, hidden = out.logits, out.hidden_states
        if u < b:
            copies = torch.tensor(src[u:], device=self.device) + B0
            for layer in self._pool:  # (the MTP layer's rows are written by the drafts below)
                layer[B0 + u:B0 + b, :max(lens)] = layer[copies, :max(lens)]
            idx = torch.tensor(src, device=self.device)
            logits = logits[idx]
            hidden = hidden[idx] if hidden is not None else None
        tok = proc.sample(logits)
        # the first token is counted (penalties) before the MTP module drafts the next, as in Engine._run
        engine._emit(reqs, proc, tok[:, None], torch.zeros(b, dtype=torch.long, device=self.device),
                     logits[:, None], self._want_logprobs(joiners), self.stats, first=True)
        if k:  # every row's whole prompt (no prefix cache with speculation)
            ids = right_padded([r.prompt for r in reqs], self.device)
        drafts, q = engine._prefill_drafts(proc, ids, n, tok, hidden, cache, k, lens) if k else (None, None)
        self.stats.prompt_tokens += sum(lens)
        self.stats.prefill_s += time.perf_counter() - t0
        self.prefill_steps += 1
        now = time.perf_counter()
        for s in joiners:
            s.admitted = now
        # join the batch: every new value is computed before any is assigned, so that a failure
        # here too leaves the running batch as it was
        if B0:
            joined_drafts = torch.cat((self._drafts, drafts)) if k else None
            joined = (self._combine(self._proc, proc, self.running + joiners), torch.cat((self._n, n)),
                      torch.cat((self._last, tok)), joined_drafts,
                      self._cat_q(self._q, q, joined_drafts, B0) if k else None)
        else:
            joined = (proc, n, tok, drafts, q)
        self._joined = True
        self._proc, self._n, self._last, self._drafts, self._q = joined
        self.running.extend(joiners)
        if self.prefix is not None:  # (once the prefill has succeeded: a failed one runs again as it was)
            self._remember(reqs[:u], lens, starts, cache)
        self._collect(joiners, updates, offset=B0)

    def _prefill_or_requeue(self, joiners: list[ScheduledSequence], updates: list[SeqUpdate]) -> None:
        """Prefill the joiners. If that raises before they joined (see "Failures" above), a lone
        joiner ends; several go back to the head of the queue, restarted, each to be prefilled alone
        in a later step (one prefill per step, as always)."""
        saved = copy.copy(self.stats), self.prefill_steps
        self._joined = False
        try:
            self._prefill(joiners, updates)
            return
        except Exception as e:  # noqa: BLE001 - one request's failure is not the batch's
            if self._joined:
                raise  # (failed after joining: the new rows are part of the batch)
            vars(self.stats).update(vars(saved[0]))  # (what the failed attempt counted)
            self.prefill_steps = saved[1]
            if len(joiners) == 1:
                self._fail_joiner(joiners[0], e, updates)
            else:
                log.warning("a prefill of %d sequences failed (%s: %s); each will be prefilled alone",
                            len(joiners), type(e).__name__, e)
                for s in reversed(joiners):
                    s.req, s.alone = s.req.restart(), True
                    self.waiting.appendleft(s)
            if not self.running:
                self._empty_batch()

    def _remember(self, reqs: list[_Request], lens: list[int], starts: list[int], cache: LatentCache) -> None:
        """Count the prefill's prompts for the prefix cache and store their blocks. The cache is a
        help, not a duty: a store that fails (out of memory) is logged, and the prefill stands."""
        for n, start in zip(lens, starts):
            self.prefix.record(n, start)
        try:
            for i, r in enumerate(reqs):
                self.prefix.store(r.prompt, cache.layers, i)
        except Exception as e:  # noqa: BLE001
            log.warning("storing a prompt in the prefix cache failed (%s: %s); it is not stored", type(e).__name__, e)

    def _fail_joiner(self, s: ScheduledSequence, e: Exception, updates: list[SeqUpdate]) -> None:
        log.error("the prefill of sequence %r failed; ending it", s.seq_id, exc_info=e)
        self._by_id.pop(s.seq_id, None)
        self.failed_count += 1
        updates.append(SeqUpdate(s.seq_id, [], "", num_prompt_tokens=len(s.req.prompt), error=type(e).__name__))

    def _usable_hit(self, prompt: list[int]) -> list:
        """The prefix cache's blocks for `prompt`, where starting from them is cheaper than
        computing the whole prompt, else []. The rest of a prompt after a hit is prefilled on the
        absorbed path, whose attention reads every cached position for each query (rest x length);
        a cold prompt's prefill runs fused causal attention, whose cost here is mostly the linear
        layers (length). A short hit on a long prompt loses: bench, 3,000 tokens, 25% cached 1.81 s
        against 0.51 s cold, 90% cached 0.28 s (docs/server.md)."""
        blocks = self.prefix.lookup(prompt)
        n, rest = len(prompt), len(prompt) - len(blocks) * self.prefix.block
        return blocks if blocks and rest * (1 + self._absorbed_cost * n) < n else []

    def _prefix_starts(self, lens: list[int], starts: list[int]) -> list[int]:
        """Where each joiner's prefill starts, given its cache hit: a row of the prefill writes
        start + the longest rest positions (its padding included), which must stay within the pool;
        rows that would pass it start earlier (whole blocks), until every row fits."""
        cap, block = self.capacity, self.prefix.block
        while True:
            width = max(n - s for n, s in zip(lens, starts))
            over = [i for i, s in enumerate(starts) if s + width > cap]
            if not over:
                return starts
            for i in over:  # (width <= the longest prompt <= cap, so start 0 always fits)
                starts[i] = max(0, (cap - width) // block * block)

    def _decode(self, updates: list[SeqUpdate]) -> None:
        engine, k, proc = self.engine, self.k, self._proc
        t0 = time.perf_counter()
        B = len(self.running)
        reqs = [s.req for s in self.running]
        cache = self._view(0, B)
        n, last = self._n, self._last
        want_lp = self._want_logprobs(self.running)
        self.stats.decode_forwards += 1
        self.stats.row_steps += B
        if not k:
            self._n, self._last = engine._plain_step(reqs, proc, last, n, cache, want_lp, self.stats)
        else:
            self._n, self._last, self._drafts, self._q = engine._verify_step(
                reqs, proc, last, self._drafts, self._q, n, cache, k, want_lp, self.stats)
        self.stats.decode_s += time.perf_counter() - t0
        self._collect(list(self.running), updates, offset=0)

    # -- batch bookkeeping ----------------------------------------------------------------------
    def _want_logprobs(self, seqs: Sequence[ScheduledSequence]) -> int | None:
        return max((s.req.params.logprobs for s in seqs if s.req.params.logprobs is not None), default=None)

    def _update(self, s: ScheduledSequence) -> SeqUpdate | None:
        r = s.req
        start = r.sent_tokens
        c = r.chunk()
        if c is None:
            return None
        top = r.top_logprobs[start:r.sent_tokens] if r.top_logprobs is not None else None
        return SeqUpdate(s.seq_id, c.token_ids, c.text, c.logprobs, top, c.finish_reason, c.stop_reason,
                         len(r.prompt), len(r.output), s.cached_tokens)

    def _collect(self, seqs: list[ScheduledSequence], updates: list[SeqUpdate], offset: int) -> None:
        done = []
        for i, s in enumerate(seqs):
            u = self._update(s)
            if u is not None:
                updates.append(u)
            if s.req.finished:
                done.append(offset + i)
                self._by_id.pop(s.seq_id, None)
                self.finished_count += 1
                if self.prefix is not None:  # the next turn of a chat begins with this prompt and answer
                    r = s.req
                    self.prefix.store((r.prompt + r.output)[:r.position], self._pool, offset + i)
        if done:
            self._remove(done)

    def _remove(self, rows: list[int]) -> None:
        """Drop batch rows: the holes below the new size are refilled with the last rows."""
        B = len(self.running)
        gone = set(rows)
        keep = B - len(gone)
        if keep == 0:
            self._empty_batch()
            return
        holes = [i for i in range(keep) if i in gone]
        movers = [i for i in range(keep, B) if i not in gone]
        order = list(range(keep))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            end = int(self._n[movers].max()) + 2 * self.k + 2
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for p in self._pool:
                p[dst, :end] = p[src, :end]
        idx = torch.tensor(order, device=self.device)
        self.running = [self.running[i] for i in order]
        self._n, self._last = self._n[idx], self._last[idx]
        self._proc.select(order)
        if self.k:
            self._drafts = self._drafts[idx]
            self._q = self._q[idx] if self._q is not None else None

    def _combine(self, a: LogitsProcessor, b: LogitsProcessor, seqs: list[ScheduledSequence]) -> LogitsProcessor:
        """One processor for rows a + b: rebuilt from the rows' parameters, with the state a processor
        accumulates carried over (penalty counts, JSON-mode states) and the same generators."""
        constraints = [*(a.constraints or [None] * len(a.params)), *(b.constraints or [None] * len(b.params))]
        m = LogitsProcessor(a.params + b.params, [s.prompt for s in seqs], self.config.vocab_size, self.device,
                            a.generators + b.generators, self._shared, constraints)
        if m.counts is not None:
            Ba = len(a.params)
            if a.counts is not None:
                m.counts[:Ba] = a.counts
            if b.counts is not None:
                m.counts[Ba:] = b.counts
        return m

    def _cat_q(self, qa: torch.Tensor | None, qb: torch.Tensor | None, drafts: torch.Tensor, B0: int):
        """Draft distributions of the joined batch; a side drafted greedily (None) gets one-hots."""
        if qa is None and qb is None:
            return None
        V = self.config.vocab_size

        def onehot(d: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*d.shape, V, device=self.device).scatter_(-1, d[..., None], 1.0)

        qa = qa if qa is not None else onehot(drafts[:B0])
        qb = qb if qb is not None else onehot(drafts[B0:])
        return torch.cat((qa, qb))
