"""nanoseek: a complete, readable DeepSeek-V3 in PyTorch."""

from .config import ConfigError, ModelConfig, PRESETS, preset
from .model import CausalLMOutput, DeepseekV3ForCausalLM, LatentCache

__version__ = "0.1.0"


def load_model(*args, **kwargs):  # noqa: D103 - documented in nanoseek.checkpoint.load_model
    from .checkpoint import load_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "preset", "CausalLMOutput", "DeepseekV3ForCausalLM",
    "LatentCache", "load_model", "__version__",
]
