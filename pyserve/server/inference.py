"""The two request flows that several protocols share, whatever the model's task: tensors in and
out (KServe V2 infer, msgpack infer), and images (OpenAI images API, msgpack images)."""

import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameter
from . import translators
from .models import ServedModel
from .tensors import Tensors
from .translators import Caller, Translator


def parameters_of(value) -> Mapping:
    if value is not None and not isinstance(value, Mapping):
        raise InvalidParameter("parameters", "must be a map")
    return value or {}


async def infer(model: ServedModel, tensors: Tensors, parameters, caller: Caller) -> tuple[Tensors, dict]:
    """Run named input tensors through `model`: its named outputs, and any extra result fields."""
    translator = translators.for_model(model)
    request = await translator.infer_request(model, tensors, parameters_of(parameters), caller)
    out = await model.final_output(request)
    if out.error:
        raise translator.failure(out)
    return translator.infer_outputs(model, out), translator.infer_extras(out)


@dataclass
class ImageJob:
    """An admitted images request: its engine outputs as they come, and how to read them."""

    translator: Translator
    request: Any  # the engine request
    outputs: AsyncIterator

    def images_of(self, out):
        return self.translator.images_of(out)

    def extras(self, out) -> dict:
        return self.translator.image_extras(self.request, out)

    def failure(self, out):
        return self.translator.failure(out)


async def images(model: ServedModel, fields: Mapping, init_image=None, stream: bool = False,
                 request_id: str | None = None) -> ImageJob:
    """Start an images request; a refused one raises here, before any answer is sent."""
    translator = translators.for_model(model)
    request = translator.image_request(model, fields, init_image)
    if stream and not translator.streams_images:
        raise InvalidParameter("stream", f"{model.name!r} makes its images in one pass: there is nothing to stream")
    # unique per engine request even when clients reuse an X-Request-Id
    outputs = model.submit(f"{request_id or 'img'}-{uuid.uuid4().hex[:24]}", request)
    first = await anext(outputs)
    return ImageJob(translator, request, _starting_with(first, outputs))


async def _starting_with(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()  # a client that went away aborts the request
