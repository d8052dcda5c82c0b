"""OpenAI-compatible server: continuous batching, streaming, reasoning output, auth, metrics, chat page.

    nanoseek serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] ...

`create_app(engine, scheduler, config)` builds the FastAPI application (run it with uvicorn);
the continuous-batching scheduler it drives is `nanoseek.engine.scheduler.Scheduler`.
"""

from .app import ServerConfig, create_app
from .reasoning import ReasoningParser, split_reasoning

__all__ = ["ServerConfig", "create_app", "ReasoningParser", "split_reasoning"]
