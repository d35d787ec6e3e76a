"""Generation: a preallocated KV cache, sampling, and the batched streaming engine every surface uses."""

from .engine import Engine, GenerationRequest, GenerationResult, RequestError, StreamDelta
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "RequestError", "SamplingParams", "StreamDelta"]
