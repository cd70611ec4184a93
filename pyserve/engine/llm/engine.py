"""The LLM engine core: schedule a step, run it, sample, update; requests come in through the
input processor and go out through the output processor (the shape of vLLM v1)."""

import logging
import time
from collections.abc import Callable

from ...errors import ClientError, InvalidParameter
from ...tasks import TEXT_GENERATION, ImageInput, KVCache, TextGenerationModel, kv_cache_dtype_for
from ..base import EngineInfo, EngineStats
from .adapter_pool import AdapterPool
from .block_manager import BlockManager
from .input_processor import InputProcessor, Request, TextRequest
from .output_processor import OutputProcessor
from .params import SamplingParams
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import RequestOutput

log = logging.getLogger("pyserve.engine")


def _cache_blocks(spec, block_size: int, cache_dtype, kv_cache_memory: int, num_blocks: int | None) -> int:
    """How many KV blocks the budget holds (or `num_blocks` as asked), checked."""
    per_block = 2 * spec.num_layers * spec.num_kv_heads * block_size * spec.head_dim * cache_dtype.itemsize
    if num_blocks is None and kv_cache_memory < per_block:
        raise ValueError(f"kv_cache_memory of {kv_cache_memory} bytes cannot hold one KV block "
                         f"({per_block} bytes for {block_size} tokens)")
    blocks = num_blocks or kv_cache_memory // per_block
    if blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {blocks}")
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", blocks, block_size, blocks * per_block / 2**20,
             str(cache_dtype).removeprefix("torch."))
    return blocks


def _accept_fault(request_id: str, exc: Exception) -> ClientError | str:
    """What a request that failed while taking a token answers: the request's own fault (its
    constraint cannot go on) as it is, anything else as the model's, logged with its traceback."""
    if isinstance(exc, ClientError):
        log.info("request %s stopped: %s", request_id, exc.message)
        return exc
    log.exception("request %s failed while accepting a token", request_id)
    return f"{type(exc).__name__}: {exc}"


