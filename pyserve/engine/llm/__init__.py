"""The LLM engine: continuous batching over a paged KV cache with prefix caching."""

from .async_engine import AsyncLLMEngine
from .engine import LLMEngine
from .input_processor import TextRequest
from .params import SamplingParams
from .sequence import CompletionOutput, RequestOutput
from .structured import StructuredOutput

__all__ = ["AsyncLLMEngine", "CompletionOutput", "LLMEngine", "RequestOutput", "SamplingParams", "StructuredOutput",
           "TextRequest"]
