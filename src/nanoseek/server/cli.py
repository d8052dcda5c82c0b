"""`nanoseek serve MODEL`: the OpenAI-compatible server (see docs/server.md)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import sys

from ..engine.cli import add_model_flags, engine_kwargs, positive_int, whole_number

DEFAULT_MAX_MODEL_LEN = 8192
SWITCH_INTERVAL_S = 0.0001  # GIL hand-off between the model thread and the event loop (see run_serve)


def _port(text: str) -> int:
    port = whole_number(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535] (0: any free port), got {text}")
    return port


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return x


def _size(text: str) -> int:
    from ..checkpoint import parse_size
    from ..config import ConfigError

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("NANOSEEK_API_KEY") or None


def _context(app) -> int:
    return app.state.nanoseek.engine.max_context


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # (unreachable)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description="Serve MODEL over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics, and a chat page at /.")
    p.add_argument("model", help="run directory, Hugging Face directory, Hub id, or preset name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGINS",
                   help="web origins allowed to call the API from a browser (CORS), comma-separated or the flag "
                        "repeated, e.g. http://localhost:3000, or * for any (default: none; the chat page at / "
                        "needs none)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port, printed at start)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the MODEL's name)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most sequences decoded together (default 32)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help=f"context per sequence, prompt + output (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--kv-cache-bytes", type=_size, default=None,
                   help="latent-cache budget for admission, e.g. 2GiB (default: max-batch full-length sequences)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the latent cache of earlier prompts and answers that a new prompt begins with "
                        "(a shared system prompt, a chat's earlier turns); not with --speculative")
    p.add_argument("--prefix-cache-bytes", type=_size, default="256MiB",
                   help="memory for the prefix cache, least recently used blocks dropped first (default 256MiB)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=positive_int, default=None,
                   help="positions prefilled in one step: distinct prompts x the longest, rows being padded to it "
                        "(default: max(max-model-len, 2048))")
    p.add_argument("--request-timeout", type=_seconds, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-bytes", type=_size, default="2MiB", help="request body size limit (default 2MiB)")
    p.add_argument("--header-timeout", type=_seconds, default=10.0,
                   help="seconds a connection has to send a request's headers before it is closed (default 10)")
    add_model_flags(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the shared sampler (unseeded requests)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def build(args: argparse.Namespace):
    """(app, config) from parsed arguments: loads the model."""
    import torch

    from ..engine import Engine, SamplingError
    from ..engine.scheduler import Scheduler
    from .app import ServerConfig, create_app
    from .worker import ModelThread

    if args.threads:
        torch.set_num_threads(args.threads)
    model_thread = ModelThread()  # every torch call on one thread (see ModelThread)
    engine = model_thread.call(lambda: Engine(args.model, seed=args.seed, **engine_kwargs(args)))
    ctx = args.max_model_len or min(engine.config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if args.max_model_len is not None and not 2 <= args.max_model_len <= engine.config.max_position_embeddings:
        raise SamplingError(_max_model_len_problem(args.max_model_len, engine.config.max_position_embeddings))
    if args.compile:  # compile every decode shape before the first request, not during one
        print("nanoseek serve: compiling the decode step for every batch shape (minutes the first time)...",
              file=sys.stderr, flush=True)
        model_thread.call(lambda: engine.warm_up(args.max_batch, args.speculative or 0))
    engine.max_context = ctx
    budget = args.kv_cache_bytes  # (sizes: parsed by argparse, defaults included)
    prefix = args.prefix_cache_bytes if args.enable_prefix_caching else None
    scheduler = model_thread.call(lambda: Scheduler(engine, max_batch=args.max_batch, kv_cache_bytes=budget,
                                                    speculative=args.speculative,
                                                    max_prefill_tokens=args.max_prefill_tokens,
                                                    prefix_cache_bytes=prefix))
    name = args.served_model_name or os.path.basename(os.path.normpath(str(args.model))) or str(args.model)
    config = ServerConfig(model_name=name, api_key=_api_key(args), max_queue=args.max_queue,
                          request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                          allowed_origins=_origins(args))
    return create_app(engine, scheduler, config, model_thread), config, scheduler


def _flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags taken together (each alone argparse checked), or None."""
    from .app import ServerConfig

    if args.enable_prefix_caching and args.speculative:
        return ("--enable-prefix-caching does not combine with --speculative (the MTP layer's cache at a prefix's "
                "last position depends on the token after it)")
    try:
        ServerConfig(api_key=_api_key(args), allowed_origins=_origins(args))
    except ValueError as e:
        return str(e)
    limit = _position_limit(args.model)
    if args.max_model_len is not None and limit is not None and not 2 <= args.max_model_len <= limit:
        return _max_model_len_problem(args.max_model_len, limit)
    return None


