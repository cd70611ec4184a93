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
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import InvalidParameter
from ..threads import in_daemon_thread
from ..tasks import ImageInput, VisionSpec
from .uploads import open_image

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 20 * 2**20
FETCH_DEADLINE_S = 20.0  # a remote image's whole fetch, redirects included
FETCH_READ_TIMEOUT_S = 5.0  # one socket read
MAX_FETCHES = 4  # remote fetches at once per front-end; more wait their turn (within the deadline)


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


class ImageFetcher:
    """Remote image fetches for one front-end: only from `allowed_hosts`, checked again on every
    redirect (an allowed host that redirects to 127.0.0.1 gets nowhere); within FETCH_DEADLINE_S
    in all (a host that sends a byte every few seconds is cut off) and MAX_IMAGE_BYTES; at most
    MAX_FETCHES at once, each in a daemon thread of its own, so slow hosts can neither take the
    event loop's default pool (which tokenization uses) nor hold the process when it exits."""

    def __init__(self, allowed_hosts: frozenset[str] = frozenset(), max_fetches: int = MAX_FETCHES):
        self.allowed_hosts = allowed_hosts
        self._slots = asyncio.Semaphore(max_fetches)

    async def fetch(self, part: ImagePart) -> bytes:
        self._check_host(part.url, part.where)
        try:
            return await asyncio.wait_for(self._fetch_in_slot(part), FETCH_DEADLINE_S)
        except TimeoutError:
            raise InvalidParameter(part.where, f"the image did not arrive within {FETCH_DEADLINE_S:.0f} s") from None

    async def _fetch_in_slot(self, part: ImagePart) -> bytes:
        async with self._slots:
            return await in_daemon_thread(self._fetch, part, name="pyserve-image-fetch")

    def _check_host(self, url: str, where: str) -> None:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or host not in self.allowed_hosts:
            raise InvalidParameter(where, f"fetching images from {host!r} is not allowed on this server; "
                                          f"send a data: URL")

    def _fetch(self, part: ImagePart) -> bytes:
        fetcher = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                fetcher._check_host(newurl, part.where)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        deadline = time.monotonic() + FETCH_DEADLINE_S
        opener = urllib.request.build_opener(CheckedRedirects)
        try:
            with opener.open(part.url, timeout=FETCH_READ_TIMEOUT_S) as response:
                data = bytearray()  # grown in place: bytes += would copy all of it for every chunk
                while len(data) <= MAX_IMAGE_BYTES and time.monotonic() < deadline:
                    chunk = response.read1(2**16)
                    if not chunk:
                        return bytes(data)
                    data += chunk
        except InvalidParameter:
            raise
        except Exception as exc:  # noqa: BLE001 - the URL is the client's
            raise InvalidParameter(part.where, f"could not fetch the image ({type(exc).__name__})") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidParameter(part.where, f"larger than {MAX_IMAGE_BYTES} bytes")
        raise InvalidParameter(part.where, f"the image did not arrive within {FETCH_DEADLINE_S:.0f} s")


async def prepare(images: list[ImagePart], vision: VisionSpec, fetcher: ImageFetcher) -> list[ImageInput]:
    """Each image fetched (remote ones), read, checked and prepared as its model says, off the
    event loop."""
    prepared = []
    for part in images:
        data = part.data if part.url is None else await fetcher.fetch(part)
        prepared.append(await asyncio.to_thread(_prepare, data, part.where, vision))
    return prepared


def _prepare(data: bytes, where: str, vision: VisionSpec) -> ImageInput:
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidParameter(where, f"larger than {MAX_IMAGE_BYTES} bytes")
    picture = open_image(data, where)
    return ImageInput(vision.preprocess(picture), hashlib.sha256(data).hexdigest())


def expand_image_tokens(ids: list[int], vision: VisionSpec) -> list[int]:
    """Each image token of a rendered prompt as the image's `tokens_per_image` placeholders."""
    return [t for i in ids for t in ([i] * vision.tokens_per_image if i == vision.image_token_id else [i])]
