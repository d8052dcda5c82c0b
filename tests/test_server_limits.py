"""Server limits on a live server with one batch slot and a one-request queue: 429 when the queue is
full, a client that hangs up frees its slot at once (seen in /metrics), per-request timeout, and
MTP speculative decoding behind the API (greedy output equals the engine's plain output).

A second server ("drafting": a model whose MTP drafts are mostly accepted, two batch slots, a small
--kv-cache-bytes, its API key only in $NANOSEEK_API_KEY) checks the MTP counters against the
engine's, the cache budget's context, admission and gauges, and the key from the environment."""

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
from test_server_support import LiveServer, assert_error_schema, drafting_model_dir, random_model_dir  # noqa: E402

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


SHORT_TIMEOUT = 1.0  # 2,000 tokens of the tiny model take 3 s or more on 2 cores


@pytest.fixture(scope="module")
def timeout_server(model_dir, tmp_path_factory):
    s = LiveServer(model_dir, "--max-batch", "16", "--request-timeout", str(SHORT_TIMEOUT), "--max-model-len", "2048",
                   "--header-timeout", "1.5", log_dir=tmp_path_factory.mktemp("logs"), name="timeout")
    yield s
    s.stop()


def _raw(server, data: bytes = b"", wait: float = 10.0) -> tuple[bytes, float]:
    """Send `data` on a fresh connection and read until the server closes it: (reply, seconds)."""
    import socket

    host, port = server.url.split("//")[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=wait)
    t0 = time.time()
    try:
        if data:
            sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    return out, time.time() - t0