def _http_protocol(header_timeout: float):
    """uvicorn's httptools protocol with limits on headers and slow clients (server/http.py), or
    uvicorn's choice where httptools is missing (h11 caps the head at 16 KiB itself)."""
    try:
        from .http import GuardedHttpToolsProtocol
    except ImportError:
        return "auto"
    return type("Protocol", (GuardedHttpToolsProtocol,), {"header_timeout": header_timeout})


def _origins(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(o.strip() for flag in args.allowed_origins for o in flag.split(",") if o.strip())


def _max_model_len_problem(value: int, limit: int) -> str:
    return f"--max-model-len must be in [2, {limit}] (the model's max_position_embeddings), got {value}"


def _position_limit(model: str) -> int | None:
    """The model's max_position_embeddings where it can be read without loading weights (a preset,
    or a local directory's config.json), else None: the check then runs after loading."""
    from ..checkpoint import CheckpointError, load_config
    from ..config import PRESETS, ConfigError, preset

    try:
        if model in PRESETS and not os.path.exists(model):
            return preset(model).max_position_embeddings
        if os.path.isfile(os.path.join(model, "config.json")):
            return load_config(model).max_position_embeddings  # (the config the loader reads)
    except (OSError, ConfigError, CheckpointError):  # loading will say what is wrong with it
        return None
    return None


def run_serve(args: argparse.Namespace) -> int:
    from ..engine import SamplingError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SamplingError(f"the server needs its extra packages ({', '.join(missing)} missing): "
                            "pip install -e '.[serve]'  (or: pip install 'nanoseek[serve]')")
    import uvicorn

    # The model thread and the event loop share the GIL. At the default 5 ms switch interval a step
    # that is ready waits behind the loop's streaming work for up to 5 ms: on an H100 (CUDA graphs,
    # bench preset, 8 clients) inter-token latency p50 fell from 4.6 to 3.1 ms and throughput rose
    # 13% at 0.5 ms, and 0.1 ms gave another ~10% at 1 and 8 clients (benchmarks/RESULTS.md).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    problem = _flag_problem(args)  # before binding and loading: a wrong flag is told at once
    if problem:
        print(f"nanoseek serve: error: {problem}", file=sys.stderr)
        return 2
    # Bind first: a busy port is reported at once, not after minutes of loading (and compiling).
    # Requests are accepted only once uvicorn listens, after the model is ready.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        print(f"nanoseek serve: error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    try:
        app, config, scheduler = build(args)
    except SamplingError as e:
        sock.close()
        print(f"nanoseek serve: error: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required" if config.api_key else "no API key"
    print(f"nanoseek serve: {config.model_name} on http://{shown}:{port} ({auth}; max batch {scheduler.max_batch}, "
          f"context {scheduler.max_tokens_per_sequence}, cache budget {_fmt_bytes(scheduler.kv_cache_bytes)}"
          f"{', speculative k=' + str(scheduler.k) if scheduler.k else ''}"
          f"{', prefix cache ' + _fmt_bytes(scheduler.prefix.max_bytes) if scheduler.prefix is not None else ''})", flush=True)
    if scheduler.max_tokens_per_sequence < _context(app):
        print(f"nanoseek serve: warning: --kv-cache-bytes holds {scheduler.max_tokens_per_sequence} positions per "
              f"sequence, fewer than the context of {_context(app)}: prompt + output are limited to that",
              file=sys.stderr)
    if host not in ("127.0.0.1", "::1", "localhost") and not config.api_key:
        print("nanoseek serve: warning: listening beyond this machine without an API key", file=sys.stderr)
    worker = app.state.nanoseek.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """Ctrl-C / SIGTERM: uvicorn stops accepting and waits for open requests; end them now,
            each with an error that says the server is shutting down (503), so that they close at
            once instead of being cut off when the grace period runs out."""
            super().handle_exit(sig, frame)
            if worker.loop is not None and not worker.loop.is_closed():
                worker.loop.call_soon_threadsafe(worker.close_streams)

    server = Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                                   timeout_graceful_shutdown=5, http=_http_protocol(args.header_timeout)))
    server.run(sockets=[sock])
    return 0
