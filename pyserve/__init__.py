"""pyserve: an inference server for generative models with its own kernel core."""

from .engine.llm import SamplingParams
from .llm import LLM

__all__ = ["LLM", "SamplingParams"]
