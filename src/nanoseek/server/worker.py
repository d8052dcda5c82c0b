"""The bridge between the asyncio server and the model: one thread owns the Scheduler.

The event loop never runs the model. It validates a request, turns it into ScheduledSequences
(`Scheduler.make_sequence`, read-only on the engine) and hands them to `Worker.submit`, which
returns a `GenStream`. The worker thread takes new sequences and aborts from its inbox between
steps, runs `Scheduler.step()`, and posts each step's updates back to the loop in one
`call_soon_threadsafe` callback; a GenStream is an asyncio queue of its sequences' updates.

* The queue is bounded: `submit` raises QueueFull when `max_queue` requests are already waiting
  for a batch slot (the server answers 429 with Retry-After).
* `abort` (a client hung up, a timeout) reaches the scheduler before its next step: the row and its
  cache are freed between two decode steps.
* If a step raises, every waiting and running sequence gets the error (the server answers 500 or an
  error event), the scheduler is reset, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Hashable

from ..engine.scheduler import Scheduler, ScheduledSequence, SeqUpdate

log = logging.getLogger("nanoseek.server")


def _fulfil(fut: concurrent.futures.Future, fn: Callable) -> None:
    """Run fn() into fut (unless it was cancelled); its exception goes to whoever awaits fut."""
    if fut.set_running_or_notify_cancel():
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)


class ModelThread:
    """One OS thread for every torch call of the server: loading, packing and every step.

    PyTorch's CPU kernels run on an OpenMP team that belongs to the thread that calls them. Loading
    the model on the main thread and decoding on another leaves two teams competing for the cores:
    measured on the 2-core machine, bench-preset decode at batch 1 ran at ~38 tok/s on a second
    thread against ~75 tok/s when one thread did everything. So the CLI loads the model through
    `call` and the worker loop runs here too.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nanoseek-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            _fulfil(*job)

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn))
        return fut

    def call(self, fn: Callable):
        """Run fn on the model thread and return its result (re-raising its exception)."""
        return self.submit(fn).result()

    def close(self) -> None:
        self._jobs.put(None)


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is busy: {depth} requests are already waiting; retry after {retry_after} s")
        self.retry_after = retry_after


class StreamEnded(Exception):
    """A stream the server ended, not its sequences: the client is told `status` / `code` (the
    message is safe to show), and its unfinished sequences count as finished for `reason`."""

    status, code, reason = 500, "generation_failed", "error"


class ServerShuttingDown(StreamEnded):
    """The server is stopping: a request still running or queued ends with this."""

    status, code, reason = 503, "server_shutting_down", "abort"


def _shutting_down() -> ServerShuttingDown:
    return ServerShuttingDown("The server is shutting down; this request was stopped. Send it again once the "
                              "server is back.")


class GenerationFailed(StreamEnded):
    """The model step raised (no traceback in the message)."""


