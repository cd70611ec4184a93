"""The LLM engine behind an asyncio server: the engine driver with a text-shaped `generate`."""

from collections.abc import AsyncIterator

from ..driver import EngineDriver
from .engine import LLMEngine
from .input_processor import TextRequest
from .params import SamplingParams
from .sequence import RequestOutput


class AsyncLLMEngine(EngineDriver):
    """Example:
        engine = AsyncLLMEngine(LLMEngine(model))
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
            print(out.outputs[0].text)
        engine.shutdown()
    """

    def __init__(self, engine: LLMEngine):
        super().__init__(engine)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields an output whenever it progresses, the last with finished=True."""
        return self.submit(request_id, TextRequest(prompt, params))
