"""The LLM engine: continuous batching over a paged KV cache with prefix caching."""

from .engine import LLMEngine
from .params import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["CompletionOutput", "LLMEngine", "RequestOutput", "SamplingParams"]