class GenStream:
    """Updates of one request's sequences, consumed on the event loop."""

    def __init__(self, worker: "Worker", seqs: list[ScheduledSequence], arrival: float) -> None:
        self.worker = worker
        self.seq_ids = [s.seq_id for s in seqs]
        self.pending = set(self.seq_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = arrival
        self.started = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return not self.pending or self.closed

    def _push(self, items: list) -> None:
        for item in items:
            if isinstance(item, SeqUpdate):
                if item.finished:
                    self.pending.discard(item.seq_id)
            else:
                self.pending.clear()
            self.queue.put_nowait(item)
        if not self.pending:
            self._disarm()
        if not self.started:
            self.started = True
            self.worker._queued.discard(self)

    async def get(self, deadline: float | None = None) -> SeqUpdate:
        """The next update; raises TimeoutError once `deadline` (a time.perf_counter() time; the first
        call's counts) has passed with nothing left to read, or GenerationFailed if the model step
        failed.

        The deadline is one timer per stream that queues a TimeoutError behind the updates, not a
        timeout around every read: `asyncio.wait_for` per token was a fifth of the event loop's
        streaming work (profiled on a GPU, where the loop's Python is the server's limit).
        """
        if deadline is not None and self._timer is None and not self.done:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.perf_counter()), self._expire)
        return self._unpack(await self.queue.get())

    def _expire(self) -> None:
        """The deadline passed: tell the reader, and stop generating now. A client that stays
        connected but stops reading leaves its reader blocked in a send; without the abort here its
        rows would decode on to max_tokens."""
        self.end(TimeoutError("deadline"))

    def end(self, error: BaseException) -> None:
        """Stop generating, and have the reader's next read raise `error` (after what is queued)."""
        self.queue.put_nowait(error)
        self.abort()

    def get_ready(self) -> SeqUpdate | None:
        """The next update if one is already queued, else None (without waiting)."""
        return None if self.queue.empty() else self._unpack(self.queue.get_nowait())

    @staticmethod
    def _unpack(item):
        if isinstance(item, BaseException):
            raise item
        return item

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def abort(self) -> None:
        """Stop generating (idempotent): frees the batch rows before the next step."""
        if self.closed:
            return
        self.closed = True
        self._disarm()
        self.worker._queued.discard(self)
        if self.pending:
            self.worker._send(("abort", list(self.pending)))
            self.pending.clear()


def _deliver(batch: dict[GenStream, list]) -> None:
    for stream, items in batch.items():
        stream._push(items)


