"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous-batching scheduler.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), GET / (the chat page). See docs/server.md.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, SamplingError, SamplingParams
from ..engine.engine import unfinished_tail
from ..engine.scheduler import Scheduler, SeqUpdate
from ..engine.toolcalls import ToolCallRule
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from .reasoning import END_THINK, ReasoningParser, prompt_opens_reasoning, reasoning_token_count
from ..tokenizer import ASSISTANT, TOOL_CALLS_BEGIN
from .tools import ToolCall, ToolCallParser
from .worker import GenStream, ModelThread, QueueFull, StreamEnded, Worker

log = logging.getLogger("nanoseek.server")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


def canonical_path(path: str) -> str:
    """The /v1 route that one of DeepSeek's API paths names: its SDK base URL has no /v1
    (`https://api.deepseek.com` -> /chat/completions), and its chat prefix and FIM completions
    live under /beta. Any other path is itself."""
    bare = path[len("/beta"):] if path.startswith("/beta/") else path
    if bare in ("/chat/completions", "/completions") or (bare == path and (bare == "/models"
                                                                        or bare.startswith("/models/"))):
        return "/v1" + bare
    return path


@dataclass
class ServerConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None
    max_queue: int = 64
    request_timeout: float = 600.0  # seconds, per request, from arrival to the last token
    max_body_bytes: int = 2 * 1024 * 1024
    # origins whose web pages may call the API from a browser (CORS); none by default: with "*" any
    # page the user opens could use a local model that has no key
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not (key and key.isascii() and key.isprintable() and " " not in key):
            # an HTTP header carries ASCII: a key outside it could never be sent, every client locked out
            raise ValueError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
        self.allowed_origins = tuple(_origin(o) for o in self.allowed_origins)


def _origin(origin: str) -> str:
    """An allowed origin as a browser sends it (lower case, no default port), so that the exact
    comparison of the CORS check can match; ValueError for what could never match."""
    m = re.fullmatch(r"(https?)://([^/\s:@\[\]]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?", origin.strip(), re.IGNORECASE)
    if origin == "*":
        return origin
    if m is None or (m.group(3) and int(m.group(3)) > 65535):
        # a browser sends its origin as scheme://host[:port]: a path or a slash never matches
        raise ValueError(f"an allowed origin is scheme://host[:port] (no path, no trailing slash) or *, got {origin!r}")
    scheme, host, port = m.group(1).lower(), m.group(2).lower(), m.group(3)
    try:
        if host.startswith("["):  # an IPv6 literal, as a browser writes it: compressed
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        elif not host.isascii():  # an international name, as a browser sends it: punycode
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise ValueError(f"an allowed origin's host is not a valid name or IPv6 address: {origin!r}") from None
    default = {"http": "80", "https": "443"}[scheme]
    return f"{scheme}://{host}" + (f":{int(port)}" if port and int(port) != int(default) else "")


# ---- helpers --------------------------------------------------------------------------------------

def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # OpenAI's stand-in for -inf


def _tops_with(tt: "TokenText", top: dict[int, float], token: int, logprob: float) -> dict[str, float]:
    """A completions top_logprobs entry: the top alternatives and, as OpenAI's legacy API always
    gives it (up to logprobs + 1 entries), the token that was chosen, last when it is not among them."""
    out = {tt.label_of(t): _finite(v) for t, v in top.items()}
    out.setdefault(tt.label_of(token), _finite(logprob))
    return out


class TokenText:
    """Each token's bytes and display string (byte-level BPE: through the byte map)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        try:
            from ..tokenizer import _byte_decoder

            self.byte_decoder = _byte_decoder()
        except ImportError:  # pragma: no cover
            self.byte_decoder = {}

    @functools.lru_cache(maxsize=65536)
    def bytes_of(self, i: int) -> bytes:
        if self.tok is None:
            return b""
        s = self.tok.id_to_token(int(i)) if hasattr(self.tok, "id_to_token") else None
        if s is None:
            return self.tok.decode([int(i)]).encode("utf-8")
        if all(c in self.byte_decoder for c in s) and not (hasattr(self.tok, "is_special") and self.tok.is_special(i)):
            return bytes(self.byte_decoder[c] for c in s)
        return s.encode("utf-8")

    def text_of(self, i: int) -> str:
        if self.tok is None:
            return f"<{i}>"
        return self.bytes_of(i).decode("utf-8", errors="replace")

    @functools.lru_cache(maxsize=65536)
    def label_of(self, i: int) -> str:
        """The legacy completions API's name for a token: its text, or OpenAI's `bytes:\\xNN` spelling
        for a token that is not whole UTF-8 characters, so that no two tokens share a name (the
        name is a key of `top_logprobs`)."""
        if self.tok is None:
            return self.text_of(i)
        b = self.bytes_of(i)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    @functools.lru_cache(maxsize=65536)
    def shown(self, i: int, skip_special: bool) -> bytes:
        """What a token adds to decoded text: its bytes; a special token, when skipped, what the
        tokenizer's decode still shows of it (nothing, or a tool-call marker)."""
        if self.tok is None:
            return b""
        if skip_special and getattr(self.tok, "is_special", lambda i: False)(i):
            return self.tok.decode([int(i)], skip_special=True).encode("utf-8")
        return self.bytes_of(i)


