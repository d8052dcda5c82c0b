"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms with labels; `Registry.render()` is what `GET /metrics` serves.
Everything is updated on the server's event loop (one thread), and gauges that mirror the
scheduler are read from the worker's last published snapshot, so nothing here needs a lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

# Latency buckets in seconds (time to first token, inter-token latency, request latency).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def _key(self, labels: dict) -> tuple:
        return tuple(str(labels.get(n, "")) for n in self.label_names)


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {} if self.label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.fn = fn

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float, times: int = 1) -> None:
        i = next((j for j, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += times
        self.sum += v * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        out, acc = self.header(), 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {acc}')
        return out + [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {acc}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's metrics; `snapshot` is a callable returning the worker's latest scheduler state."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        r = self.registry = Registry()
        s = snapshot
        self.requests = r.add(Counter("nanoseek_requests_total", "HTTP requests by route and status code",
                                      ("route", "status")))
        self.prompt_tokens = r.add(Counter("nanoseek_prompt_tokens_total", "prompt tokens of accepted generations"))
        self.completion_tokens = r.add(Counter("nanoseek_completion_tokens_total", "generated tokens sent to clients"))
        self.finished = r.add(Counter("nanoseek_sequences_finished_total",
                                      "generated sequences by finish reason (stop, length, abort, timeout, error)",
                                      ("reason",)))
        self.rejected = r.add(Counter("nanoseek_requests_rejected_total",
                                      "requests refused before running, by reason (queue_full, invalid, unauthorized)",
                                      ("reason",)))
        self.ttft = r.add(Histogram("nanoseek_time_to_first_token_seconds",
                                    "time from request arrival to its first generated token", TTFT_BUCKETS))
        self.itl = r.add(Histogram("nanoseek_inter_token_latency_seconds",
                                   "time between consecutive generated tokens of a sequence", ITL_BUCKETS))
        self.e2e = r.add(Histogram("nanoseek_request_latency_seconds", "time from arrival to the last token",
                                   E2E_BUCKETS))
        gauges = [
            ("nanoseek_queue_depth", "requests waiting for a batch slot", lambda: s()["queued_requests"]),
            ("nanoseek_waiting_sequences", "sequences waiting for a batch slot (n > 1 counts n)", lambda: s()["waiting"]),
            ("nanoseek_running_batch_size", "sequences in the running batch", lambda: s()["running"]),
            ("nanoseek_max_batch_size", "the most sequences in one batch", lambda: s()["max_batch"]),
            ("nanoseek_kv_cache_budget_bytes", "latent-cache memory budget for admission", lambda: s()["cache_budget"]),
            ("nanoseek_kv_cache_allocated_bytes", "latent-cache pool allocated now", lambda: s()["cache_allocated"]),
            ("nanoseek_kv_cache_reserved_bytes", "latent cache reserved by running sequences (prompt + max_tokens)",
             lambda: s()["cache_reserved"]),
            ("nanoseek_kv_cache_used_bytes", "latent cache holding tokens now", lambda: s()["cache_used"]),
            ("nanoseek_kv_cache_usage_ratio", "reserved / budget", lambda: s()["cache_reserved"] / max(1, s()["cache_budget"])),
            ("nanoseek_decode_steps_total", "decode forwards of the running batch", lambda: s()["decode_forwards"]),
            ("nanoseek_decode_rows_total", "sequences summed over decode forwards (rows / steps = mean batch)",
             lambda: s()["row_steps"]),
            ("nanoseek_prefill_steps_total", "prefill forwards of admitted sequences", lambda: s()["prefill_steps"]),
            ("nanoseek_mtp_draft_tokens_total", "MTP draft tokens proposed (speculative decoding)", lambda: s()["drafted"]),
            ("nanoseek_mtp_accepted_tokens_total", "MTP draft tokens accepted", lambda: s()["accepted"]),
            ("nanoseek_mtp_acceptance_rate", "accepted / proposed MTP drafts since start",
             lambda: s()["accepted"] / s()["drafted"] if s()["drafted"] else 0.0),
            ("nanoseek_prefix_cache_queried_tokens_total", "prompt tokens looked up in the prefix cache",
             lambda: s()["prefix_queried"]),
            ("nanoseek_prefix_cache_hit_tokens_total", "prompt tokens served from the prefix cache (not prefilled)",
             lambda: s()["prefix_hit"]),
            ("nanoseek_prefix_cache_bytes", "latent blocks held by the prefix cache", lambda: s()["prefix_bytes"]),
        ]
        for name, help, fn in gauges:
            m = Gauge(name, help, fn)
            if name.endswith("_total"):  # monotonic values owned by the scheduler
                m.kind = "counter"
            r.add(m)

    def render(self) -> str:
        return self.registry.render()
