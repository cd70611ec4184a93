"""Image generation (diffusion): the images API's fields, and images as tensors.

As tensors (KServe V2 infer, msgpack infer) a request is a BYTES input `prompt` (optional
`negative_prompt` and one-element inputs n, height, width, num_inference_steps, guidance_scale,
seed; `scheduler` as a parameter); the answer is a UINT8 output `images` [n, H, W, 3].
"""

import math
from collections.abc import Mapping

import numpy as np
import torch

from ...engine.diffusion import ImageRequest
from ...errors import InvalidParameter
from ...tasks import IMAGE_GENERATION
from ..adapters import check_text, get_field
from ..pictures import to_uint8
from ..tensors import Tensors
from .base import Caller, TensorSignature, Translator

FIELD_TYPES = {"prompt": str, "negative_prompt": str, "n": int, "size": str, "width": int, "height": int,
               "num_inference_steps": int, "guidance_scale": (int, float), "scheduler": str, "seed": int,
               "strength": (int, float), "response_format": str, "partial_images": int, "class_label": int}

PROMPT_INPUT, NEGATIVE_INPUT, IMAGES_OUTPUT = "prompt", "negative_prompt", "images"
SCALAR_INPUTS = {"n": "INT32", "height": "INT32", "width": "INT32", "num_inference_steps": "INT32",
                 "guidance_scale": "FP32", "seed": "INT64"}


def field(fields: Mapping, name: str, default=None):
    return get_field(fields, name, default, FIELD_TYPES)


def check_response_format(fields: Mapping) -> None:
    if field(fields, "response_format", "b64_json") != "b64_json":
        raise InvalidParameter("response_format", "only b64_json is served (this server keeps no image URLs)")


def image_request(fields: Mapping, init_image: torch.Tensor | None = None) -> ImageRequest:
    """An ImageRequest from OpenAI-named fields (`size` "WxH", or `width`/`height`) plus extras."""
    check_response_format(fields)
    width, height = field(fields, "width"), field(fields, "height")
    size = field(fields, "size", "auto")
    if size != "auto":
        w, sep, h = size.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise InvalidParameter("size", f"must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto, got {size!r}")
        width, height = int(w), int(h)
    return ImageRequest(
        prompt=check_text(field(fields, "prompt", ""), "prompt"),
        negative_prompt=check_text(field(fields, "negative_prompt", ""), "negative_prompt"),
        n=field(fields, "n", 1), height=height, width=width,
        num_inference_steps=field(fields, "num_inference_steps", 20),
        guidance_scale=field(fields, "guidance_scale", 7.5), scheduler=field(fields, "scheduler"),
        seed=field(fields, "seed"), init_image=init_image, strength=field(fields, "strength", 0.8),
        partial_images=field(fields, "partial_images", 0))


def fields_from_tensors(tensors: Tensors, parameters: Mapping) -> dict:
    """Images-API fields from named tensors (prompts as BYTES, numbers as one-element tensors) and
    request parameters (which may also name `scheduler`)."""
    fields = dict(parameters)
    for name, array in tensors.items():
        values = array.reshape(-1).tolist()
        if name in (PROMPT_INPUT, NEGATIVE_INPUT):
            if len(values) != 1 or not isinstance(values[0], bytes):
                raise InvalidParameter(name, "must hold exactly one BYTES element")
            fields[name] = values[0].decode("utf-8", errors="replace")
        elif name in SCALAR_INPUTS and len(values) == 1 and not isinstance(values[0], bytes):
            fields[name] = _scalar(name, values[0])
        else:
            raise InvalidParameter(name, f"unknown input, or not one element (inputs: {PROMPT_INPUT}, "
                                         f"{NEGATIVE_INPUT}, {', '.join(SCALAR_INPUTS)})")
    return fields


def _scalar(name: str, value):
    """A one-element input as its field's type: a finite number (FP32) or a whole one."""
    if SCALAR_INPUTS[name] == "FP32":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParameter(name, "must be a finite number")
        return float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, "must be an integer")
    return value


class ImageTranslator(Translator):
    task = IMAGE_GENERATION
    streams_images = True

    def signature(self, model) -> TensorSignature:
        inputs = [{"name": n, "datatype": "BYTES", "shape": [1], "optional": n != PROMPT_INPUT}
                  for n in (PROMPT_INPUT, NEGATIVE_INPUT)]
        inputs += [{"name": n, "datatype": t, "shape": [1], "optional": True} for n, t in SCALAR_INPUTS.items()]
        return TensorSignature(inputs, [{"name": IMAGES_OUTPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}])

    async def infer_request(self, model, tensors: Tensors, parameters: Mapping, caller: Caller) -> ImageRequest:
        return image_request(fields_from_tensors(tensors, parameters))

    def infer_outputs(self, model, out) -> Tensors:
        return {IMAGES_OUTPUT: to_uint8(out.images)}

    def image_request(self, model, fields: Mapping, init_image=None) -> ImageRequest:
        return image_request(fields, init_image)

    def images_of(self, out) -> np.ndarray | None:
        return out.images

    def image_extras(self, request, out) -> dict:
        return {"seeds": out.seeds}
