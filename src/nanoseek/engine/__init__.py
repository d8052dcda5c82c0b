"""Inference: batched generation on the latent KV cache, sampling, MTP speculative decoding."""

from .engine import Engine, GenerationResult, GenerationStats, StreamChunk
from .sampling import LogitsProcessor, SamplingError, SamplingParams

__all__ = ["Engine", "GenerationResult", "GenerationStats", "StreamChunk", "LogitsProcessor", "SamplingError",
           "SamplingParams"]
