"""Server limits on a live server with one batch slot and a one-request queue: 429 when the queue is
full, a client that hangs up frees its slot at once (seen in /metrics), per-request timeout, and
MTP speculative decoding behind the API (greedy output equals the engine's plain output)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from nanoseek.engine import Engine  # noqa: E402
from test_server_support import LiveServer, assert_error_schema, random_model_dir  # noqa: E402

TIMEOUT = 3.0
LONG = dict(max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("server-limits"), seed=5)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = LiveServer(model_dir, "--max-batch", "1", "--max-queue", "1", "--speculative", "--request-timeout", str(TIMEOUT),
                   "--max-model-len", "2048", log_dir=tmp_path_factory.mktemp("logs"), name="limits")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def idle(server) -> dict:
    """Wait until nothing runs or waits; the metrics then."""
    server.wait_metric("nanoseek_running_batch_size", lambda v: v == 0)
    server.wait_metric("nanoseek_queue_depth", lambda v: v == 0)
    return server.metrics()


def test_speculative_serving_equals_plain_engine(server, client, model_dir):
    engine = Engine(model_dir, seed=0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = ["Hello world", "def add(a, b):", "Once upon a time there was"]
        refs = [engine.generate(p, max_tokens=20, temperature=0, ignore_eos=True).token_ids for p in prompts]
    finally:
        torch.set_num_threads(n)
    for p, ref in zip(prompts, refs):
        r = client.completions.create(model="x", prompt=p, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == ref
    m = server.metrics()
    assert m["nanoseek_mtp_draft_tokens_total"] > 0
    assert 0 <= m["nanoseek_mtp_acceptance_rate"] <= 1
    assert m["nanoseek_mtp_accepted_tokens_total"] == pytest.approx(
        m["nanoseek_mtp_acceptance_rate"] * m["nanoseek_mtp_draft_tokens_total"])


def test_queue_full_answers_429_with_retry_after(server, client):
    idle(server)
    a = client.completions.create(model="x", prompt="Hello", stream=True, **LONG)
    it = iter(a)
    next(it)  # A holds the only batch slot
    got = {}
    b = threading.Thread(target=lambda: got.setdefault("b", client.completions.create(
        model="x", prompt="Hi", max_tokens=3, temperature=0)))
    b.start()
    server.wait_metric("nanoseek_queue_depth", lambda v: v == 1)  # B waits
    r = requests.post(server.base + "/completions", json={"model": "x", "prompt": "C", "max_tokens": 2})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert assert_error_schema(r.content)["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "C"}], max_tokens=2)
    a.close()  # A hangs up: B runs
    b.join(TIMEOUT + 5)
    assert got["b"].choices[0].finish_reason in ("stop", "length")
    assert server.metrics()['nanoseek_requests_rejected_total{reason="queue_full"}'] >= 2


def test_stream_disconnect_frees_the_slot_at_once(server, client):
    before = idle(server)
    a = client.completions.create(model="x", prompt="Hello", stream=True, **LONG)
    it = iter(a)
    for _ in range(3):
        next(it)
    assert server.metrics()["nanoseek_running_batch_size"] == 1
    a.close()
    t0 = time.time()
    server.wait_metric("nanoseek_running_batch_size", lambda v: v == 0, timeout=2.0)
    freed = time.time() - t0
    m = server.metrics()
    assert m['nanoseek_sequences_finished_total{reason="abort"}'] == \
        before.get('nanoseek_sequences_finished_total{reason="abort"}', 0) + 1
    steps = m["nanoseek_decode_steps_total"]
    time.sleep(0.3)
    assert server.metrics()["nanoseek_decode_steps_total"] == steps  # nothing is generating any more
    r = client.completions.create(model="x", prompt="Next", max_tokens=4, temperature=0)  # the next request runs
    assert r.usage.completion_tokens >= 1 and freed < 2.0


def test_non_streaming_disconnect_frees_the_slot(server):
    before = idle(server)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.base + "/completions", timeout=0.5,
                      json={"model": "x", "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True})
    server.wait_metric("nanoseek_running_batch_size", lambda v: v == 0, timeout=2.0)
    m = server.metrics()
    assert m['nanoseek_sequences_finished_total{reason="abort"}'] == \
        before.get('nanoseek_sequences_finished_total{reason="abort"}', 0) + 1


def test_request_timeout(server, client):
    idle(server)
    t0 = time.time()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="x", prompt="Hello", **LONG)
    assert e.value.status_code == 408 and e.value.code == "request_timeout"
    assert TIMEOUT - 0.5 <= time.time() - t0 < TIMEOUT + 5
    server.wait_metric("nanoseek_running_batch_size", lambda v: v == 0, timeout=2.0)
    assert server.metrics()['nanoseek_sequences_finished_total{reason="timeout"}'] >= 1
    # streaming: an error event, then [DONE]
    r = requests.post(server.base + "/completions", stream=True,
                      json={"model": "x", "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True})
    events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    assert server.alive() and server.get("/health")[0] == 200
