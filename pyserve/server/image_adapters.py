"""Image requests for every front-end (OpenAI images API, KServe V2, msgpack): fields to an
`ImageRequest`, uploaded pictures to tensors, generated images to 8-bit arrays and PNGs.

Decoding and encoding run in worker threads (`asyncio.to_thread`): a large PNG costs tens of
milliseconds, which the event loop must not wait on."""

import asyncio
import base64
import io
import random
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from ..engine.batch import TensorRequest
from ..engine.diffusion import ImageRequest
from ..engine.diffusion.requests import MAX_IMAGES
from ..errors import InvalidParameter
from ..kernels.rng import SEED_RANGE, row_seed
from ..tasks import IMAGE_GENERATION
from .adapters import check_text, get_field
from .uploads import open_image
from .models import ModelRegistry, ServedModel


_TYPES = {"prompt": str, "negative_prompt": str, "n": int, "size": str, "width": int, "height": int,
          "num_inference_steps": int, "guidance_scale": (int, float), "scheduler": str, "seed": int,
          "strength": (int, float), "response_format": str, "partial_images": int, "class_label": int}


def image_model(models: ModelRegistry, name, one_shot: bool = False) -> ServedModel:
    """The model called `name` if it makes images: a diffusion model, or (when `one_shot`) a
    one-shot model that takes a `seed` per item and answers uint8 `images`."""
    if name is not None and not isinstance(name, str):
        raise InvalidParameter("model", "must be a string")
    model = models.get(name)
    if model.task == IMAGE_GENERATION or (one_shot and makes_images(model)):
        return model
    raise InvalidParameter("model", f"{model.name!r} is a {model.task} model, not an image model")


def _image_operation(model: ServedModel):
    """The operation of a one-shot model that turns seeds into images (a GAN's, a VAE's sample)."""
    op = model.driver.info.operation(takes="seed", makes="images")
    if op is not None and any(t.name == "images" and t.dtype == "uint8" and len(t.shape) == 3 for t in op.outputs):
        return op
    return None


def makes_images(model: ServedModel) -> bool:
    return _image_operation(model) is not None


def one_shot_request(model: ServedModel, fields: Mapping) -> TensorRequest:
    """A one-shot image producer's items for an images-API request: n seeds (the request's seed
    spread as diffusion spreads it), and the class from `class_label` or a prompt naming a class."""
    n, seed = _field(fields, "n", 1), _field(fields, "seed")
    if not 1 <= n <= MAX_IMAGES:
        raise InvalidParameter("n", f"must be in [1, {MAX_IMAGES}]")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise InvalidParameter("seed", "must fit in 64 bits")
    first = random.getrandbits(63) if seed is None else seed
    inputs = {"seed": np.array([row_seed(first, i) for i in range(n)], dtype=np.int64)}
    names = model.driver.info.class_names
    operation = _image_operation(model)
    if any(t.name == "class_label" for t in operation.inputs):
        label = _field(fields, "class_label")
        prompt = _field(fields, "prompt", "").strip().lower()
        if label is None and prompt:
            matches = [i for i, name in enumerate(names) if name.lower() in prompt]
            if len(matches) != 1:
                raise InvalidParameter("prompt", f"must name exactly one class of {', '.join(names) or 'none'} "
                                                 "(or send class_label)")
            label = matches[0]
        if label is None:
            raise InvalidParameter("class_label", "this model is class-conditional: send class_label or a prompt "
                                                  "naming a class")
        inputs["class_label"] = np.full(n, label, dtype=np.int64)
    return TensorRequest(inputs, operation=operation.name)


def _field(fields: Mapping, name: str, default=None):
    return get_field(fields, name, default, _TYPES)


def check_response_format(fields: Mapping) -> None:
    if _field(fields, "response_format", "b64_json") != "b64_json":
        raise InvalidParameter("response_format", "only b64_json is served (this server keeps no image URLs)")


def image_request(fields: Mapping, init_image: torch.Tensor | None = None) -> ImageRequest:
    """An ImageRequest from OpenAI-named fields (`size` "WxH", or `width`/`height`) plus extras."""
    check_response_format(fields)
    width, height = _field(fields, "width"), _field(fields, "height")
    size = _field(fields, "size", "auto")
    if size != "auto":
        w, sep, h = size.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise InvalidParameter("size", f"must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto, got {size!r}")
        width, height = int(w), int(h)
    return ImageRequest(
        prompt=check_text(_field(fields, "prompt", ""), "prompt"),
        negative_prompt=check_text(_field(fields, "negative_prompt", ""), "negative_prompt"),
        n=_field(fields, "n", 1), height=height, width=width,
        num_inference_steps=_field(fields, "num_inference_steps", 20),
        guidance_scale=_field(fields, "guidance_scale", 7.5), scheduler=_field(fields, "scheduler"),
        seed=_field(fields, "seed"), init_image=init_image, strength=_field(fields, "strength", 0.8),
        partial_images=_field(fields, "partial_images", 0))


# KServe V2 / msgpack tensor form: text inputs as one BYTES element, the rest as scalars.
PROMPT_INPUT, NEGATIVE_INPUT, IMAGES_OUTPUT = "prompt", "negative_prompt", "images"
SCALAR_INPUTS = {"n": "INT32", "height": "INT32", "width": "INT32", "num_inference_steps": "INT32",
                 "guidance_scale": "FP32", "seed": "INT64"}


def image_from_tensors(inputs: list[tuple[str, list]], parameters: Mapping | None) -> ImageRequest:
    """An ImageRequest from named tensors (prompt as BYTES, numbers as one-element tensors) and
    request parameters (which may also name `scheduler`)."""
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InvalidParameter("parameters", "must be a map")
    fields = dict(parameters or {})
    for name, values in inputs:
        if name in (PROMPT_INPUT, NEGATIVE_INPUT):
            if len(values) != 1 or not isinstance(values[0], bytes):
                raise InvalidParameter(name, "must hold exactly one BYTES element")
            fields[name] = values[0].decode("utf-8", errors="replace")
        elif name in SCALAR_INPUTS and len(values) == 1:
            value = values[0]
            fields[name] = float(value) if SCALAR_INPUTS[name] == "FP32" else int(value)
        else:
            raise InvalidParameter(name, f"unknown input, or not one element (inputs: {PROMPT_INPUT}, "
                                         f"{NEGATIVE_INPUT}, {', '.join(SCALAR_INPUTS)})")
    return image_request(fields)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[n, H, W, 3] floats in [0, 1] to 8-bit values, rounded as diffusers rounds them."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


async def encode_pngs(images: np.ndarray) -> list[bytes]:
    """PNG files of [n, H, W, C] images: floats in [0, 1], or 8-bit values; C is 1 (grey) or 3."""
    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    return await asyncio.to_thread(lambda: [_png(image) for image in pixels])


async def b64_pngs(images: np.ndarray) -> list[str]:
    return [base64.b64encode(png).decode() for png in await encode_pngs(images)]


def _decode(data: bytes, name: str) -> torch.Tensor:
    rgb = np.asarray(open_image(data, name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


async def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    """An uploaded picture (PNG, JPEG, WebP, ...) as [3, H, W] floats in [0, 1]."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidParameter(name, "must be an image file")
    return await asyncio.to_thread(_decode, bytes(data), name)
