"""OpenAI-compatible image routes: POST /v1/images/generations (JSON) and /v1/images/edits
(multipart, as the `openai` SDK sends it; img2img with `strength`). Images come back as
base64 PNGs (`b64_json`); the extras `negative_prompt`, `seed`, `num_inference_steps`,
`guidance_scale`, `scheduler` and `strength` are taken as vLLM-style extra body fields."""

import email.parser
import email.policy
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine.diffusion import ImageRequest
from ..errors import ClientError, InvalidParameter, ModelFailure
from . import image_adapters
from .models import ServedModel
from .responses import json_body, read_body

_FORM_FIELDS = {"n", "num_inference_steps", "seed", "width", "height"}  # form values that are integers
_FORM_NUMBERS = {"guidance_scale", "strength"}


async def generations(request: Request) -> Response:
    body = await json_body(request)
    model = image_adapters.image_model(request.app.state.models, body.get("model"))
    return await _respond(request, model, image_adapters.image_request(body))


async def edits(request: Request) -> Response:
    fields, files = _multipart(request.headers.get("content-type", ""), await read_body(request))
    if "mask" in files:
        raise InvalidParameter("mask", "masks (inpainting) are not supported; send the image alone")
    image = files.get("image") or files.get("image[]")
    if image is None:
        raise InvalidParameter("image", "is required (a PNG or JPEG file)")
    model = image_adapters.image_model(request.app.state.models, fields.get("model"))
    init = await image_adapters.decode_image(image, "image")
    return await _respond(request, model, image_adapters.image_request(fields, init_image=init))


async def _respond(request: Request, model: ServedModel, image_request: ImageRequest) -> Response:
    rid = request.headers.get("x-request-id") or f"img-{uuid.uuid4().hex[:24]}"
    out = None
    async for out in model.driver.submit(rid, image_request):
        pass
    if out.error:
        raise ModelFailure(f"the model failed: {out.error}")
    data = [{"b64_json": b64} for b64 in await image_adapters.b64_pngs(out.images)]
    height, width = out.images.shape[1:3]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png",
                         "size": f"{width}x{height}", "seeds": out.seeds})


def _multipart(content_type: str, body: bytes) -> tuple[dict, dict[str, bytes]]:
    """Form fields (typed as the JSON API types them) and files of a multipart/form-data body."""
    if not content_type.startswith("multipart/form-data"):
        raise ClientError("the body must be multipart/form-data (an image file and form fields)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ClientError("the multipart body could not be read")
    fields, files = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = payload
            continue
        value = payload.decode("utf-8", errors="replace")
        try:
            fields[name] = int(value) if name in _FORM_FIELDS else float(value) if name in _FORM_NUMBERS else value
        except ValueError:
            raise InvalidParameter(name, f"must be a number, got {value[:40]!r}") from None
    return fields, files


routes = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/images/edits", edits, methods=["POST"]),
]