def test_the_http_layer_bounds_headers_and_slow_clients(timeout_server):
    """Below the API key check, uvicorn's httptools protocol left open: a header block or path of
    any size (joined quadratically: 64 MiB held the event loop for seconds), any number of headers,
    and connections that never finish their headers (a client could hold every descriptor)."""
    server = timeout_server
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    reply, _ = _raw(server, head + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and b'"request_header_fields_too_large"' in reply
    reply, _ = _raw(server, b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431")
    reply, _ = _raw(server, head + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and b"more than" in reply
    reply, took = _raw(server)  # connects and sends nothing
    assert reply.startswith(b"HTTP/1.1 408") and 1.0 < took < 6
    reply, took = _raw(server, head)  # headers never finished
    assert reply.startswith(b"HTTP/1.1 408") and took < 6
    # ordinary requests, a body in the same packet as the headers included, are untouched
    body = json.dumps({"model": "x", "prompt": "Hi", "max_tokens": 1, "user": "u" * 90_000}).encode()
    reply, _ = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body, wait=60)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert server.get("/health")[0] == 200


def test_request_timeout(timeout_server):
    server = timeout_server
    timeouts = 'nanoseek_requests_total{route="/v1/completions",status="408"}'
    before = server.metrics().get(timeouts, 0.0)
    t0 = time.time()
    with pytest.raises(openai.APIStatusError) as e:  # the client's default retries: a 408 says not to
        server.client(max_retries=2).completions.create(model="x", prompt="Hello", max_tokens=2000, temperature=0,
                                                        extra_body={"ignore_eos": True})
    assert e.value.status_code == 408 and e.value.code == "request_timeout"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert SHORT_TIMEOUT - 0.5 <= time.time() - t0 < SHORT_TIMEOUT + 5
    assert server.metrics()[timeouts] == before + 1  # one run, not three
    server.wait_metric("nanoseek_running_batch_size", lambda v: v == 0, timeout=2.0)
    assert server.metrics()['nanoseek_sequences_finished_total{reason="timeout"}'] >= 1
    # streaming: an error event, then [DONE]
    r = requests.post(server.base + "/completions", stream=True,
                      json={"model": "x", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    assert server.alive() and server.get("/health")[0] == 200


def test_the_deadline_stops_a_stream_whose_client_stopped_reading(timeout_server):
    """A client that stays connected but reads nothing: the server's writes wait on the full socket,
    and the deadline must still stop the generation (it used to run every row to max_tokens)."""
    import socket
    from urllib.parse import urlparse

    server = timeout_server
    before = idle(server)["nanoseek_decode_steps_total"]
    url = urlparse(server.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((url.hostname, url.port))
    body = json.dumps({"model": "x", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "temperature": 0,
                       "stream": True, "logprobs": 20, "n": 16}).encode()  # large events: the buffers fill
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        server.wait_metric("nanoseek_decode_steps_total", lambda v: v > before)
        m = idle(server)  # (waits for the batch to empty)
        assert m["nanoseek_decode_steps_total"] - before < 1999  # stopped before max_tokens
    finally:
        sock.close()
    assert server.alive() and server.get("/health")[0] == 200


def test_shutdown_ends_open_requests_with_an_error_at_once(model_dir, tmp_path_factory):
    """SIGTERM (or Ctrl-C) while a stream and a plain request run: each gets a 503 that says the
    server is shutting down (the stream as an error event, then [DONE]), not a cut connection."""
    import signal

    s = LiveServer(model_dir, "--max-batch", "2", "--max-model-len", "2048", log_dir=tmp_path_factory.mktemp("logs"),
                   name="shutdown")
    body = {"model": "x", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}
    got = {}

    def call(name, stream):
        try:
            r = requests.post(s.base + "/completions", json={**body, "stream": stream}, stream=stream, timeout=60)
            got[name] = [x for x in r.iter_lines() if x] if stream else (r.status_code, r.json())
        except Exception as e:  # noqa: BLE001 - what the client saw
            got[name] = e

    threads = [threading.Thread(target=call, args=(name, name == "stream")) for name in ("stream", "plain")]
    try:
        for t in threads:
            t.start()
        s.wait_metric("nanoseek_running_batch_size", lambda v: v == 2)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) is not None
        for t in threads:
            t.join(30)
    finally:
        s.stop()
    events = got["stream"]
    assert isinstance(events, list) and events[-1] == b"data: [DONE]", events
    assert json.loads(events[-2][6:])["error"]["code"] == "server_shutting_down"
    status, answer = got["plain"]
    assert status == 503 and assert_error_schema(answer)["code"] == "server_shutting_down"


# ---- the drafting server: MTP acceptance, the cache budget, the key from the environment --------------------

ENV_KEY = "sk-from-the-environment"
BUDGET = "1128KiB"  # 1155072 bytes: 1804 positions of the speculative latent cache (see test_kv_cache_budget...)


@pytest.fixture(scope="module")
def drafting_dir(tmp_path_factory):
    return drafting_model_dir(tmp_path_factory.mktemp("server-drafting"))


@pytest.fixture(scope="module")
def drafting(drafting_dir, tmp_path_factory):
    s = LiveServer(drafting_dir, "--max-batch", "2", "--speculative", "--max-model-len", "2048",
                   "--kv-cache-bytes", BUDGET, api_key=ENV_KEY, key_in_env=True,
                   log_dir=tmp_path_factory.mktemp("logs"), name="drafting")
    yield s
    s.stop()


def test_api_key_from_the_environment_alone(drafting):
    assert "(API key required;" in drafting.banner  # no --api-key on its command line
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ENV_KEY}):
        r = requests.get(drafting.base + "/models", headers=headers)
        assert r.status_code == 401 and assert_error_schema(r.content)["code"] == "invalid_api_key", headers
    r = requests.post(drafting.base + "/completions", json={"model": "x", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401
    r = requests.get(drafting.base + "/models", headers={"Authorization": f"Bearer {ENV_KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"]
    assert drafting.get("/health")[0] == 200  # only /v1 needs the key


def test_mtp_drafts_are_accepted_and_counted_like_the_engine(drafting, drafting_dir):
    engine = Engine(drafting_dir, seed=0)
    prompts = ["Hello world", "def add(a, b):", "Once upon a time there was"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs, drafted, accepted, forwards = [], 0, 0, 0
        for p in prompts:
            plain = engine.generate(p, max_tokens=20, temperature=0, ignore_eos=True).token_ids
            assert engine.generate(p, max_tokens=20, temperature=0, ignore_eos=True, speculative=1).token_ids == plain
            refs.append(plain)
            st = engine.last_stats
            drafted, accepted, forwards = drafted + st.drafted, accepted + st.accepted, forwards + st.decode_forwards
    finally:
        torch.set_num_threads(n)
    assert 0 < accepted < drafted  # this model accepts some drafts, not all
    client = drafting.client()
    before = idle(drafting)
    usages = []
    for p, ref in zip(prompts, refs):  # one at a time: the engine's batch-of-one drafts
        r = client.completions.create(model="x", prompt=p, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == ref
        usages.append(r.usage)
    m = drafting.metrics()
    # an accepted draft brings two tokens in one update: each counts
    assert m["nanoseek_completion_tokens_total"] - before["nanoseek_completion_tokens_total"] == 3 * 20 == \
        sum(u.completion_tokens for u in usages)
    assert m["nanoseek_prompt_tokens_total"] - before["nanoseek_prompt_tokens_total"] == \
        sum(u.prompt_tokens for u in usages)
    d = m["nanoseek_mtp_draft_tokens_total"] - before["nanoseek_mtp_draft_tokens_total"]
    a = m["nanoseek_mtp_accepted_tokens_total"] - before["nanoseek_mtp_accepted_tokens_total"]
    assert (d, a) == (drafted, accepted)
    assert 0 < m["nanoseek_mtp_accepted_tokens_total"] < m["nanoseek_mtp_draft_tokens_total"]
    assert m["nanoseek_mtp_acceptance_rate"] == pytest.approx(
        m["nanoseek_mtp_accepted_tokens_total"] / m["nanoseek_mtp_draft_tokens_total"])
    # accepted drafts saved decode forwards, as many as in the engine
    assert m["nanoseek_decode_steps_total"] - before["nanoseek_decode_steps_total"] == forwards < 3 * 19


def test_kv_cache_budget_sets_context_admission_and_gauges(drafting, drafting_dir):
    cfg = json.loads((drafting_dir / "config.json").read_text())
    # latent bytes per position: (layers + the MTP layer, which drafting caches too) x (kv_lora_rank +
    # qk_rope_head_dim) float32 numbers; a sequence reserves prompt + max_tokens + 4 positions with k = 1
    # (2k + 2 written past the last kept token)
    per_pos = (cfg["num_hidden_layers"] + 1) * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    slack, budget = 4, 1128 * 1024
    context = budget // per_pos - slack
    assert context == 1800 < 2048  # the budget, not --max-model-len, bounds the context
    assert f"context {context}, cache budget {budget / 2**20:.1f} MiB" in drafting.banner
    assert f"holds {context} positions per sequence, fewer than the context of 2048" in drafting.log_path.read_text()
    client = drafting.client()
    assert client.models.list().data[0].model_extra["max_model_len"] == context
    prompt = list(range(10, 20))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=prompt, max_tokens=context - len(prompt) + 1)
    assert e.value.code == "context_length_exceeded" and str(context) in e.value.message

    before = idle(drafting)
    assert before["nanoseek_kv_cache_budget_bytes"] == budget
    assert before["nanoseek_kv_cache_allocated_bytes"] == before["nanoseek_kv_cache_reserved_bytes"] == \
        before["nanoseek_kv_cache_used_bytes"] == before["nanoseek_kv_cache_usage_ratio"] == 0
    long_tokens = 1700
    a = client.completions.create(model="x", prompt=prompt, max_tokens=long_tokens, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(a)
    for _ in range(3):
        next(it)
    m = drafting.metrics()
    reserved = (len(prompt) + long_tokens + slack) * per_pos
    assert m["nanoseek_running_batch_size"] == 1
    assert m["nanoseek_kv_cache_reserved_bytes"] == reserved
    assert m["nanoseek_kv_cache_usage_ratio"] == pytest.approx(reserved / budget)
    used = m["nanoseek_kv_cache_used_bytes"]
    assert used % per_pos == 0 and (len(prompt) + 2) * per_pos <= used <= reserved
    alloc = m["nanoseek_kv_cache_allocated_bytes"]
    assert alloc % per_pos == 0 and reserved <= alloc <= budget
    # a second sequence would fit the batch (two slots) but not the budget next to the first: it waits
    got = {}
    b = threading.Thread(target=lambda: got.setdefault("b", client.completions.create(
        model="x", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})))
    b.start()
    drafting.wait_metric("nanoseek_waiting_sequences", lambda v: v == 1)
    m = drafting.metrics()
    assert m["nanoseek_running_batch_size"] == 1 and m["nanoseek_kv_cache_reserved_bytes"] == reserved
    assert m["nanoseek_kv_cache_used_bytes"] > used  # the first one is still generating
    a.close()  # the first hangs up: the second is admitted and runs
    b.join(30)
    assert got["b"].usage.completion_tokens == 5
    after = idle(drafting)
    assert after["nanoseek_kv_cache_allocated_bytes"] == after["nanoseek_kv_cache_reserved_bytes"] == \
        after["nanoseek_kv_cache_used_bytes"] == after["nanoseek_kv_cache_usage_ratio"] == 0
    assert after["nanoseek_kv_cache_budget_bytes"] == budget
