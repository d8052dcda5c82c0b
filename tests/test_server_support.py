"""Shared pieces of the server tests (no tests here): tiny models on disk, live servers, and an
in-process ASGI request.

A LiveServer is `nanoseek serve` in a subprocess on 127.0.0.1 with --port 0 (the kernel picks a free
port; the server prints it), one torch thread, stopped at the end of the module that started it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

import nanoseek

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 30,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 20,
    "Once upon a time there was a small model that answered every question with another question. " * 20,
    "Hello world! How are you today? I am fine, thank you. Let us think about the answer step by step. " * 20,
]


def tokenizer_for(vocab_size: int):
    from nanoseek.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=vocab_size, show_progress=False)


def random_model_dir(path: Path, seed: int = 4) -> Path:
    """A tiny random model with a trained byte-level BPE tokenizer (the engine tests' recipe)."""
    from conftest import randomize
    from nanoseek.checkpoint import save_model

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, seed, bias_std=0.05)
    save_model(model, path)
    tokenizer_for(model.config.vocab_size).save(path)
    return path


def drafting_model_dir(path: Path, seed: int = 6, scale: float = 0.01) -> Path:
    """A tiny random model whose MTP drafts are mostly, not always, accepted (about 60% greedy).

    Every attention output and MLP/expert down projection is scaled by `scale`, so the residual
    stream is nearly the token's own embedding and the model nearly a bigram table, with the
    context still nudging some choices; the MTP module reads only the next token's embedding
    (eh_proj = [I, 0], enorm = 1, its head norm = the final norm), so it drafts the bigram's next
    token: right where the context does not change the argmax, wrong where it does.
    """
    from conftest import randomize
    from nanoseek.checkpoint import save_model

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, seed, bias_std=0.05)
    H = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and ("o_proj" in name or "down_proj" in name):
                p.mul_(scale)
        mtp = model.model.mtp_layers[0]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :H] = torch.eye(H)
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
    save_model(model, path)
    tokenizer_for(model.config.vocab_size).save(path)
    return path


def word_tokens(tok, count: int, skip: int = 0) -> list[int]:
    """Distinct ids that decode to plain words (optionally with a leading space)."""
    out = []
    for i in range(len(tok)):
        s = tok.decode([i])
        if re.fullmatch(r" [A-Za-z]{3,}", s) and not tok.is_special(i):
            out.append(i)
    return out[skip:skip + count]


