"""Sequences (one per generated completion) and the outputs a request receives."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ...tasks import ImageInput
from ...tokenizer import IncrementalDetokenizer
from ..base import RequestTimes
from .params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageSpan:
    """An image's placeholder tokens in a prompt: positions [start, start + length)."""

    start: int
    length: int
    image: ImageInput


@dataclass
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    token_ids: list[int] = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # digests of the full blocks registered so far
    cache_root: bytes | None = None  # what its block digests chain from (see BlockManager.root_digest)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)  # filled during prefill when asked for
    finish_reason: str | None = None
    detokenizer: IncrementalDetokenizer | None = None
    matcher: Any = None  # the llguidance matcher of a structured-output request
    images: list[ImageSpan] = field(default_factory=list)
    image_embeds: dict[int, Any] = field(default_factory=dict)  # span index -> [length, hidden], while prefilling
    adapter: int = -1  # the LoRA adapter's id in the engine's AdapterPool, -1 for the base model

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_ids.append(token)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": {id: logprob}}


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # set when the model failed on this request's step
    # a failure that is the request's own (its grammar cannot go on): the HTTP-like status and field
    error_status: int = 500
    error_field: str | None = None
    times: RequestTimes | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[dict | None] | None = None  # per prompt token (None for the first), when asked for

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
