"""Offline batch generation, in the shape vLLM users know.

    from pyserve import LLM, SamplingParams
    llm = LLM("path/to/model")
    outs = llm.generate(["Hello", "Once upon"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids
"""

import itertools
from pathlib import Path

import torch

from .engine import load_engine
from .engine.llm import LLMEngine, RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None,
                 plugin_dirs: list[str] | None = None, lora: dict[str, str | Path] | None = None, **engine_args):
        """`lora` maps adapter names to PEFT adapter directories, loaded over the base model."""
        engine = load_engine(model, plugin_dirs=plugin_dirs, device=device, dtype=dtype, **engine_args)
        if not isinstance(engine, LLMEngine):
            raise ValueError(f"{model} is a {engine.info.task} model; LLM serves text-generation models")
        self.engine = engine
        for name, path in (lora or {}).items():
            engine.load_lora(name, path)
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]] | list[int],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 cache_salt: str | None = None, lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); outputs in prompt order.
        Prompts share cached prefixes only with requests of the same `cache_salt`. `lora` names
        the adapter of every prompt, or of each (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = lora if isinstance(lora, list) else [lora] * len(prompts)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p, adapter in zip(ids, prompts, params_list, adapters):
            self.engine.add_request(request_id, prompt, p, cache_salt, lora=adapter)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate replies to conversations, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, params)