class TextOffsets:
    """Where each token starts in decoded text: the characters the tokens before it decode to (an
    incremental UTF-8 decoder: a character split over several tokens is counted at its last byte)."""

    def __init__(self, tokens: TokenText, skip_special: bool, start: int = 0, pending: bytes = b"") -> None:
        self.tokens, self.skip, self.pos = tokens, skip_special, start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder.decode(pending)  # the start of a character the prompt ends inside of

    def feed(self, ids: list[int], end: int | None = None) -> list[int]:
        """The offsets of the next tokens, none past `end` (where a stop string cut the text)."""
        out = []
        for i in ids:
            out.append(self.pos if end is None else min(self.pos, end))
            self.pos += len(self._decoder.decode(self.tokens.shown(i, self.skip)))
        return out


class _SeqState:
    __slots__ = ("index", "prompt_len", "ids", "text", "lps", "tops", "finish", "parser", "reasoning", "content",
                 "first_t", "last_t", "tool_parser", "calls", "cached")

    def __init__(self, index: int, prompt_len: int, parser: ReasoningParser | None,
                 tool_parser: ToolCallParser | None = None) -> None:
        self.index, self.prompt_len, self.parser, self.tool_parser = index, prompt_len, parser, tool_parser
        self.calls: list[ToolCall] = []
        self.ids: list[int] = []
        self.text = ""
        self.lps: list[float] = []
        self.tops: list[dict[int, float]] = []
        self.finish: str | None = None
        self.cached = 0  # prompt tokens the prefix cache supplied
        self.reasoning = self.content = ""
        self.first_t = self.last_t = None


def _tops(u: SeqUpdate) -> list[dict[int, float]]:
    """An update's top alternatives per token: empty ones where none were asked for (logprobs 0),
    so that each token still gets its entry."""
    return u.top_logprobs or [{} for _ in u.token_ids]


class Tracker:
    """Per-sequence state of one request; records latency and token metrics as updates arrive."""

    def __init__(self, metrics: ServerMetrics, stream: GenStream, prompt_lens: list[int], n: int,
                 reasoning_opened: bool | None, calls_begin_id: int | None = None,
                 end_think_id: int | None = None) -> None:
        """reasoning_opened: chat only (None: completions, no reasoning split); whether the prompt
        left a <think> block open, so that the output starts inside it. calls_begin_id: read
        tool-call markup out of the answer (chat with tools), each block opened by this token."""
        self.metrics, self.stream, self.n = metrics, stream, n
        self.calls_begin_id, self.end_think_id = calls_begin_id, end_think_id
        self._answered = False  # a first token was seen
        self.seqs = {sid: _SeqState(i, prompt_lens[i // n],
                                    None if reasoning_opened is None else ReasoningParser(reasoning_opened),
                                    ToolCallParser(budget=0) if calls_begin_id is not None else None)
                     for i, sid in enumerate(stream.seq_ids)}

    def apply(self, u: SeqUpdate) -> tuple[_SeqState, str, str]:
        s = self.seqs[u.seq_id]
        now = time.perf_counter()
        m = self.metrics
        k = len(u.token_ids)
        if k:
            if s.first_t is None:
                s.first_t = now
                if not self._answered:  # time to first token: the request's, not each choice's
                    self._answered = True
                    m.ttft.observe(now - self.stream.arrival)
                if k > 1:
                    m.itl.observe(0.0, k - 1)
            else:
                m.itl.observe((now - s.last_t) / k, k)
            s.last_t = now
            m.completion_tokens.inc(k)
        s.cached = u.num_cached_tokens
        s.ids += u.token_ids
        s.text += u.text
        if u.logprobs is not None:
            s.lps += u.logprobs
            s.tops += _tops(u)
        r = c = ""
        if s.parser is not None:
            r, c = s.parser.feed(u.text)
            if u.finished:
                r2, c2 = s.parser.finish()
                r, c = r + r2, c + c2
        else:
            c = u.text
        if s.tool_parser is not None:
            s.tool_parser.grant(self._answer_begins(s, len(u.token_ids)))
            c, calls = s.tool_parser.feed(c)
            s.calls += calls
            if u.finished:
                c += s.tool_parser.finish()
        s.reasoning += r
        s.content += c
        if u.finished:
            # OpenAI's reason for an answer that ends in tool calls
            s.finish = "tool_calls" if s.calls and u.finish_reason == "stop" else u.finish_reason
            if self.done:  # (once a request, when its last choice ends)
                m.e2e.observe(now - self.stream.arrival)
            m.finished.inc(reason=u.finish_reason)
        return s, r, c

    def _answer_begins(self, s: _SeqState, new: int) -> int:
        """Tool-call begin tokens among the newest `new` that are in the answer. One in the reasoning
        opens no call: the tool parser never sees the reasoning, and the grant would let a later
        begin marker written as plain text through."""
        start = len(s.ids) - new
        if self.calls_begin_id not in s.ids[start:]:
            return 0
        if s.parser is None or not s.parser.saw_reasoning:
            return s.ids[start:].count(self.calls_begin_id)
        if self.end_think_id in s.ids:  # the tokens after the first </think> are the answer
            return s.ids[max(start, s.ids.index(self.end_think_id) + 1):].count(self.calls_begin_id)
        # (a </think> written in pieces: the answer began within this update, or before it)
        return s.ids[start:].count(self.calls_begin_id) if s.parser.state == "content" else 0

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs.values())

    def close(self, reason: str) -> None:
        """Abort what is still running (disconnect, timeout, error) and count it."""
        if not self.stream.done:
            self.stream.abort()
        for s in self.seqs.values():
            if s.finish is None:
                s.finish = reason
                self.metrics.finished.inc(reason=reason)


class _ClientGone(Exception):
    pass


