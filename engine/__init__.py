"""e3rl's engine: paged KV cache, continuous batching, sampling, self-healing."""

from .config import EngineConfig
from .errors import (EngineDead, EngineError, InvalidRequest, ModelNotSupported, QueueFull,
                     StepFailed, WeightUpdateError)
from .llm import LLM
from .llm_engine import EngineStats, LLMEngine
from .outputs import CompletionOutput, ErasureEvent, RequestOutput, Segment
from .sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "EngineStats", "SamplingParams", "RequestOutput",
    "CompletionOutput", "ErasureEvent", "Segment", "EngineError", "InvalidRequest",
    "QueueFull", "EngineDead", "StepFailed", "ModelNotSupported", "WeightUpdateError",
]
