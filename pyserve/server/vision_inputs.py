"""Images in chat messages, for models that read them (LLaVA-style): content parts to template
parts, image sources to prepared pixels, and the prompt's <image> tokens expanded to each image's
feature count.

Sources: `data:` URLs (base64 PNG, JPEG, WebP, ...) and, over msgpack, raw bytes. `http(s)` URLs
are fetched only from hosts the server allows (`--allowed-image-host`, repeatable; none by default), so a
request can never make the server fetch an arbitrary address.
"""

import asyncio
import base64
import binascii
import hashlib
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import InvalidParameter
from ..tasks import ImageInput, VisionSpec
from .uploads import open_image

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 20 * 2**20
FETCH_TIMEOUT_S = 10.0


@dataclass
class ImagePart:
    where: str  # the field errors name, e.g. "messages[0].content[1]"
    data: bytes | None = None
    url: str | None = None  # an http(s) URL to fetch


def split_images(messages: list[dict]) -> tuple[list[dict], list[ImagePart]]:
    """Messages as chat templates take them (image parts become {"type": "image"}) and the images
    in prompt order. Text-only content stays a string."""
    out, images = [], []
    for i, m in enumerate(messages):
        parts = m.get("content")
        if not isinstance(parts, list):
            out.append(m)
            continue
        rendered = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.get("type") in ("image_url", "image"):
                images.append(_image_part(part, where))
                rendered.append({"type": "image"})
            else:
                rendered.append({"type": "text", "text": part.get("text", "")})
        out.append({**m, "content": rendered})
    if len(images) > MAX_IMAGES:
        raise InvalidParameter("messages", f"{len(images)} images; at most {MAX_IMAGES} a request")
    return out, images


def _image_part(part: dict, where: str) -> ImagePart:
    if part.get("type") == "image":  # msgpack: the file's bytes
        data = part.get("image")
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidParameter(where, "an image part carries the image file as bytes in `image`")
        return ImagePart(where, data=bytes(data))
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str):
        raise InvalidParameter(where, "image_url must be {'url': ...}")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise InvalidParameter(where, "a data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise InvalidParameter(where, f"larger than {MAX_IMAGE_BYTES} bytes")
        try:
            return ImagePart(where, data=base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidParameter(where, "the data: URL is not valid base64") from None
    if urllib.parse.urlsplit(url).scheme in ("http", "https"):
        return ImagePart(where, url=url)
    raise InvalidParameter(where, "image_url must be a data: URL (or an http(s) URL on an allowed host)")


async def prepare(images: list[ImagePart], vision: VisionSpec, allowed_hosts: frozenset[str]) -> list[ImageInput]:
    """Each image read, checked and prepared as its model says, off the event loop."""
    return [await asyncio.to_thread(_prepare, part, vision, allowed_hosts) for part in images]


def _prepare(part: ImagePart, vision: VisionSpec, allowed_hosts: frozenset[str]) -> ImageInput:
    data = part.data if part.url is None else _fetch(part, allowed_hosts)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidParameter(part.where, f"larger than {MAX_IMAGE_BYTES} bytes")
    picture = open_image(data, part.where)
    return ImageInput(vision.preprocess(picture), hashlib.sha256(data).hexdigest())


def _fetch(part: ImagePart, allowed_hosts: frozenset[str]) -> bytes:
    host = urllib.parse.urlsplit(part.url).hostname or ""
    if host not in allowed_hosts:
        raise InvalidParameter(part.where, f"fetching images from {host!r} is not allowed on this server; "
                                           f"send a data: URL")
    try:
        with urllib.request.urlopen(part.url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - the URL is the client's
        raise InvalidParameter(part.where, f"could not fetch the image ({type(exc).__name__})") from None
    return data  # one byte past the limit at most: _prepare refuses it


def expand_image_tokens(ids: list[int], vision: VisionSpec) -> list[int]:
    """Each image token of a rendered prompt as the image's `tokens_per_image` placeholders."""
    return [t for i in ids for t in ([i] * vision.tokens_per_image if i == vision.image_token_id else [i])]
