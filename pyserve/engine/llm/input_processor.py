"""Requests into sequences: parameters resolved and checked, the prompt as token ids, its images
placed, its adapter and grammar looked up, and a sequence per sample with its own seed.

Everything here runs at admission, so a request that could never run is refused with an error
naming its field before it takes any of the engine's resources. `prepare` (off the engine
thread) compiles a structured-output constraint; `process` (on it) does the rest.
"""

import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import ClientError, InvalidParameter
from ...kernels import rng
from ...tasks import ImageInput, TextGenerationModel
from ...tokenizer import IncrementalDetokenizer
from .adapter_pool import AdapterPool
from .block_manager import BlockManager
from .params import SamplingParams
from .sequence import ImageSpan, RequestTimes, Sequence
from .structured import GrammarCompiler

log = logging.getLogger("pyserve.engine")

# Compiling a constraint (a 600 KB grammar takes seconds) happens in `prepare`, beside the engine:
# at most this many at once, each given this long.
MAX_COMPILING = 2
COMPILE_SECONDS = 10.0


@dataclass
class TextRequest:
    """What a front-end submits: a prompt (text, or token ids already encoded), its parameters, and
    its cache salt: only requests with equal salts share prefix-cache blocks."""

    prompt: str | list[int]
    params: SamplingParams | None = None
    cache_salt: str | None = None
    images: list[ImageInput] = field(default_factory=list)  # vision models: one per image placeholder run
    lora: str | None = None  # a LoRA adapter loaded with LLMEngine.load_lora
    matcher: Any = None  # the structured-output matcher, compiled by `InputProcessor.prepare`


@dataclass
class Request:
    """A request the engine holds: its prompt, parameters and the sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))


class InputProcessor:
    def __init__(self, model: TextGenerationModel, adapters: AdapterPool, cache_tokens: int, vision=None):
        self.model, self.tokenizer, self.adapters = model, model.tokenizer, adapters
        self.vocab_size, self.max_model_len = model.spec.vocab_size, model.spec.max_model_len
        self.cache_tokens = cache_tokens  # what the whole KV cache holds
        self.vision = vision
        self.defaults = dict(self.tokenizer.generation_defaults) if self.tokenizer else {}
        self._rng = random.Random()
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        self._grammars_lock = threading.Lock()
        self._compiling = threading.BoundedSemaphore(MAX_COMPILING)

    def prepare(self, request: TextRequest) -> TextRequest:
        """The request with its constraint compiled, beside the engine's thread: at most
        MAX_COMPILING compiles at once (a compile that outlives its deadline still counts until it
        ends), each answered within COMPILE_SECONDS, else a 400 naming the field."""
        params = request.params
        if params is None or params.structured is None or request.matcher is not None:
            return request
        field_name = params.structured.field
        if not self._compiling.acquire(timeout=COMPILE_SECONDS):
            raise ClientError(f"{field_name}: other constraints are being compiled; retry shortly", field_name,
                              status=503)
        compiled: list = []

        def compile_then_free_the_slot():  # a compile past its deadline keeps its slot until it ends
            try:
                compiled.append(self._compiled_or_error(params))
            finally:
                self._compiling.release()
        worker = threading.Thread(target=compile_then_free_the_slot, name="pyserve-grammar", daemon=True)
        worker.start()
        worker.join(COMPILE_SECONDS)
        if not compiled:
            raise InvalidParameter(field_name, f"did not compile within {COMPILE_SECONDS:g} s: make it smaller")
        if isinstance(compiled[0], ClientError):
            raise compiled[0]
        return replace(request, matcher=compiled[0])

    def _compiled_or_error(self, params: SamplingParams):
        try:
            return self._matcher(params)
        except ClientError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - whatever llguidance raises, the constraint is at fault
            return InvalidParameter(params.structured.field, f"could not be compiled ({type(exc).__name__}: {exc})")

    def process(self, request_id: str, request: TextRequest) -> Request:
        params = (request.params or SamplingParams()).resolved(self.defaults)
        params.validate(self.vocab_size)
        text, ids = self._token_ids(request.prompt)
        self._check_fits_cache(len(ids), params)
        spans = self._image_spans(ids, list(request.images))
        adapter = -1 if request.lora is None else self.adapters.id(request.lora)
        matcher = request.matcher if request.matcher is not None else self._matcher(params)
        # Blocks holding an image's tokens are only shared with requests of the same images, and
        # blocks computed under an adapter only with requests of that adapter.
        root = BlockManager.root_digest(request.cache_salt or "", *(span.image.digest for span in spans),
                                        self.adapters.cache_key(request.lora))
        seqs = []
        for i in range(params.n):
            seed = self._rng.getrandbits(63) if params.seed is None else rng.row_seed(params.seed, i)
            seq = Sequence(request_id, i, ids, params, seed, cache_root=root, images=spans, adapter=adapter)
            seq.matcher = matcher.deep_copy() if matcher is not None else None
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] * len(ids)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seqs.append(seq)
        return Request(request_id, text, ids, params, seqs)

    def _token_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter("prompt", "this model has no tokenizer: send token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidParameter("prompt", f"token ids must be in [0, {self.vocab_size})")
        if not ids:
            raise InvalidParameter("prompt", "is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidParameter("prompt", f"{len(ids)} tokens; the model's context is {self.max_model_len}")
        return text, ids

    def _image_spans(self, ids: list[int], images: list[ImageInput]) -> list[ImageSpan]:
        """Where each image's placeholder tokens are: runs of the model's image token, in order."""
        if self.vision is None:
            if images:
                raise InvalidParameter("messages", "this model does not read images")
            return []
        at = [i for i, t in enumerate(ids) if t == self.vision.image_token_id]
        size = self.vision.tokens_per_image
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
        with self._grammars_lock:  # prepare may run in several threads at once
            if self._grammars is None:
                try:
                    self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
                except Exception as exc:  # noqa: BLE001 - a tokenizer llguidance cannot read: refuse, keep serving
                    log.warning("structured output unavailable: %s", exc)
                    raise InvalidParameter(params.structured.field, "this model's tokenizer does not support "
                                                                    f"structured output: {exc}") from None
        return self._grammars.matcher(params.structured)

    def _check_fits_cache(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse a request that could never run: even alone, its sequence would outgrow the cache."""
        wanted = self.max_model_len if params.max_tokens is None else params.max_tokens
        needed = min(prompt_len + wanted, self.max_model_len)
        if needed > self.cache_tokens:
            name = "prompt" if prompt_len >= self.cache_tokens else "max_tokens"
            raise InvalidParameter(name, f"the prompt ({prompt_len} tokens) plus max_tokens needs up to {needed} "
                                         f"tokens of KV cache, but the whole cache holds {self.cache_tokens}")
