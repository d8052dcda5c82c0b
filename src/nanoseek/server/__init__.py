"""OpenAI-compatible server: continuous batching, streaming, reasoning output, auth, metrics, chat page.

    nanoseek serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] ...

`create_app(engine, scheduler, config)` builds the FastAPI application (run it with uvicorn);
the continuous-batching scheduler it drives is `nanoseek.engine.scheduler.Scheduler`.

FastAPI and uvicorn are the optional `serve` extra: the names below are imported on first use, so
that the CLI (which registers `serve` from `server.cli`) works on an install without them.
"""

from __future__ import annotations

import importlib

__all__ = ["ServerConfig", "create_app", "ReasoningParser", "split_reasoning"]
_HOMES = {"ServerConfig": ".app", "create_app": ".app", "ReasoningParser": ".reasoning", "split_reasoning": ".reasoning"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
