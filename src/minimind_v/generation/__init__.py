"""Generation: a preallocated KV cache, sampling, the batched streaming engine every surface uses, continuous
batching over a fixed pool of KV slots, and the worker thread that owns an engine for servers."""

from .engine import Engine
from .requests import GenerationRequest, GenerationResult, RequestError, StreamDelta
from .sampling import SamplingError, SamplingParams
from .worker import EngineWorker, Job, ServerBusy, WorkerStopped

__all__ = ["Engine", "EngineWorker", "GenerationRequest", "GenerationResult", "Job", "RequestError", "SamplingError",
           "SamplingParams", "ServerBusy", "StreamDelta", "WorkerStopped"]