class Worker:
    def __init__(self, scheduler: Scheduler, max_queue: int = 64, model_thread: ModelThread | None = None) -> None:
        self.scheduler = scheduler
        self.model_thread = model_thread
        self.max_queue = max_queue
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._owners: dict[Hashable, GenStream] = {}  # worker thread only
        self._queued: set[GenStream] = set()  # event loop only
        self._streams: weakref.WeakSet[GenStream] = weakref.WeakSet()  # event loop only: every stream handed out
        self.loop: asyncio.AbstractEventLoop | None = None
        self.snapshot = self._snapshot()
        self.failures = 0  # steps that raised (each failed every sequence it had)
        self.failed_requests = 0  # requests ended alone, by a prefill of theirs that failed
        self._running: concurrent.futures.Future | None = None
        self.closing = False  # set by close_streams: nothing new is taken from then on

    # -- event-loop side ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the step loop on the model thread (a new one if none was given)."""
        self.loop = loop
        if self.model_thread is None:
            self.model_thread = ModelThread()
        self._running = self.model_thread.submit(self._run)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._running is not None:
            try:
                self._running.result(timeout)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass

    @property
    def alive(self) -> bool:
        return self._running is not None and not self._running.done()

    @property
    def queue_depth(self) -> int:
        return len(self._queued)

    def submit(self, seqs: list[ScheduledSequence], arrival: float | None = None) -> GenStream:
        if self.closing:  # (a request still being validated when the server began to stop)
            raise _shutting_down()
        if len(self._queued) >= self.max_queue:
            raise QueueFull(len(self._queued))
        stream = GenStream(self, seqs, arrival if arrival is not None else time.perf_counter())
        self._queued.add(stream)
        self._streams.add(stream)
        self._send(("add", seqs, stream))
        return stream

    def close_streams(self) -> None:
        """The server is shutting down (event loop): every unfinished stream reads ServerShuttingDown
        next and its sequences stop, so that each client gets an answer that says so, at once,
        rather than a connection cut when the server's grace period runs out."""
        self.closing = True  # requests past validation but not yet submitted are refused in submit
        for stream in list(self._streams):
            if not stream.done:
                stream.end(_shutting_down())

    def run(self, fn: Callable) -> asyncio.Future:
        """Run fn() on the model thread between two steps (e.g. scoring a prompt); await the result.
        Raises ServerShuttingDown once the server is stopping."""
        if self.closing:
            raise _shutting_down()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", fn, fut))
        return asyncio.wrap_future(fut)

    def _send(self, msg: tuple) -> None:
        self._inbox.append(msg)
        self._wake.set()

    # -- worker thread --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        s = self.scheduler
        st = s.stats
        return dict(running=s.num_running, waiting=s.num_waiting, max_batch=s.max_batch,
                    queued_requests=len(getattr(self, "_queued", ())),
                    cache_budget=s.kv_cache_bytes, cache_allocated=s.cache_bytes_allocated,
                    cache_reserved=s.cache_bytes_reserved, cache_used=s.cache_bytes_used,
                    decode_forwards=st.decode_forwards, row_steps=st.row_steps, prefill_steps=s.prefill_steps,
                    drafted=st.drafted, accepted=st.accepted,
                    prefix_hit=s.prefix.hit_tokens if s.prefix is not None else 0,
                    prefix_queried=s.prefix.queried_tokens if s.prefix is not None else 0,
                    prefix_bytes=s.prefix.bytes_used if s.prefix is not None else 0)

    def _drain(self) -> None:
        while self._inbox:
            msg = self._inbox.popleft()
            if msg[0] == "call":
                _fulfil(msg[2], msg[1])
            elif msg[0] == "add":
                _, seqs, stream = msg
                if stream.closed:
                    continue
                for s in seqs:
                    self._owners[s.seq_id] = stream
                    self.scheduler.add(s.seq_id, sequence=s)
            else:
                for seq_id in msg[1]:
                    self.scheduler.abort(seq_id)
                    self._owners.pop(seq_id, None)

    def _post(self, batch: dict[GenStream, list]) -> None:
        """Hand a step's updates to the event loop in one callback: each `call_soon_threadsafe`
        wakes the loop through its self-pipe (a syscall, and a GIL hand-over), so one per step
        rather than one per stream."""
        if batch and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(_deliver, batch)

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            by_stream: dict[GenStream, list] = {}
            try:
                self._drain()
                if not self.scheduler.has_work:
                    self.snapshot = self._snapshot()
                    self._wake.wait(timeout=1.0)
                    continue
                self._route(self.scheduler.step(), by_stream)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                self._fail(e, also=by_stream)
                continue
            self._post(by_stream)
            self.snapshot = self._snapshot()

    def _route(self, updates: list, by_stream: dict[GenStream, list]) -> None:
        """Each update to its request's stream; a sequence whose prefill failed ends its request."""
        for u in updates:
            stream = self._owners.get(u.seq_id)
            if stream is None:
                continue
            if u.error is not None:
                self._end_request(stream)
                by_stream.setdefault(stream, []).append(GenerationFailed(f"generation failed: {u.error}"))
                continue
            by_stream.setdefault(stream, []).append(u)
            if u.finished:
                self._owners.pop(u.seq_id, None)

    def _end_request(self, stream: GenStream) -> None:
        """Stop the request's other choices (running, waiting, or to be prefilled alone)."""
        self.failed_requests += 1
        mine = [seq_id for seq_id in stream.seq_ids if self._owners.get(seq_id) is stream]
        for seq_id in mine:  # (if an abort raises, _fail ends every stream, this one included)
            self.scheduler.abort(seq_id)
        for seq_id in mine:
            self._owners.pop(seq_id)

    def _fail(self, e: Exception, also: dict[GenStream, list] | None = None) -> None:
        """A step raised: every request fails (`also`: streams of this step's updates, whose
        sequences may have finished and left `_owners` already)."""
        self.failures += 1
        log.error("generation step failed; failing %d sequences:\n%s", len(self._owners), traceback.format_exc())
        self.scheduler.reset()
        err = GenerationFailed(f"generation failed: {type(e).__name__}")
        self._post({stream: [err] for stream in set(self._owners.values()) | set(also or ())})
        self._owners.clear()
        self.snapshot = self._snapshot()
