"""The encoder engine: embeddings and relevance scores, batched by a token budget.

A request is a list of inputs (token ids, and token types for a pair). Each step packs inputs one
after another with no padding, up to `max_num_batched_tokens` tokens (at least one input), taking
one input from each waiting request in turn, oldest first, so a request of thousands of inputs
shares every step with a request of one. A request is answered once all its inputs are encoded.

Example:
    engine = EncoderEngine(model, max_num_batched_tokens=8192)
    engine.add("r1", EncodeRequest([[101, 7592, 102], [101, 2088, 102]]))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.vectors.shape)   # (2, dimensions)
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import InvalidParameter, TooLarge
from ...tasks import EMBEDDING, EmbeddingModel
from ..base import EngineInfo, EngineStats, RequestTimes

log = logging.getLogger("pyserve.engine")

MAX_INPUTS = 2048  # inputs in one request (OpenAI's limit for embeddings)
DEFAULT_BATCHED_TOKENS = 16384
MAX_QUEUED_TOKENS = 4_000_000  # all requests together: past it a new request is refused (413)


@dataclass
class EncodeRequest:
    items: list[list[int]]  # token ids of each input, special tokens included
    token_types: list[list[int]] | None = None  # of each input (pairs for cross-encoders); None: all 0


@dataclass
class EncodeOutput:
    request_id: str
    finished: bool = True
    vectors: np.ndarray | None = None  # [inputs, dimensions] fp32, in the request's order
    prompt_tokens: int = 0
    error: str | None = None
    status: int = 500
    times: RequestTimes | None = None


@dataclass
class _Waiting:
    request_id: str
    request: EncodeRequest
    times: RequestTimes
    next_item: int = 0
    done: int = 0
    vectors: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(item) for item in self.request.items)


class EncoderEngine:
    def __init__(self, model: EmbeddingModel, *, max_num_batched_tokens: int | None = None):
        self.model = model
        self.max_tokens = max(max_num_batched_tokens or DEFAULT_BATCHED_TOKENS, model.spec.max_model_len)
        self.info = EngineInfo(EMBEDDING, tokenizer=model.tokenizer, max_model_len=model.spec.max_model_len,
                               encoder=model.spec)
        self.requests: dict[str, _Waiting] = {}
        self.queued_tokens = 0
        self.step_observers: list[Callable[[int, int], None]] = []  # (requests, inputs) of every step

    def prepare(self, request: EncodeRequest) -> EncodeRequest:
        return request

    def add(self, request_id: str, request: EncodeRequest) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already in flight")
        items = request.items
        if not items:
            raise InvalidParameter("input", "must hold at least one input")
        if len(items) > MAX_INPUTS:
            raise InvalidParameter("input", f"holds {len(items)} inputs; at most {MAX_INPUTS} go in one request")
        limit = self.model.spec.max_model_len
        for i, item in enumerate(items):
            if not item:
                raise InvalidParameter("input", f"input {i} is empty")
            if len(item) > limit:
                raise InvalidParameter("input", f"input {i} has {len(item)} tokens; the model takes at most {limit} "
                                                f"(truncate_prompt_tokens truncates)")
        if request.token_types is not None and [len(t) for t in request.token_types] != [len(i) for i in items]:
            raise InvalidParameter("token_type_ids", "must give a type for every token of every input")
        waiting = _Waiting(request_id, request, RequestTimes(time.monotonic()))
        if self.queued_tokens + waiting.tokens > MAX_QUEUED_TOKENS:
            raise TooLarge(f"{self.queued_tokens} tokens are waiting; this request's {waiting.tokens} would pass "
                           f"the engine's {MAX_QUEUED_TOKENS}", "input")
        self.requests[request_id] = waiting
        self.queued_tokens += waiting.tokens

    def abort(self, request_id: str) -> EncodeOutput | None:
        waiting = self.requests.pop(request_id, None)
        if waiting is None:
            return None
        self.queued_tokens -= sum(len(item) for item in waiting.request.items[waiting.next_item:])
        return EncodeOutput(request_id, error="aborted", times=waiting.times)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=len(self.requests),
                           cache_usage=min(1.0, self.queued_tokens / MAX_QUEUED_TOKENS))

    def step(self) -> list[EncodeOutput]:
        taken = self._take()
        if not taken:
            return []
        ids = [token for w, i in taken for token in w.request.items[i]]
        types = None
        if any(w.request.token_types is not None for w, _ in taken):
            types = [t for w, i in taken for t in (w.request.token_types[i] if w.request.token_types is not None
                                                   else [0] * len(w.request.items[i]))]
        lengths = [len(w.request.items[i]) for w, i in taken]
        device = self.model.spec.device
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
        start = time.monotonic()
        for w, _ in taken:
            w.times.first_scheduled = w.times.first_scheduled or start
        self.queued_tokens -= len(ids)
        for observe in self.step_observers:
            observe(len({id(w) for w, _ in taken}), len(taken))
        try:
            with torch.inference_mode():
                vectors = self.model.encode(torch.tensor(ids, device=device),
                                            None if types is None else torch.tensor(types, device=device),
                                            cu, max(lengths)).float().cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - this step's requests fail; the engine goes on
            log.exception("encoder step of %d input(s) failed", len(taken))
            return [self._fail(w, f"{type(exc).__name__}: {exc}") for w in {id(w): w for w, _ in taken}.values()
                    if w.request_id in self.requests]
        outputs = []
        for (w, i), vector in zip(taken, vectors):
            w.vectors[i] = vector
            w.done += 1
            if w.done == len(w.request.items):
                del self.requests[w.request_id]
                w.times.finished = w.times.first_token = time.monotonic()
                outputs.append(EncodeOutput(w.request_id, vectors=np.stack([w.vectors[k] for k in range(w.done)]),
                                            prompt_tokens=w.tokens, times=w.times))
        return outputs

    def _take(self) -> list[tuple[_Waiting, int]]:
        """This step's inputs: one from each waiting request in turn, oldest request first, while
        the token budget lasts (the first input always goes)."""
        taken, budget = [], self.max_tokens
        waiting = [w for w in self.requests.values() if w.next_item < len(w.request.items)]
        while waiting:
            for w in list(waiting):
                size = len(w.request.items[w.next_item])
                if taken and size > budget:
                    return taken
                taken.append((w, w.next_item))
                budget -= size
                w.next_item += 1
                if w.next_item == len(w.request.items):
                    waiting.remove(w)
        return taken

    def _fail(self, w: _Waiting, error: str) -> EncodeOutput:
        del self.requests[w.request_id]
        self.queued_tokens -= sum(len(item) for item in w.request.items[w.next_item:])
        return EncodeOutput(w.request_id, error=error, times=w.times)