def _bigram_chain(model, chain: list[int]) -> None:
    """Edit the weights so that greedy decoding follows `chain`: every attention output and MLP/expert
    down projection is zero (the residual stream is the token's embedding), chain tokens get
    one-hot embeddings and the head maps each to the next token of the chain."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and ("o_proj" in name or "down_proj" in name):
                if int(name.split(".")[2]) < model.config.num_hidden_layers:
                    p.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (a, b) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[a, slot] = 1.0
            model.lm_head.weight[b, slot] = 10.0


def scripted_model_dir(path: Path) -> dict:
    """A tiny model whose greedy output is fixed: `<think>\\n R </think> A <eos>` after `<｜Assistant｜>`.

    Every attention output projection and every MLP/expert down projection is zero, so the residual
    stream at the last position is that token's embedding: the model becomes a bigram table. Chain
    tokens get one-hot embeddings and the head maps each to the next token of the chain; the whole
    forward (MLA, MoE routing, the latent cache) still runs. The chain also passes through "\\n", so in
    thinking mode (the prompt ends with `<think>\\n`) the output is `R </think> A <eos>`.
    """
    from nanoseek.checkpoint import save_model
    from nanoseek.tokenizer import ASSISTANT, END_THINK, EOS, THINK

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny"))
    model.init_weights()
    model.eval()
    tok = tokenizer_for(model.config.vocab_size)
    words = word_tokens(tok, 6)
    reasoning, answer = words[:3], words[3:]
    nl = tok.encode("\n")
    assert len(nl) == 1
    chain = [tok.token_to_id(ASSISTANT), tok.token_to_id(THINK), nl[0], *reasoning, tok.token_to_id(END_THINK), *answer,
             tok.token_to_id(EOS)]
    assert len(set(chain)) == len(chain)
    _bigram_chain(model, chain)
    save_model(model, path)
    tok.save(path)
    return {"dir": path, "reasoning": tok.decode(reasoning), "answer": tok.decode(answer), "reasoning_ids": reasoning,
            "answer_ids": answer, "tokens": len(chain) - 1}


# A chat template of the V3.1 kind, written for these tests: the system prompt, the tools' JSON
# schemas, then the turns; an assistant turn's tool calls as NAME<｜tool▁sep｜>ARGS between the call
# markers, tool results between the output markers.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m.role == 'system' %}{{ m.content }}{% endfor %}"
    "{% if tools %}\n\n## Tools\n{% for t in tools %}### {{ t.function.name }}\n"
    "{{ t.function.description or '' }}\nParameters: {{ t.function.parameters | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content or '' }}"
    "{% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}<｜tool▁call▁begin｜>{{ c.function.name }}"
    "<｜tool▁sep｜>{{ c.function.arguments }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}"
    "<｜end▁of▁sentence｜>"
    "{% elif m.role == 'tool' %}<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def tool_model_dir(path: Path) -> dict:
    """A tiny model that always answers with a word and one tool call, in V3.1's markup:
    `W <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    <eos>` after `<｜Assistant｜>` (a bigram table, as `scripted_model_dir`; W and NAME are word
    tokens, the arguments "{" "}": a chain cannot repeat a token).

    Its tokenizer holds DeepSeek-V3's tool markers, marked special (decode must keep them), and its
    fill-in-the-middle tokens; the directory carries TOOL_TEMPLATE as its own chat template.
    """
    from nanoseek.checkpoint import save_model
    from nanoseek.tokenizer import (ASSISTANT, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, TOOL_TOKENS, Tokenizer,
                                    train_tokenizer)

    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny"))
    model.init_weights()
    model.eval()
    extra = [*TOOL_TOKENS, FIM_BEGIN, FIM_HOLE, FIM_END]
    raw = train_tokenizer(CORPUS, vocab_size=model.config.vocab_size - len(extra), show_progress=False).backend
    raw.add_special_tokens(extra)
    tok = Tokenizer(raw)
    assert tok.vocab_size == model.config.vocab_size
    word, name = word_tokens(tok, 2)
    args = tok.encode("{}")
    chain = [tok.token_to_id(ASSISTANT), word, tok.token_to_id(TOOL_CALLS_BEGIN), tok.token_to_id(TOOL_CALL_BEGIN),
             name, tok.token_to_id(TOOL_SEP), *args, tok.token_to_id(TOOL_CALL_END),
             tok.token_to_id(TOOL_CALLS_END), tok.token_to_id(EOS)]
    assert len(set(chain)) == len(chain) and None not in chain
    _bigram_chain(model, chain)
    save_model(model, path)
    tok.save(path)
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE, encoding="utf-8")
    return {"dir": path, "content": tok.decode([word]), "name": tok.decode([name]).strip(), "arguments": "{}"}


def served(model_dir, tmp_path_factory, name: str, *args: str):
    """For a module-scoped fixture (`yield from served(...)`): a LiveServer, stopped afterwards."""
    s = LiveServer(model_dir, *args, log_dir=tmp_path_factory.mktemp("logs"), name=name)
    try:
        yield s
    finally:
        s.stop()


class LiveServer:
    """`api_key` goes on the command line (--api-key), or only in $NANOSEEK_API_KEY with key_in_env
    (otherwise that variable is cleared); `banner` is the line the server printed at start."""

    def __init__(self, model_dir: Path | str, *args: str, api_key: str | None = None, key_in_env: bool = False,
                 log_dir: Path | None = None, name: str = "server") -> None:
        self.api_key = api_key
        cmd = [sys.executable, "-m", "nanoseek.cli", "serve", str(model_dir), "--port", "0", "--threads", "1",
               "--log-level", "warning", *args]
        if api_key and not key_in_env:
            cmd += ["--api-key", api_key]
        self.log_path = (log_dir or Path("/tmp")) / f"{name}-{os.getpid()}-{int(time.time() * 1e3)}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, NANOSEEK_API_KEY=(api_key or "") if key_in_env else "", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        line = self.banner = self.proc.stdout.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.url = m.group(1)
        self.base = self.url + "/v1"
        deadline = time.time() + 60
        while True:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server not healthy:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base, api_key=self.api_key or "none", **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + ("{" + labels + "}" if labels else "")] = s.value
        return out

    def wait_metric(self, name: str, pred, timeout: float = 10.0) -> float:
        deadline = time.time() + timeout
        while True:
            v = self.metrics().get(name, 0.0)
            if pred(v):
                return v
            if time.time() > deadline:
                raise AssertionError(f"{name} = {v} after {timeout} s\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


def asgi_request(app, method: str, path: str, headers: dict | None = None, body: bytes = b"",
                 response_headers: dict | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """One HTTP request straight into an ASGI app, in this process (no socket, no lifespan);
    `response_headers`, when given, receives the response's headers (lower-case names)."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(30)  # the client stays connected (no route here waits for it)
        return {"type": "http.disconnect"}

    out = {"status": None, "body": b""}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            if response_headers is not None:
                response_headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in msg["headers"])
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout))  # (a hang fails the test)
    return out["status"], out["body"]


