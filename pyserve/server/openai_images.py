"""OpenAI-compatible image routes: POST /v1/images/generations (JSON) and /v1/images/edits
(multipart, as the `openai` SDK sends it; img2img with `strength`). Images come back as
base64 files (`b64_json`): PNG, or `output_format` jpeg or webp at `output_compression` quality;
the extras `negative_prompt`, `seed`, `num_inference_steps`, `guidance_scale`, `scheduler` and
`strength` are taken as vLLM-style extra body fields.

With `stream: true` the answer is OpenAI's image event stream: up to `partial_images` previews
(`image_generation.partial_image`, the decoded clean estimate part-way through the loop), then
one `image_generation.completed` event per image (`image_edit.*` for edits)."""

import json
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import InvalidParameter
from . import forms, inference, pictures
from .models import ServedModel
from .responses import error_body, json_body, read_body, unless_client_leaves

# form values that are integers (the SDK sends every form field as a string)
_FORM_FIELDS = {"n", "num_inference_steps", "seed", "width", "height", "partial_images", "output_compression"}
_FORM_NUMBERS = {"guidance_scale", "strength"}


async def generations(request: Request) -> Response:
    body = await json_body(request)
    model = request.app.state.models.get(body.get("model"))
    return await _respond(request, model, body, None, _stream_flag(body), "image_generation")


async def edits(request: Request) -> Response:
    form = await forms.read_form(request.headers.get("content-type", ""), await read_body(request),
                                 _FORM_FIELDS, _FORM_NUMBERS)
    fields, files = form.fields, form.files
    if "mask" in files:
        raise InvalidParameter("mask", "masks (inpainting) are not supported; send the image alone")
    image = files.get("image") or files.get("image[]")
    if image is None:
        raise InvalidParameter("image", "is required (a PNG or JPEG file)")
    model = request.app.state.models.get(fields.get("model"))
    init = await pictures.decode_image(image, "image")
    return await _respond(request, model, fields, init, _stream_flag(fields), "image_edit")


def _stream_flag(fields) -> bool:
    value = fields.get("stream", False)
    if isinstance(value, str):  # a form field
        value = {"true": True, "false": False}.get(value.lower(), value)
    if not isinstance(value, bool):
        raise InvalidParameter("stream", "must be a boolean")
    return value


async def _respond(request: Request, model: ServedModel, fields: dict, init_image, stream: bool,
                   kind: str) -> Response:
    file_format = pictures.FileFormat.of(fields)
    job = await inference.images(model, fields, init_image, stream, request.headers.get("x-request-id"))
    if stream:
        return StreamingResponse(_events(request.url.path, job, kind, file_format), media_type="text/event-stream")
    out = await unless_client_leaves(request, _last(job.outputs))
    if out.error:
        raise job.failure(out)
    images = job.images_of(out)
    data = [{"b64_json": b64} for b64 in await pictures.b64_pngs(images, file_format)]
    height, width = images.shape[1:3]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": file_format.name,
                         "size": f"{width}x{height}", **job.extras(out)})


async def _last(outputs: AsyncIterator):
    out = None
    try:
        async for out in outputs:
            pass
    finally:
        await outputs.aclose()  # cancelled when the client leaves: the engine drops the request
    return out


def _event(payload: dict) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


async def _events(path: str, job: inference.ImageJob, kind: str,
                  file_format: pictures.FileFormat) -> AsyncIterator[bytes]:
    """SSE events for previews and final images; a model failure becomes an error event."""
    try:
        async for out in job.outputs:
            if out.error:
                yield f"event: error\ndata: {json.dumps(error_body(path, job.failure(out)))}\n\n".encode()
                return
            images = job.images_of(out)
            if images is not None:
                height, width = images.shape[1:3]
                common = {"created_at": int(time.time()), "size": f"{width}x{height}", "quality": "auto",
                          "background": "opaque", "output_format": file_format.name}
                for b64 in await pictures.b64_pngs(images, file_format):
                    if out.finished:
                        yield _event({"type": f"{kind}.completed", "b64_json": b64, **common,
                                      "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})
                    else:
                        yield _event({"type": f"{kind}.partial_image", "b64_json": b64,
                                      "partial_image_index": out.partial_index, **common})
    finally:
        await job.outputs.aclose()  # a client that went away aborts the request


routes = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/images/edits", edits, methods=["POST"]),
]
