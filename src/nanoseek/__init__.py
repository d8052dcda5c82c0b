"""nanoseek: a complete, readable DeepSeek-V3 in PyTorch."""

from .config import ConfigError, ModelConfig, PRESETS, preset
from .model import CausalLMOutput, DeepseekV3ForCausalLM, LatentCache

__version__ = "0.1.0"


def load_model(*args, **kwargs):  # noqa: D103 - documented in nanoseek.checkpoint.load_model
    from .checkpoint import load_model as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    # The engine (and its sampling types) import lazily: `import nanoseek` for the model alone stays light.
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


_ENGINE_NAMES = ("Engine", "GenerationResult", "GenerationStats", "StreamChunk", "SamplingParams", "SamplingError")

__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "preset", "CausalLMOutput", "DeepseekV3ForCausalLM",
    "LatentCache", "load_model", "__version__", *_ENGINE_NAMES,
]