def assert_error_schema(body: bytes | str | dict, status: int | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}, no traceback."""
    d = body if isinstance(body, dict) else json.loads(body)
    assert set(d) == {"error"}, d
    e = d["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"], e
    assert isinstance(e["type"], str) and e["type"], e
    assert "Traceback" not in e["message"] and 'File "' not in e["message"], e
    return e


def test_stream_deadline_is_one_timer_queued_behind_the_updates():
    """GenStream.get: updates queued before the deadline are read; then TimeoutError, and the
    sequences are aborted; the timer is cancelled once every sequence has finished, or on abort (it
    must not hold the stream)."""
    import asyncio
    from types import SimpleNamespace

    from nanoseek.engine.scheduler import ScheduledSequence, SeqUpdate
    from nanoseek.server.worker import GenerationFailed, GenStream

    sent = []
    worker = SimpleNamespace(_queued=set(), _send=sent.append)
    seq = lambda i: SimpleNamespace(seq_id=i)  # noqa: E731 - only seq_id is read
    assert ScheduledSequence  # the real type has seq_id too

    async def main():
        s = GenStream(worker, [seq(1)], time.perf_counter())
        s._push([SeqUpdate(1, [5], "a")])
        assert (await s.get(time.perf_counter() + 0.05)).token_ids == [5]
        assert s._timer is not None and not s._timer.cancelled()
        await asyncio.sleep(0.1)
        try:
            await s.get(time.perf_counter() + 0.05)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no timeout")
        assert sent == [("abort", [1])] and s.done  # the deadline itself stopped the generation
        done = GenStream(worker, [seq(2)], time.perf_counter())
        assert (await asyncio.gather(done.get(time.perf_counter() + 60), _push_later(done)))[0].token_ids == [7]
        assert done._timer.cancelled() and done.get_ready() is None
        aborted = GenStream(worker, [seq(3)], time.perf_counter())
        aborted._push([SeqUpdate(3, [1], "x")])
        await aborted.get(time.perf_counter() + 60)
        aborted.abort()
        assert aborted._timer.cancelled() and sent == [("abort", [1]), ("abort", [3])]
        failed = GenStream(worker, [seq(4)], time.perf_counter())
        failed._push([SeqUpdate(4, [2], "y"), GenerationFailed("boom")])
        assert failed.get_ready().token_ids == [2]
        try:
            failed.get_ready()
        except GenerationFailed:
            pass
        else:
            raise AssertionError("the failure was not raised")

    async def _push_later(stream):
        await asyncio.sleep(0.01)
        stream._push([SeqUpdate(2, [7], "b", finish_reason="stop")])

    asyncio.run(main())
