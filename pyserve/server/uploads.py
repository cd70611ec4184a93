"""Image files clients upload (img2img sources, images in chat messages), read safely."""

import io
import warnings

from PIL import Image

from ..errors import InvalidParameter

MAX_UPLOAD_PIXELS = 4096 * 4096  # decompression-bomb guard for uploaded images


def open_image(data: bytes, name: str) -> Image.Image:
    """A picture file (PNG, JPEG, WebP, ...) read in full, refused with an error naming `name` when it
    is not an image or has more than MAX_UPLOAD_PIXELS pixels (checked before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            if picture.width * picture.height > MAX_UPLOAD_PIXELS:
                raise InvalidParameter(name, f"has {picture.width}x{picture.height} pixels; "
                                             f"at most {MAX_UPLOAD_PIXELS} are taken")
            picture.load()
            return picture
    except InvalidParameter:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Pillow says, the upload is at fault
        raise InvalidParameter(name, f"is not an image Pillow can read ({type(exc).__name__})") from None
