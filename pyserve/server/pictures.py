"""Pictures in and out: generated images as 8-bit arrays and PNG files, uploaded files as tensors.

Decoding and encoding run in worker threads (`asyncio.to_thread`): a large PNG costs tens of
milliseconds, which the event loop must not wait on."""

import asyncio
import base64
import io

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidParameter
from .uploads import open_image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[n, H, W, C] floats in [0, 1] to 8-bit values, rounded as diffusers rounds them (8-bit
    images pass as they are)."""
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


async def encode_pngs(images: np.ndarray) -> list[bytes]:
    """PNG files of [n, H, W, C] images: floats in [0, 1], or 8-bit values; C is 1 (grey) or 3."""
    pixels = to_uint8(images)
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
