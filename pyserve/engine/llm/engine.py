"""The LLM engine loop: admit requests, schedule a step, run it, apply stop rules, emit outputs."""

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable


from ...errors import InvalidParameter, NotFound
from ...kernels import rng
from ...tasks import TEXT_GENERATION, ImageInput, KVCache, TextGenerationModel, kv_cache_dtype_for
from ...tokenizer import IncrementalDetokenizer
from ..base import EngineInfo, EngineStats
from .adapter_pool import AdapterPool
from .block_manager import BlockManager
from .params import SamplingParams
from .runner import ModelRunner, SampledToken
from .scheduler import Scheduler
from .sequence import CompletionOutput, ImageSpan, RequestOutput, RequestTimes, Sequence
from .structured import GrammarCompiler, advance

log = logging.getLogger("pyserve.engine")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))


@dataclass
class TextRequest:
    """What a front-end submits: a prompt (text, or token ids already encoded), its parameters, and
    its cache salt: only requests with equal salts share prefix-cache blocks."""

    prompt: str | list[int]
    params: SamplingParams | None = None
    cache_salt: str | None = None
    images: list[ImageInput] = field(default_factory=list)  # vision models: one per image placeholder run
    lora: str | None = None  # a LoRA adapter loaded with LLMEngine.load_lora


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
        cache_dtype = kv_cache_dtype_for(spec, kv_cache_dtype)
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_model_len = spec.max_model_len
        self.info = EngineInfo(TEXT_GENERATION, self.tokenizer, spec.max_model_len,
                               vision=getattr(model, "vision", None))
        self.block_size = block_size
        bytes_per_block = 2 * spec.num_layers * spec.num_kv_heads * block_size * spec.head_dim * cache_dtype.itemsize
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_blocks is None and kv_cache_memory < bytes_per_block:
            raise ValueError(f"kv_cache_memory of {kv_cache_memory} bytes cannot hold one KV block "
                             f"({bytes_per_block} bytes for {block_size} tokens)")
        self.num_blocks = num_blocks or kv_cache_memory // bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        cache = KVCache.allocate(spec.num_layers, self.num_blocks, spec.num_kv_heads, block_size, spec.head_dim,
                                 cache_dtype, spec.device)
        self.blocks = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, max_loras)
        self.runner = ModelRunner(model, cache, block_size)
        self.requests: dict[str, Request] = {}
        self.eos_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else []
        self.defaults = dict(self.tokenizer.generation_defaults) if self.tokenizer else {}
        self._rng = random.Random()
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        self.adapters = AdapterPool(model, max_loras)  # the scheduler keeps a step's adapters within its slots
        # Called after every step with (sequences, tokens) in it; metrics hook in here.
        self.on_step: Callable[[int, int], None] | None = None
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", self.num_blocks, block_size,
                 self.num_blocks * bytes_per_block / 2**20, str(cache_dtype).removeprefix("torch."))

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    cache_salt: str | None = None, images: list[ImageInput] = (), lora: str | None = None) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already in flight")
        params = (params or SamplingParams()).resolved(self.defaults)
        params.validate(self.model.spec.vocab_size)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter("prompt", "this model has no tokenizer: send token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            if any(not 0 <= t < self.model.spec.vocab_size for t in ids):
                raise InvalidParameter("prompt", f"token ids must be in [0, {self.model.spec.vocab_size})")
        if not ids:
            raise InvalidParameter("prompt", "is empty")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidParameter("prompt", f"{len(ids)} tokens; the model's context is {limit}")
        self._check_fits_cache(len(ids), params)
        spans = self._image_spans(ids, list(images))
        adapter = -1 if lora is None else self.adapters.id(lora)
        matcher = self._matcher(params)
        # Blocks holding an image's tokens are only shared with requests of the same images, and
        # blocks computed under an adapter only with requests of that adapter.
        root = BlockManager.root_digest(cache_salt or "", *(span.image.digest for span in spans),
                                        self.adapters.cache_key(lora))
        seqs = []
        for i in range(params.n):
            seed = self._rng.getrandbits(63) if params.seed is None else rng.row_seed(params.seed, i)
            seq = Sequence(request_id, i, ids, params, seed, cache_root=root, images=spans,
                           adapter=adapter)
            seq.matcher = matcher.deep_copy() if matcher is not None else None
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] * len(ids)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, text, ids, params, seqs)
        log.info("request %s added: %d prompt tokens, n=%d, max_tokens=%s", request_id, len(ids), params.n,
                 params.max_tokens)

    def add(self, request_id: str, request: TextRequest) -> None:
        """The engine-driver entry point (see pyserve.engine.driver)."""
        self.add_request(request_id, request.prompt, request.params, request.cache_salt, request.images, request.lora)

    def load_lora(self, name: str, path) -> None:
        """Load a PEFT LoRA adapter under `name`; requests name it to use it (each row of a batch
        its own adapter, or none). Any number may be loaded: `max_loras` of them sit in the
        model's layers at a time, the others wait in host memory."""
        self.adapters.load(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter; refused while requests use it."""
        if name not in self.adapters:
            raise NotFound(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        adapter = self.adapters.id(name)
        if any(seq.adapter == adapter for request in self.requests.values() for seq in request.seqs):
            raise InvalidParameter("lora_name", f"adapter {name!r} is in use by running requests")
        self.adapters.unload(name)

    def _image_spans(self, ids: list[int], images: list[ImageInput]) -> list[ImageSpan]:
        """Where each image's placeholder tokens are: runs of the model's image token, in order."""
        vision = self.info.vision
        if vision is None:
            if images:
                raise InvalidParameter("messages", "this model does not read images")
            return []
        at = [i for i, t in enumerate(ids) if t == vision.image_token_id]
        size = vision.tokens_per_image
        if len(at) != len(images) * size:
            raise InvalidParameter("messages", f"{len(images)} image(s) need {len(images) * size} image tokens in "
                                               f"the prompt, it holds {len(at)}")
        spans = []
        for k, image in enumerate(images):
            start = at[k * size]
            if at[k * size + size - 1] != start + size - 1:
                raise InvalidParameter("messages", f"image {k}'s {size} tokens are not contiguous in the prompt")
            spans.append(ImageSpan(start, size, image))
        return spans

    def _matcher(self, params: SamplingParams):
        if params.structured is None:
            return None
        if self.tokenizer is None:
            raise InvalidParameter(params.structured.field, "this model has no tokenizer to match a grammar with")
        if self._grammars is None:
            try:
                self._grammars = GrammarCompiler(self.tokenizer, self.model.spec.vocab_size)
            except Exception as exc:  # noqa: BLE001 - a tokenizer llguidance cannot read: refuse, keep serving
                log.warning("structured output unavailable: %s", exc)
                raise InvalidParameter(params.structured.field,
                                       f"this model's tokenizer does not support structured output: {exc}") from None
        return self._grammars.matcher(params.structured)

    def _check_fits_cache(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse a request that could never run: even alone, its sequence would outgrow the cache."""
        capacity = self.num_blocks * self.block_size
        wanted = self.max_model_len if params.max_tokens is None else params.max_tokens
        needed = min(prompt_len + wanted, self.max_model_len)
        if needed > capacity:
            field = "prompt" if prompt_len >= capacity else "max_tokens"
            raise InvalidParameter(field, f"the prompt ({prompt_len} tokens) plus max_tokens needs up to {needed} "
                                          f"tokens of KV cache, but the whole cache holds {capacity}")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request now; its blocks are freed at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        log.info("request %s aborted", request_id)
        return self._output(request, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the loop --------------------------------------------------------------------------

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
        if self.on_step is not None:
            self.on_step(len(step.items), step.num_tokens)
        try:
            slots = self.adapters.place({seq.adapter for seq, _ in step.items if seq.adapter >= 0})
            result = self.runner.run(step, self.eos_ids, slots)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving the rest
            log.exception("model step failed; failing %d request(s)", len(step.items))
            return outputs + self._fail({seq.request_id for seq, _ in step.items}, f"{type(exc).__name__}: {exc}")
        for scored in result.prompt_logprobs:
            scored.seq.prompt_logprobs[scored.first:scored.first + len(scored.entries)] = scored.entries
        touched: dict[str, Request] = {}
        for seq, n in step.items:
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
            for k, span in enumerate(seq.images):  # an image's features are done with once its tokens are in
                if span.start + span.length <= seq.num_computed:
                    seq.image_embeds.pop(k, None)
            if seq.params.max_tokens == 0 and seq.num_computed == len(seq.token_ids):  # scored, nothing to draw
                seq.finish_reason = "length"
                self.scheduler.finish(seq)
                touched[seq.request_id] = self.requests[seq.request_id]
        failed: dict[str, str] = {}
        for s in result.sampled:
            if s.seq.request_id in failed:
                continue
            try:
                self._accept(s)
            except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer fault: this request's alone
                log.exception("request %s failed while accepting a token", s.seq.request_id)
                failed[s.seq.request_id] = f"{type(exc).__name__}: {exc}"
                continue
            touched[s.seq.request_id] = self.requests[s.seq.request_id]
        for request_id, error in failed.items():
            touched.pop(request_id, None)
            outputs += self._fail({request_id}, error)
        now = time.monotonic()
        for request in touched.values():
            request.times.first_token = request.times.first_token or now
            done = all(seq.finish_reason is not None for seq in request.seqs)
            if done:
                request.times.finished = now
            outputs.append(self._output(request, finished=done))
            if done:
                del self.requests[request.request_id]
                log.info("request %s finished: %s", request.request_id,
                         ", ".join(f"{len(s.output_ids)} tokens ({s.finish_reason})" for s in request.seqs))
        return outputs

    def _accept(self, s: SampledToken) -> None:
        seq, p = s.seq, s.seq.params
        seq.append(s.token)
        if p.logprobs is not None:
            seq.logprobs.append({"token_id": s.token, "logprob": s.logprob, "top": s.top})
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(s.token)
        complete = seq.matcher is not None and advance(seq.matcher, s.token)
        may_stop = len(seq.output_ids) >= p.min_tokens
        reason = None
        if complete and s.token in self.eos_ids:
            reason = "stop"
        elif may_stop and ((not p.ignore_eos and s.token in self.eos_ids) or s.token in p.stop_token_ids):
            reason = "stop"
        elif may_stop and p.stop and self._cut_at_stop_string(seq):
            seq.finish_reason = "stop"  # text already cut: nothing held back is wanted
            self.scheduler.finish(seq)
            return
        elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        elif len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        elif complete:  # the grammar allows nothing more
            reason = "stop"
        if reason is not None:
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> bool:
        hits = [at for at in (seq.text.find(stop) for stop in seq.params.stop) if at >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
        return bool(hits)

    def _fail(self, request_ids: set[str], error: str) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                seq.finish_reason = seq.finish_reason or "error"
                self.scheduler.finish(seq)
            out = self._output(request, finished=True)
            out.error = error
            outputs.append(out)
        return outputs

    def _output(self, request: Request, finished: bool) -> RequestOutput:
        outs = [CompletionOutput(seq.index, seq.text, list(seq.output_ids), seq.finish_reason,
                                 list(seq.logprobs) if request.params.logprobs is not None else None)
                for seq in request.seqs]
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outs, finished,
                             times=request.times, num_cached_tokens=first.num_cached_tokens,
                             prompt_logprobs=first.prompt_logprobs if request.params.prompt_logprobs is not None
                             else None)

    # -- introspection ---------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           cache_usage=1.0 - self.blocks.num_free / self.num_blocks)
