"""The msgpack wire format shared by the server and `pyserve.client` (see docs/protocol.md).

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map.
"""

import struct

import msgpack

from .errors import ClientError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 2**20
_LENGTH = struct.Struct(">I")

# Error codes, HTTP-like so that they read the same on both APIs.
BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, TOO_LARGE, SERVER_ERROR, UNAVAILABLE = 400, 401, 404, 413, 500, 503


class ProtocolError(ClientError):
    """A frame or message the server cannot take; `status` is the error frame's code."""

    def __init__(self, code: int, message: str):
        super().__init__(message, status=code)

    @property
    def code(self) -> int:
        return self.status


def encode(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(TOO_LARGE, f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


def frame_length(header: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    (length,) = _LENGTH.unpack(header)
    if length > limit:
        raise ProtocolError(TOO_LARGE, f"frame of {length} bytes exceeds {limit}")
    return length


def decode(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - any malformed payload is the sender's error
        raise ProtocolError(BAD_REQUEST, f"malformed msgpack frame: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_REQUEST, "a frame must hold a msgpack map")
    return message


def tensor_to_wire(value) -> dict:
    """A numpy array (or a list of bytes, or an object array of bytes) as a wire tensor
    {dtype, shape, data}: raw little-endian values, so nothing is converted on the way."""
    import numpy as np
    if isinstance(value, list) and all(isinstance(v, bytes) for v in value):
        return {"dtype": "bytes", "shape": [len(value)], "data": value}
    if isinstance(value, np.ndarray) and value.dtype == object:
        return {"dtype": "bytes", "shape": list(value.shape), "data": [bytes(v) for v in value.reshape(-1)]}
    array = np.ascontiguousarray(value)
    return {"dtype": array.dtype.str.lstrip("<|="), "shape": list(array.shape),
            "data": array.astype(array.dtype.newbyteorder("<")).tobytes()}


def tensor_from_wire(tensor: dict):
    """A wire tensor back as a numpy array (a bytes tensor as its list of bytes)."""
    if tensor["dtype"] == "bytes":
        return list(tensor["data"])
    import numpy as np
    dtype = np.dtype(tensor["dtype"]).newbyteorder("<")
    return np.frombuffer(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def error_frame(request_id, code: int, message: str) -> bytes:
    return encode({"type": "error", "id": request_id, "code": code, "message": message})
