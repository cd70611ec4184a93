"""What a translator is: how one task's models speak every protocol the server has.

Front-ends hold no knowledge of tasks. A route or a msgpack method finds the model, asks the
registry for its task's translator, and calls the operation it serves; an operation a task does
not serve raises `Unsupported` here, the one place that error is written.

Operations, grouped by the protocols that share them:
- tensor form (KServe V2 infer, msgpack `infer`): `signature`, `infer_request`, `infer_outputs`,
  `infer_extras`; named numpy arrays in and out (see pyserve.server.tensors).
- images (OpenAI images API, msgpack `images`): `image_request`, `images_of`, `image_extras`;
  `streams_images` says whether previews can be streamed.
- text (OpenAI completions and chat, msgpack `generate` and `chat`): `text` is True; the routes
  themselves live in openai_api.py and msgpack_server.py, since only text models take them.
- encoders (OpenAI embeddings, /v1/rerank, /v1/score): `embedding_request` and `score_request`
  tokenize inputs into an engine request, `vectors_of` reads its answer.
- metrics: `outcome` sums up a finished request for /metrics, whatever protocol carried it.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ClientError, InvalidParameter, ModelFailure
from ..auth import Principal
from ..tensors import Tensors
from ..vision_inputs import ImageFetcher


class Unsupported(InvalidParameter):
    """A request for something the model's task does not do (HTTP 400 naming `model`)."""

    def __init__(self, model, what: str):
        super().__init__("model", f"{model.name!r} is a {model.task} model, which does not serve {what}")


@dataclass(frozen=True)
class Caller:
    """Who sent a request and what the server lets it reach, for translators that need it."""

    principal: Principal | None = None
    images: ImageFetcher = field(default_factory=ImageFetcher)  # remote images it may have fetched


@dataclass(frozen=True)
class Outcome:
    """A finished request as /metrics counts it."""

    status: str  # a finish reason, "finished", "error" or "abort"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    sequences: int = 1
    images: int = 0


@dataclass(frozen=True)
class TensorSignature:
    """KServe V2 model metadata: `inputs` and `outputs` as lists of {name, datatype, shape,
    optional}, and any extra fields (a multi-operation model's `operations`)."""

    inputs: list[dict]
    outputs: list[dict]
    extra: Mapping[str, Any] = None

    def metadata(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, **(self.extra or {})}


class Translator:
    """The operations a task serves; each one left as it is here is refused with `Unsupported`."""

    task: str = ""
    text: bool = False  # serves the text routes (completions, chat, msgpack generate and chat)
    streams_images: bool = False

    # -- tensor form -------------------------------------------------------------------------

    def signature(self, model) -> TensorSignature:
        raise Unsupported(model, "tensor inference")

    async def infer_request(self, model, tensors: Tensors, parameters: Mapping, caller: Caller) -> Any:
        """The engine request for named input tensors and the request's parameters."""
        raise Unsupported(model, "tensor inference")

    def infer_outputs(self, model, out) -> Tensors:
        """Named output tensors of the engine's last output (which carries no error)."""
        raise Unsupported(model, "tensor inference")

    def infer_extras(self, out) -> dict:
        """Fields a msgpack infer result carries besides its outputs (text's usage)."""
        return {}

    # -- images ------------------------------------------------------------------------------

    def image_request(self, model, fields: Mapping, init_image=None) -> Any:
        """The engine request for an images-API request's fields (OpenAI names)."""
        raise Unsupported(model, "image generation")

    def images_of(self, out) -> np.ndarray | None:
        """[n, H, W, C] images of an output (floats in [0, 1] or 8-bit), or None."""
        return None

    def image_extras(self, request, out) -> dict:
        """Fields an images answer carries besides the images: the seeds used, one per image."""
        return {}

    # -- encoders ----------------------------------------------------------------------------

    def embedding_request(self, model, inputs: list, fields: Mapping) -> Any:
        """The engine request for embeddings of `inputs` (strings or token-id lists); a blocking
        call (it tokenizes): the routes run it in a worker thread."""
        raise Unsupported(model, "embeddings")

    def score_request(self, model, pairs: list[tuple[str, str]], fields: Mapping) -> Any:
        """The engine request for relevance scores of (query, document) pairs; blocking, as above."""
        raise Unsupported(model, "relevance scores (rerank, score)")

    def vectors_of(self, out) -> np.ndarray:
        """[inputs, dimensions] fp32: the vectors of a finished embeddings request."""
        raise NotImplementedError

    def scores_of(self, request, out) -> list[float]:
        """Each pair's relevance, from a finished `score_request`."""
        raise NotImplementedError

    def failure(self, out) -> ClientError:
        """The error a request's failed output answers with."""
        return ModelFailure(f"the model failed: {out.error}")

    # -- metrics -----------------------------------------------------------------------------

    def outcome(self, out, aborted: bool) -> Outcome:
        status = "abort" if aborted else "error" if out.error else "finished"
        images = self.images_of(out) if out.finished and not out.error else None
        return Outcome(status, images=0 if images is None else len(images))