async def _watch_disconnect(request: Request, stream: GenStream) -> None:
    """Wait for the client to hang up; then wake the consumer (the body was already read)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            stream.queue.put_nowait(_ClientGone())
            return


class EventStream(Response):
    """Server-sent events that stop generating the moment the client disconnects.

    Listens for `http.disconnect` while streaming, whatever the ASGI spec version, and calls
    `on_close` (abort the generation) when the stream ends for any reason.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        self.events, self.on_close = events, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(listen()), asyncio.ensure_future(stream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.events.aclose()
            finally:
                self.on_close()
        exc = tasks[1].exception() if tasks[1].done() and not tasks[1].cancelled() else None
        if exc is not None and not isinstance(exc, OSError):
            log.warning("stream ended with %s: %s", type(exc).__name__, exc)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _param_of(err: dict) -> str | None:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return ".".join(loc) or None


# ---- the application --------------------------------------------------------------------------------

class ServerState:
    def __init__(self, engine: Engine, scheduler: Scheduler, config: ServerConfig,
                 model_thread: ModelThread | None = None) -> None:
        self.engine, self.scheduler, self.config = engine, scheduler, config
        self.worker = Worker(scheduler, max_queue=config.max_queue, model_thread=model_thread)
        self.metrics = ServerMetrics(lambda: dict(self.worker.snapshot, queued_requests=self.worker.queue_depth))
        self.tokens = TokenText(engine.tokenizer)
        self.created = int(time.time())
        tok = engine.tokenizer
        id_of = tok.token_to_id if tok is not None and hasattr(tok, "token_to_id") else (lambda _: None)
        self.end_think_id, self.assistant_id = id_of("</think>"), id_of(ASSISTANT)
        self.tools_checked = False  # whether the chat template was seen to render `tools` (warned once if not)
        key = config.api_key
        self._key_digest = hashlib.sha256(key.encode("utf-8")).digest() if key else None

    def open_turn(self, ids: list[int]) -> str:
        """The text of the assistant turn a chat prompt leaves open: what follows its last
        <｜Assistant｜> (a generation prompt, or a prefix being continued), else its last tokens."""
        at = len(ids) - 1 - ids[::-1].index(self.assistant_id) if self.assistant_id in ids else len(ids) - 4
        return self.engine.tokenizer.decode(ids[max(0, at + 1):], skip_special=False)

    def authorized(self, header: str | None) -> bool:
        if self._key_digest is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(given, self._key_digest) and scheme.lower() == "bearer"


class Guard:
    """Pure ASGI middleware: DeepSeek's path aliases, API key on /v1, body size limit, request
    counts by status."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = canonical_path(scope.get("path", ""))
        if path != scope.get("path"):  # an alias: route it (and check its key) as the /v1 path
            scope = {**scope, "path": path, "raw_path": path.encode()}
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = [500]
        m = self.state.metrics

        async def send_counted(msg) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        async def reply(code: int, message: str, err_code: str | None, headers: dict | None = None) -> None:
            body = json.dumps(error_body(code, message, None, err_code)).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
            await send_counted({"type": "http.response.start", "status": code, "headers": hdrs})
            await send_counted({"type": "http.response.body", "body": body})

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if path.startswith("/v1") and not self.state.authorized(headers.get("authorization")):
                m.rejected.inc(reason="unauthorized")
                return await reply(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                   "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                limit = self.state.config.max_body_bytes
                too_big = f"The request body is larger than this server's limit of {limit} bytes."
                try:
                    declared = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    declared = 0
                if declared > limit:
                    m.rejected.inc(reason="too_large")
                    return await reply(413, too_big, "request_too_large")
                chunks, size = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        status[0] = 499  # the client left before its body arrived: no response, no server error
                        return
                    chunks.append(msg.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        m.rejected.inc(reason="too_large")
                        return await reply(413, too_big, "request_too_large")
                    if not msg.get("more_body", False):
                        break
                body = b"".join(chunks)
                replayed = [False]

                async def replay():
                    if not replayed[0]:
                        replayed[0] = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_counted)
            return await self.app(scope, receive, send_counted)
        finally:
            m.requests.inc(route=route, status=status[0])


def _allow_origins(app: FastAPI, origins: tuple[str, ...]) -> None:
    """CORS for `origins`, outermost: a browser's preflight (OPTIONS) carries no key, so it is
    answered before Guard; and 500s, which Starlette's error middleware sends from outside every
    added middleware, carry the headers too (a page can read them)."""
    from starlette.middleware.cors import CORSMiddleware

    class CORS(CORSMiddleware):
        def preflight_response(self, request_headers):
            r = super().preflight_response(request_headers)
            if r.status_code >= 400:  # "Disallowed CORS origin" as text: OpenAI's error JSON instead
                msg = f"CORS preflight refused: {r.body.decode('utf-8', 'replace')}."
                return JSONResponse(error_body(r.status_code, msg, None, "cors_refused"), status_code=r.status_code)
            return r

    build = app.build_middleware_stack

    def build_with_cors():
        return CORS(build(), allow_origins=list(origins), allow_methods=["GET", "POST"], allow_headers=["*"],
                    expose_headers=["Retry-After", "x-should-retry"], max_age=600)

    app.build_middleware_stack = build_with_cors


def create_app(engine: Engine, scheduler: Scheduler | None = None, config: ServerConfig | None = None,
               model_thread: ModelThread | None = None) -> FastAPI:
    """The application. model_thread: the thread that loaded the engine (see worker.ModelThread);
    the step loop runs on it, or on a new thread when None."""
    config = config or ServerConfig()
    scheduler = scheduler or Scheduler(engine)
    state = ServerState(engine, scheduler, config, model_thread)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a nanoseek (DeepSeek-V3) model")
    app.state.nanoseek = state
    app.add_middleware(Guard, state=state)
    if config.allowed_origins:
        _allow_origins(app, config.allowed_origins)

    # -- errors: always OpenAI's error JSON ------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status in (400, 404, 413, 422):
            state.metrics.rejected.inc(reason="invalid")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        # A field of several types (stop: a string or a list) fails once per type; the branch that
        # took the value's type and refused the value says what is wrong, so it goes first.
        errs = sorted(e.errors(), key=lambda x: str(x.get("type", "")).endswith("_type"))
        first = errs[0] if errs else {}
        state.metrics.rejected.inc(reason="invalid")
        if first.get("type") == "json_invalid":
            msg = f"The body is not valid JSON ({(first.get('ctx') or {}).get('error', 'decode error')})."
            return JSONResponse(error_body(400, msg, None, "json_invalid"), status_code=400)
        param = _param_of(first)
        msg = "; ".join(f"{_param_of(x) or 'body'}: {x.get('msg', 'invalid')}" for x in errs[:5])
        ctype = request.headers.get("content-type", "")
        if param is None and "json" not in ctype.lower():  # the body was never read as JSON
            msg = f"Send the body as JSON with 'Content-Type: application/json' (got {ctype or 'none'!r}). {msg}"
        return JSONResponse(error_body(400, msg, param, first.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg, code = str(e.detail), None
        if e.status_code == 400 and msg == "There was an error parsing the body":
            # FastAPI's answer when json.loads raises something other than a decode error: an integer
            # of more than 4,300 digits (Python's int-from-text limit)
            state.metrics.rejected.inc(reason="invalid")
            msg, code = ("The body is not valid JSON (it holds a value the parser refuses, such as an integer of "
                         "more than 4,300 digits)."), "json_invalid"
        return JSONResponse(error_body(e.status_code, msg, None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error", None, None), status_code=500)

    # -- plain routes ----------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])  # (HEAD: load balancers' probes)
    async def health():
        ok = state.worker.alive
        body = {"status": "ok" if ok else "worker stopped", "running": state.worker.snapshot["running"],
                "waiting": state.worker.snapshot["waiting"], "queued_requests": state.worker.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
                "max_model_len": scheduler.max_tokens_per_sequence}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{config.model_name}'.",
                           "model", "model_not_found")
        return _model_card()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        from .page import chat_page

        return HTMLResponse(chat_page(config.model_name, bool(config.api_key)))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    # -- generation ------------------------------------------------------------------------------
    def _message(m) -> dict:
        """A request message as the chat template reads it (OpenAI's `developer` is a system turn)."""
        out = {"role": "system" if m.role == "developer" else m.role,
               "content": None if m.content is None and m.tool_calls else m.text()}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id or f"call_{i}", "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for i, c in enumerate(m.tool_calls)]
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                out[key] = getattr(m, key)
        return out

    def _check_options(body) -> None:
        """Options that only mean something beside another one (OpenAI answers 400 for these)."""
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")
        if getattr(body, "top_logprobs", None) and not body.logprobs:  # (0 asks for nothing)
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")

    def _thinking(body: ChatCompletionRequest) -> bool:
        """Thinking mode asked for: DeepSeek's `thinking: {"type": ...}`, or the template variable
        (`chat_template_kwargs`); both given must agree. Off unless asked for."""
        kwargs = body.chat_template_kwargs
        wanted = bool(kwargs and kwargs.wants_thinking)
        if body.thinking is None:
            return wanted
        enabled = body.thinking.type == "enabled"
        if kwargs is not None and kwargs.model_fields_set & {"thinking", "enable_thinking"} and wanted != enabled:
            raise APIError(400, f"thinking.type is {body.thinking.type!r} but chat_template_kwargs asks for the "
                                "opposite", "thinking", "invalid_value")
        return enabled

    def _continues(body: ChatCompletionRequest) -> bool:
        """Does the request continue its last message (DeepSeek's `prefix: true` on it, or vLLM's
        `continue_final_message`)? The tokenizer checks that it can (an assistant turn with text)."""
        flagged = [i for i, m in enumerate(body.messages) if m.prefix]
        if flagged and flagged != [len(body.messages) - 1]:
            raise APIError(400, f"messages[{flagged[0]}]: only the last message may carry prefix: true", "messages",
                           "invalid_value")
        if not (flagged or body.continue_final_message):
            return False
        if "add_generation_prompt" in body.model_fields_set and body.add_generation_prompt:
            raise APIError(400, "continue_final_message continues the last assistant turn; add_generation_prompt "
                                "would open a new one: send one of them", "add_generation_prompt", "invalid_value")
        return True

    def _tools(body) -> tuple[list[dict] | None, bool, ToolCallRule | None]:
        """(the function definitions for the chat template, whether to read tool calls out of the
        output, the rule that forces calls for tool_choice "required" or a named function)."""
        choice = body.tool_choice
        if choice is not None and not body.tools:
            raise APIError(400, "tool_choice is only allowed when tools are given", "tool_choice", "invalid_value")
        if not body.tools:
            return None, False, None
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        for t in tools:  # OpenAI: "omitting parameters defines a function with an empty parameter list"
            t["function"].setdefault("parameters", {"type": "object", "properties": {}})
        wants_json = any(_response_format(body.response_format))
        try:
            rule = engine.tool_call_rule(tools, choice if isinstance(choice, (str, type(None))) else
                                         choice.model_dump(), body.parallel_tool_calls, json_answer=wants_json)
        except SamplingError as e:
            raise APIError(400, str(e), "tool_choice", "invalid_value") from None
        if rule is not None and not rule.optional:
            if wants_json:
                raise APIError(400, "response_format JSON cannot be combined with a forced tool call (tool_choice)",
                               "response_format", "invalid_value")
            if scheduler.k:
                raise APIError(400, "tool_choice 'required' or a named function needs constrained decoding, which "
                                    f"does not combine with speculative decoding (this server runs --speculative "
                                    f"{scheduler.k})", "tool_choice", "unsupported_parameter")
        return tools, choice != "none", rule

    def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias (JSON keys are strings: token ids) as the engine's {id: bias}."""
        if not bias:
            return None
        V = engine.config.vocab_size
        for k in bias:
            if not (re.fullmatch(r"[0-9]{1,10}", k) and int(k) < V):  # (str.isdigit takes "²" and "١")
                raise APIError(400, f"logit_bias keys must be token ids in [0, {V}), got {k!r}", "logit_bias",
                               "invalid_value")
        return {int(k): v for k, v in bias.items()}

    def _params(body, max_tokens: int, logprobs: int | None,
                tool_call: ToolCallRule | None = None) -> SamplingParams:
        unsupported = []
        json_object, schema = _response_format(getattr(body, "response_format", None))
        if getattr(body, "best_of", None) not in (None, body.n):
            unsupported.append("best_of")
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by this server", unsupported[0], "unsupported_parameter")
        top_p = 1.0 if body.top_p is None else (body.top_p if body.top_p > 0 else 1e-9)
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens, logit_bias=_logit_bias(body.logit_bias),
                json_object=json_object, json_schema=schema, tool_call=tool_call)
        except SamplingError as e:
            param = ("response_format" if str(e).startswith("json_schema") else
                     "tools" if str(e).startswith("tool_call") else None)
            raise APIError(400, str(e), param, "invalid_value") from None

    def _seed(seed: int | None, j: int) -> int | None:
        """Choice j's seed: the request's + j (wrapping within the seed range)."""
        return None if seed is None else (seed + j if seed + j < 2**64 else seed + j - 2**64)

    def _response_format(rf: dict | None) -> tuple[bool, dict | None]:
        """(JSON mode, JSON Schema) from OpenAI's response_format."""
        kind = (rf or {}).get("type", "text")
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, "response_format json_schema needs {\"name\", \"schema\": {...}}", "response_format",
                               "invalid_value")
            return False, spec.get("schema", {"type": "object"})
        if kind not in ("text", "json_object"):
            raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                           "response_format", "invalid_value")
        return kind == "json_object", None

    def _max_tokens(requested: int | None, prompt_len: int, param: str) -> int:
        limit = scheduler.max_tokens_per_sequence
        if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
            want = prompt_len + (requested or 0)
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{want} tokens ({prompt_len} in the {param}, {requested or 0} in the completion). "
                                f"Please reduce the length of the {param} or completion.",
                           param, "context_length_exceeded")
        return requested if requested is not None else limit - prompt_len

    def _encode_all(prompts: list) -> list:
        """Token ids of each prompt, or the SamplingError it raised (encoding runs off the event loop)."""
        out = []
        for prompt in prompts:
            try:
                out.append(engine.encode(prompt))  # as Engine.generate: BOS added to text when the tokenizer has one
            except SamplingError as e:
                out.append(e)
        return out

    async def _submit(prefix: str, prompts: list, body, requested: int | None, logprobs: int | None,
                      tool_call: ToolCallRule | None = None):
        """Sequences for every prompt x n; returns (request id, stream, prompt lengths)."""
        arrival = time.perf_counter()
        rid = f"{prefix}-{uuid.uuid4().hex}"
        seqs, lens = [], []
        param = "prompt" if prefix == "cmpl" else "messages"
        # a megabyte of text takes a second to tokenize, a large JSON schema a while to compile: in a
        # thread, other streams keep flowing
        encoded = await asyncio.to_thread(_encode_all, prompts)

        def build() -> None:
            for p_i, ids in enumerate(encoded):
                try:
                    if isinstance(ids, SamplingError):
                        raise ids
                    if not ids:
                        raise SamplingError(f"prompt {p_i} is empty")
                    mt = _max_tokens(requested, len(ids), param)
                    first = _params(body, mt, logprobs, tool_call)  # choice 0's
                    for j in range(body.n):  # (the choices differ in their seed only: one compiled schema)
                        params = first
                        if j:
                            params = copy.copy(first)
                            params.seed = _seed(body.seed, j)
                        seqs.append(scheduler.make_sequence(f"{rid}-{p_i * body.n + j}", ids, params))
                except SamplingError as e:
                    raise APIError(400, str(e), param, "invalid_value") from None
                lens.append(len(ids))

        await asyncio.to_thread(build)
        try:
            stream = state.worker.submit(seqs, arrival)
        except QueueFull as e:
            state.metrics.rejected.inc(reason="queue_full")
            raise APIError(429, str(e), None, "rate_limit_exceeded", {"Retry-After": str(e.retry_after)}) from None
        except StreamEnded as e:  # (the server began to stop while this request was being validated)
            raise _ended(e) from None
        state.metrics.prompt_tokens.inc(sum(lens))
        return rid, stream, lens

    async def _next(stream: GenStream, deadline: float) -> SeqUpdate:
        return await stream.get(deadline)

    async def _collect(request: Request, tracker: Tracker) -> None:
        """Run a non-streaming request to the end (or to a disconnect / the timeout)."""
        stream = tracker.stream
        deadline = stream.arrival + config.request_timeout
        watcher = asyncio.ensure_future(_watch_disconnect(request, stream))
        try:
            while not tracker.done:
                tracker.apply(await _next(stream, deadline))
        except (TimeoutError, asyncio.TimeoutError):
            tracker.close("timeout")
            raise _timed_out("The request") from None
        except _ClientGone:
            tracker.close("abort")
            raise
        except StreamEnded as e:  # (the model step failed, or the server is shutting down)
            tracker.close(e.reason)
            raise _ended(e) from None
        finally:
            watcher.cancel()
            if not tracker.done:
                tracker.close("abort")

    def _ended(e: StreamEnded) -> APIError:
        """What a stream the server ended (a failed step, shutdown) answers: its status and code."""
        return APIError(e.status, str(e), None, e.code)

    def _timed_out(what: str) -> APIError:
        # x-should-retry: the openai client retries a 408 (twice by default), and a request that ran
        # out of time would run out of it again, at the same cost each time
        return APIError(408, f"{what} did not finish within the server's timeout of {config.request_timeout:g} s.",
                        None, "request_timeout", {"x-should-retry": "false"})

    def _usage(tracker: Tracker, lens: list[int], reasoning: int | None = None) -> dict:
        completion = sum(len(s.ids) for s in tracker.seqs.values())
        prompt = sum(lens)
        # a prompt counts once, with what the cache gave its first prefill: choices admitted later
        # find the blocks the first one stored, and report more
        first: dict[int, int] = {}
        for s in tracker.seqs.values():
            first[s.index // tracker.n] = min(first.get(s.index // tracker.n, s.cached), s.cached)
        cached = sum(first.values())
        u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cached},  # OpenAI's name
             "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached}  # DeepSeek's
        if reasoning is not None:
            u["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return u

    def _chat_logprobs(ids: list[int], lps: list[float], tops: list[dict[int, float]]) -> dict:
        tt = state.tokens

        def entry(i: int, lp: float) -> dict:
            return {"token": tt.text_of(i), "logprob": _finite(lp), "bytes": list(tt.bytes_of(i))}

        return {"content": [dict(entry(i, lp), top_logprobs=[entry(t, v) for t, v in top.items()])
                            for i, lp, top in zip(ids, lps, tops)]}

    def _completion_logprobs(ids: list[int], lps: list[float], tops: list[dict[int, float]],
                             offsets: list[int]) -> dict:
        """OpenAI's legacy logprobs object; `offsets` where each token starts in the returned text."""
        tt = state.tokens
        return {"tokens": [tt.label_of(i) for i in ids], "token_logprobs": [_finite(x) for x in lps],
                "top_logprobs": [_tops_with(tt, d, i, lp) for i, lp, d in zip(ids, lps, tops)],
                "text_offset": offsets}

    async def _events(tracker: Tracker, head: dict, opening: list[dict],
                      choice_of: Callable[[SeqUpdate], list[dict]],
                      usage: Callable[[], dict] | None) -> AsyncIterator[str]:
        """A streaming response's server-sent events: the opening chunks, the chunks each update has
        to say (`choice_of`: none, one, or reasoning then answer), a timeout or failure as an error
        event, the usage chunk when asked for, and [DONE]."""
        stream = tracker.stream
        deadline = stream.arrival + config.request_timeout
        if usage is not None:  # OpenAI: with include_usage, every other chunk has "usage": null
            head = {**head, "usage": None}
        for choice in opening:
            yield _sse({**head, "choices": [choice]})
        try:
            while not tracker.done:
                # Updates already queued behind this one (the loop fell behind the model) go out in
                # the same write: the same events, one pass through the ASGI send chain.
                update = await _next(stream, deadline)
                events, error = [], None
                try:
                    while update is not None:
                        events += [_sse({**head, "choices": [c]}) for c in choice_of(update)]
                        update = None if tracker.done else stream.get_ready()
                except Exception as e:  # noqa: BLE001 - raised below, after the events before it are sent
                    error = e
                if events:
                    yield "".join(events)
                if error is not None:
                    raise error
        except (TimeoutError, asyncio.TimeoutError):
            tracker.close("timeout")
            yield _sse(_timed_out("The request").body())
        except StreamEnded as e:
            tracker.close(e.reason)
            yield _sse(_ended(e).body())
        if usage is not None:
            yield _sse({**head, "choices": [], "usage": usage()})
        yield _sse("[DONE]")

    async def _score_prompt(prompt, top: int, deadline: float) -> dict:
        """OpenAI's legacy logprobs object for the prompt's own tokens (echo): the first token has no
        logprob; text_offset indexes the echoed text (no added BOS; token-id prompts are echoed
        without special tokens). `deadline`: the request's (time.perf_counter())."""
        try:
            run = state.worker.run(lambda: engine.prompt_logprobs(prompt, top))
            ids, lps, tops = await asyncio.wait_for(run, timeout=max(0.0, deadline - time.perf_counter()))
        except SamplingError as e:
            raise APIError(400, str(e), "prompt", "invalid_value") from None
        except (TimeoutError, asyncio.TimeoutError):
            raise _timed_out("Scoring the prompt") from None
        except StreamEnded as e:  # (the server is stopping)
            raise _ended(e) from None
        tt = state.tokens
        text = isinstance(prompt, str)
        bos = text and getattr(engine.tokenizer, "bos_id", None) is not None  # Engine.encode added it
        # (a text prompt is echoed as sent, special tokens' text included; token ids as decoded)
        offsets = TextOffsets(tt, skip_special=not text)
        return {"tokens": [tt.label_of(i) for i in ids], "token_logprobs": [None if x is None else _finite(x) for x in lps],
                "top_logprobs": [None if d is None else _tops_with(tt, d, i, lp) for i, lp, d in zip(ids, lps, tops)],
                "text_offset": [0] + offsets.feed(ids[1:]) if bos else offsets.feed(ids)}

    def _joined(first: dict | None, then: dict) -> dict:
        return then if first is None else {k: first[k] + then[k] for k in then}

    def _reasoning_tokens(tracker: Tracker, skip_special: bool) -> int:
        total = 0
        for s in tracker.seqs.values():
            if s.parser is None:
                continue
            # (offsets find a </think> written in pieces, which may come before a </think> token)
            offsets = TextOffsets(state.tokens, skip_special).feed(s.ids) if END_THINK in s.text else None
            total += reasoning_token_count(s.ids, state.end_think_id, s.parser.saw_reasoning, s.text, offsets)
        return total

    async def _opens_reasoning(ids: list[int], msgs: list[dict], thinking: bool, tools: list[dict] | None,
                               continue_final_message: bool, add_generation_prompt: bool) -> bool:
        """Does the output start inside a <think> block that the template opened: in its generation
        prompt, or in the assistant message being continued? A <think> in the text of earlier
        messages opens nothing, also where no <｜Assistant｜> follows them (R1's template writes
        nothing after tool results, so the last one is the tool-calling turn's)."""
        if not prompt_opens_reasoning(state.open_turn(ids)):
            return False
        earlier = msgs[:-1] if continue_final_message else msgs

        def turn() -> str | None:  # (texts, not ids: rendering is cheap, tokenizing a long history is not)
            whole = engine.chat_text(msgs, thinking, tools, continue_final_message, add_generation_prompt)
            base = engine.chat_text(earlier, thinking, tools, add_generation_prompt=False) if earlier else ""
            return whole[len(base):] if whole.startswith(base) else None

        try:  # the prompt up to the turn the output continues: what the template adds is the rest
            rest = await asyncio.to_thread(turn)
        except (SamplingError, ValueError):
            return True
        return True if rest is None else prompt_opens_reasoning(rest)  # (None: earlier turns render differently)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if engine.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer, and this model has none (serve it with --tokenizer)", None,
                           "no_tokenizer")
        _check_options(body)
        thinking = _thinking(body)
        tools, parse_calls, forced = await asyncio.to_thread(_tools, body)  # (compiles the tools' schemas)
        msgs = [_message(m) for m in body.messages]
        render = dict(continue_final_message=_continues(body), add_generation_prompt=body.add_generation_prompt)
        try:
            ids = await asyncio.to_thread(functools.partial(engine.chat_prompt, msgs, thinking, tools, **render))
        except (SamplingError, ValueError) as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        if tools and not state.tools_checked:
            state.tools_checked = True
            if ids == await asyncio.to_thread(functools.partial(engine.chat_prompt, msgs, thinking, None, **render)):
                log.warning("the chat template ignores `tools`: the model is not told which tools it has (the "
                            "templates DeepSeek-V3, R1 and V3.1 ship do not list them); serve with --chat-template "
                            "FILE, a template that does")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        # the output starts inside a reasoning block if the rendered prompt opened one
        opened = await _opens_reasoning(ids, msgs, thinking, tools, **render)
        if opened and any(_response_format(body.response_format)):
            raise APIError(400, "response_format JSON cannot be combined with a prompt that opens a reasoning block "
                                "(the reasoning would be forced into JSON)", "response_format", "invalid_value")
        if opened and forced:
            raise APIError(400, "tool_choice 'required' or a named function cannot be combined with a prompt that "
                                "opens a reasoning block (the call is forced from the first token)", "tool_choice",
                           "invalid_value")
        rid, stream, lens = await _submit("chatcmpl", [ids], body, requested, logprobs, forced)
        begin = engine.tokenizer.token_to_id(TOOL_CALLS_BEGIN) if parse_calls else None
        tracker = Tracker(state.metrics, stream, lens, body.n, opened, begin, state.end_think_id)
        created = int(time.time())
        base = {"id": rid, "created": created, "model": config.model_name, "system_fingerprint": "nanoseek"}

        if not body.stream:
            try:
                await _collect(request, tracker)
            except _ClientGone:
                return Response(status_code=499)
            choices = []
            for s in sorted(tracker.seqs.values(), key=lambda s: s.index):
                msg = {"role": "assistant", "content": s.content,
                       "reasoning_content": s.reasoning if s.parser.saw_reasoning else None}
                if s.calls:
                    calls = s.calls if body.parallel_tool_calls else s.calls[:1]
                    msg["tool_calls"] = [c.as_openai() for c in calls]
                    msg["content"] = s.content if s.content.strip() else None
                choice = {"index": s.index, "message": msg, "logprobs": None, "finish_reason": s.finish}
                if logprobs is not None:
                    choice["logprobs"] = _chat_logprobs(s.ids, s.lps, s.tops)
                if body.return_token_ids:
                    choice["token_ids"], choice["prompt_token_ids"] = s.ids, ids
                choices.append(choice)
            return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                                 "usage": _usage(tracker, lens, _reasoning_tokens(tracker, body.skip_special_tokens))})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        head = {**base, "object": "chat.completion.chunk"}
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(len(stream.seq_ids))]

        def choice_of(u: SeqUpdate) -> list[dict]:
            before = len(tracker.seqs[u.seq_id].calls)
            s, r, c = tracker.apply(u)
            delta = {}
            first = None
            if r and c:  # (held-back text, or several tokens a step) reasoning, then the answer: as DeepSeek,
                # never both in one delta
                first = {"index": s.index, "delta": {"reasoning_content": r}, "logprobs": None, "finish_reason": None}
            elif r:
                delta["reasoning_content"] = r
            if c:
                delta["content"] = c
            new_calls = [(k, call) for k, call in enumerate(s.calls[before:], before)
                         if body.parallel_tool_calls or k == 0]
            if new_calls:
                delta["tool_calls"] = [{"index": k, **call.as_openai()} for k, call in new_calls]
            choice = {"index": s.index, "delta": delta, "logprobs": None, "finish_reason": s.finish}
            if logprobs is not None and u.token_ids:
                choice["logprobs"] = _chat_logprobs(u.token_ids, u.logprobs or [], _tops(u))
            if body.return_token_ids:
                choice["token_ids"] = u.token_ids
            if first is not None:
                return [first, choice]
            return [choice] if delta or s.finish or choice["logprobs"] or choice.get("token_ids") else []

        usage = (lambda: _usage(tracker, lens, _reasoning_tokens(tracker, body.skip_special_tokens))) if include_usage else None
        return EventStream(_events(tracker, head, opening, choice_of, usage), on_close=lambda: tracker.close("abort"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_options(body)
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if any(isinstance(x, str) for x in prompts) and engine.tokenizer is None:
            raise APIError(400, "text prompts need a tokenizer, and this model has none: send token ids, "
                                "or serve it with --tokenizer", "prompt", "no_tokenizer")
        if body.suffix is not None:  # fill in the middle: each prompt is the text before the hole
            if body.echo:
                raise APIError(400, "echo cannot be combined with suffix", "echo", "invalid_value")
            if not all(isinstance(x, str) for x in prompts):
                raise APIError(400, "suffix needs text prompts (the text before the gap), not token ids", "prompt",
                               "invalid_value")
            try:
                prompts = await asyncio.to_thread(lambda: [engine.fim_prompt(x, body.suffix) for x in prompts])
            except SamplingError as e:
                raise APIError(400, str(e), "suffix", "invalid_value") from None
        logprobs = body.logprobs
        # a token-id prompt that ends inside a character: the completion's text begins with that
        # whole character (the engine decodes it with the prompt's tail), so the echo leaves it out,
        # unless no token is asked for (then the echo is all there is)
        tails = [unfinished_tail(engine.tokenizer, x)[1] if isinstance(x, list) and body.max_tokens != 0 else b""
                 for x in prompts]
        rid, stream, lens = await _submit("cmpl", prompts, body, body.max_tokens, logprobs)
        tracker = Tracker(state.metrics, stream, lens, body.n, None)
        # echo + logprobs: the prompt tokens' logprobs come first (scored once the request has passed
        # the length checks and the queue bound; it generates meanwhile)
        scored = [None] * len(prompts)
        echo_text = []
        try:  # (the sequences run from here on: whatever fails stops them)
            if body.echo and logprobs is not None:
                for i, x in enumerate(prompts):
                    scored[i] = await _score_prompt(x, logprobs, stream.arrival + config.request_timeout)
            for x, tail in zip(prompts, tails):
                if not body.echo:
                    echo_text.append("")
                elif isinstance(x, str):
                    echo_text.append(x)
                else:
                    text = engine.decode(x) if engine.tokenizer is not None else ""
                    echo_text.append(text[:-1] if tail else text)
        except BaseException as e:
            tracker.close("timeout" if isinstance(e, APIError) and e.status == 408 else "abort")
            raise
        n = body.n
        created = int(time.time())
        base = {"id": rid, "created": created, "model": config.model_name, "system_fingerprint": "nanoseek"}

        if not body.stream:
            try:
                await _collect(request, tracker)
            except _ClientGone:
                return Response(status_code=499)
            choices = []
            for s in sorted(tracker.seqs.values(), key=lambda s: s.index):
                pre = echo_text[s.index // n]
                choice = {"index": s.index, "text": pre + s.content, "logprobs": None, "finish_reason": s.finish}
                if logprobs is not None:
                    offsets = TextOffsets(state.tokens, body.skip_special_tokens, len(pre), tails[s.index // n])
                    choice["logprobs"] = _joined(scored[s.index // n], _completion_logprobs(
                        s.ids, s.lps, s.tops, offsets.feed(s.ids, len(pre) + len(s.content))))
                if body.return_token_ids:
                    choice["token_ids"] = s.ids
                choices.append(choice)
            return JSONResponse({**base, "object": "text_completion", "choices": choices,
                                 "usage": _usage(tracker, lens)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        head = {**base, "object": "text_completion"}
        offsets = {i: TextOffsets(state.tokens, body.skip_special_tokens, len(echo_text[i // n]), tails[i // n])
                   for i in range(len(stream.seq_ids))} if logprobs is not None else {}
        opening = [{"index": i, "text": echo_text[i // n], "logprobs": scored[i // n], "finish_reason": None}
                   for i in range(len(stream.seq_ids)) if echo_text[i // n] or scored[i // n]]

        def choice_of(u: SeqUpdate) -> list[dict]:
            s, _, c = tracker.apply(u)
            choice = {"index": s.index, "text": c, "logprobs": None, "finish_reason": s.finish}
            if logprobs is not None and u.token_ids:
                # (the text's end is known once the choice finishes: a stop string may have cut it)
                end = len(echo_text[s.index // n]) + len(s.content) if s.finish else None
                choice["logprobs"] = _completion_logprobs(u.token_ids, u.logprobs or [], _tops(u),
                                                          offsets[s.index].feed(u.token_ids, end))
            if body.return_token_ids:
                choice["token_ids"] = u.token_ids
            return [choice] if c or s.finish or choice["logprobs"] or choice.get("token_ids") else []

        usage = (lambda: _usage(tracker, lens)) if include_usage else None
        return EventStream(_events(tracker, head, opening, choice_of, usage), on_close=lambda: tracker.close("abort"))

    return app