class LLMEngine:
    """Continuous batching over a paged KV cache allocated once from a memory budget.

    Example:
        engine = LLMEngine(model)
        engine.add_request("r1", "Hello", SamplingParams(max_tokens=8, temperature=0))
        while engine.has_unfinished():
            for out in engine.step():
                print(out.request_id, out.text)
    """

    def __init__(self, model: TextGenerationModel, *, kv_cache_memory: int = 512 * 2**20, block_size: int = 16,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 num_blocks: int | None = None, max_loras: int = 32, kv_cache_dtype: str | None = None):
        spec = model.spec
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        cache_dtype = kv_cache_dtype_for(spec, kv_cache_dtype)
        self.num_blocks = _cache_blocks(spec, block_size, cache_dtype, kv_cache_memory, num_blocks)
        self.model, self.tokenizer, self.block_size = model, model.tokenizer, block_size
        self.requests: dict[str, Request] = {}
        self.info = EngineInfo(TEXT_GENERATION, self.tokenizer, spec.max_model_len,
                               vision=model.vision, adapters=True, cumulative_outputs=True)
        cache = KVCache.allocate(spec.num_layers, self.num_blocks, spec.num_kv_heads, block_size, spec.head_dim,
                                 cache_dtype, spec.device)
        self.blocks = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, max_loras)
        self.runner = ModelRunner(model, cache, block_size)
        self.adapters = AdapterPool(model, max_loras)  # the scheduler keeps a step's adapters within its slots
        self.inputs = InputProcessor(model, self.adapters, self.num_blocks * block_size, self.info.vision)
        self.defaults = self.inputs.defaults  # generation_config.json's, for parameters a request leaves unset
        self.eos_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else []
        self.outputs = OutputProcessor(self.eos_ids, spec.max_model_len)
        self.step_observers: list[Callable[[int, int], None]] = []  # (sequences, tokens) of every step

    def prepare(self, request: TextRequest) -> TextRequest:
        """Off the engine thread: the request with its structured-output matcher compiled."""
        return self.inputs.prepare(request)

    def add(self, request_id: str, request: TextRequest) -> None:
        """The engine-driver entry point (see pyserve.engine.driver)."""
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already in flight")
        self.requests[request_id] = request = self.inputs.process(request_id, request)
        for seq in request.seqs:
            self.scheduler.add(seq)
        log.info("request %s added: %d prompt tokens, n=%d, max_tokens=%s", request_id, len(request.prompt_ids),
                 request.params.n, request.params.max_tokens)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    cache_salt: str | None = None, images: list[ImageInput] = (), lora: str | None = None) -> None:
        """`add` with the request's fields as arguments (offline use)."""
        self.add(request_id, TextRequest(prompt, params, cache_salt, list(images), lora))

    def load_lora(self, name: str, source) -> None:
        """Load a PEFT LoRA adapter (a directory, or a `pyserve.lora.LoraAdapter` read already)
        under `name`; requests name it to use it (each row of a batch its own adapter, or none).
        Any number may be loaded: `max_loras` of them sit in the model's layers at a time, the
        others wait in host memory."""
        self.adapters.load(name, source)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter; refused while requests use it."""
        self.adapters.unload(name, {seq.adapter for request in self.requests.values() for seq in request.seqs})

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request now; its blocks are freed at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            seq.finish_reason = seq.finish_reason or "abort"
            self.scheduler.finish(seq)
        log.info("request %s aborted", request_id)
        return self.outputs.output(request, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of requests that progressed or failed.

        A fault fails the requests it belongs to and never escapes: a request the scheduler cannot
        place fails alone, a failing model call fails the step's requests, and a fault while
        accepting a token fails that token's request."""
        try:
            step = self.scheduler.schedule()
        except Exception as exc:  # noqa: BLE001 - the queue's state is unknown: fail everything in it
            log.exception("scheduling failed; failing %d request(s)", len(self.requests))
            return self._fail(set(self.requests), f"{type(exc).__name__}: {exc}")
        outputs = self._fail({seq.request_id for seq in step.rejected}, "the KV cache cannot hold this request")
        if not step.items:
            return outputs
        now = time.monotonic()
        for seq, _ in step.items:
            times = self.requests[seq.request_id].times
            times.first_scheduled = times.first_scheduled or now
        for observe in self.step_observers:
            observe(len(step.items), step.num_tokens)
        try:
            slots = self.adapters.place({seq.adapter for seq, _ in step.items if seq.adapter >= 0})
            result = self.runner.run(step, self.eos_ids, slots)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving the rest
            log.exception("model step failed; failing %d request(s)", len(step.items))
            return outputs + self._fail({seq.request_id for seq, _ in step.items}, f"{type(exc).__name__}: {exc}")
        self.outputs.add_prompt_logprobs(result.prompt_logprobs)
        touched = {seq.request_id: self.requests[seq.request_id] for seq in self.scheduler.commit(step)}
        for s in result.sampled:
            if s.seq.request_id not in self.requests:  # failed on an earlier token of this step
                continue
            try:
                if self.outputs.accept(s) is not None:
                    self.scheduler.finish(s.seq)
            except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer fault: this request's alone
                touched.pop(s.seq.request_id, None)
                outputs += self._fail({s.seq.request_id}, _accept_fault(s.seq.request_id, exc))
                continue
            touched[s.seq.request_id] = self.requests[s.seq.request_id]
        return outputs + [self._progress(request) for request in touched.values()]

    def _progress(self, request: Request) -> RequestOutput:
        """The output of a request that progressed this step; a finished one leaves the engine."""
        now = time.monotonic()
        request.times.first_token = request.times.first_token or now
        done = all(seq.finish_reason is not None for seq in request.seqs)
        if done:
            request.times.finished = now
            del self.requests[request.request_id]
            log.info("request %s finished: %s", request.request_id,
                     ", ".join(f"{len(s.output_ids)} tokens ({s.finish_reason})" for s in request.seqs))
        return self.outputs.output(request, finished=done)

    def _fail(self, request_ids: set[str], error: ClientError | str) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                seq.finish_reason = seq.finish_reason or "error"
                self.scheduler.finish(seq)
            outputs.append(self.outputs.output(request, finished=True, error=error))
        return outputs

    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           cache_usage=1.0 - self.blocks.num_free / self.num_blocks)
