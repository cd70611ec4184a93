"""Pictures in and out: generated images as 8-bit arrays and PNG files, uploaded files as tensors.

Decoding and encoding run in worker threads (`asyncio.to_thread`): a large PNG costs tens of
milliseconds, which the event loop must not wait on."""

import asyncio
import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FileFormat:
    """How generated images are written: OpenAI's `output_format` and `output_compression`."""

    name: str = "png"  # png, jpeg or webp
    quality: int = 100  # jpeg and webp: 0-100; png is lossless and ignores it

    @classmethod
    def of(cls, fields: Mapping) -> "FileFormat":
        name = fields.get("output_format", "png")
        if name not in ("png", "jpeg", "webp"):
            raise InvalidParameter("output_format", f"must be png, jpeg or webp, got {name!r}")
        quality = fields.get("output_compression", 100)
        if isinstance(quality, str) and quality.isdigit():  # a multipart form field
            quality = int(quality)
        if not isinstance(quality, int) or isinstance(quality, bool) or not 0 <= quality <= 100:
            raise InvalidParameter("output_compression", "must be an integer from 0 to 100")
        return cls(name, quality)

    def write(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if self.name == "png":
            picture.save(buf, format="PNG")
        else:
            picture.save(buf, format=self.name.upper(), quality=self.quality)
        return buf.getvalue()


PNG = FileFormat()


async def encode_pngs(images: np.ndarray, file_format: FileFormat = PNG) -> list[bytes]:
    """Image files (PNG unless `file_format` says otherwise) of [n, H, W, C] images: floats in
    [0, 1], or 8-bit values; C is 1 (grey) or 3."""
    pixels = to_uint8(images)
    return await asyncio.to_thread(lambda: [file_format.write(image) for image in pixels])


async def b64_pngs(images: np.ndarray, file_format: FileFormat = PNG) -> list[str]:
    return [base64.b64encode(data).decode() for data in await encode_pngs(images, file_format)]


def _decode(data: bytes, name: str) -> torch.Tensor:
    rgb = np.asarray(open_image(data, name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


async def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    """An uploaded picture (PNG, JPEG, WebP, ...) as [3, H, W] floats in [0, 1]."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidParameter(name, "must be an image file")
    return await asyncio.to_thread(_decode, bytes(data), name)
