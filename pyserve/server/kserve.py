"""KServe V2 / Open Inference Protocol routes, with the binary tensor extension.

A text model takes a BYTES input `text_input` (optional scalar inputs or request `parameters`:
max_tokens, temperature, top_p, top_k, seed, ...) and returns a BYTES output `text_output`.
"""

import json
import struct

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import openai_api as oa

HEADER_LENGTH = "inference-header-content-length"
TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
# Scalar inputs a text request may carry besides text_input: name -> V2 datatype.
SCALAR_INPUTS = {"max_tokens": "INT32", "min_tokens": "INT32", "temperature": "FP32", "top_p": "FP32",
                 "top_k": "INT32", "min_p": "FP32", "seed": "INT64", "repetition_penalty": "FP32",
                 "presence_penalty": "FP32", "frequency_penalty": "FP32", "ignore_eos": "BOOL"}
_NUMERIC = {"INT32": ("<i", int), "INT64": ("<q", int), "FP32": ("<f", float), "FP64": ("<d", float),
            "BOOL": ("<?", bool), "UINT8": ("<B", int)}


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise oa.BadRequest(400, "truncated BYTES tensor data", "inputs")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise oa.BadRequest(400, "truncated BYTES tensor data", "inputs")
        items.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return items


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


async def _parse(request: Request) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and the binary blobs of inputs that use the binary extension."""
    raw = await request.body()
    header_len = request.headers.get(HEADER_LENGTH)
    if header_len is not None:
        if not header_len.isdigit() or int(header_len) > len(raw):
            raise oa.BadRequest(400, f"{HEADER_LENGTH} must be a length within the body", HEADER_LENGTH)
        head, tail = raw[:int(header_len)], raw[int(header_len):]
    else:
        head, tail = raw, b""
    try:
        body = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise oa.BadRequest(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise oa.BadRequest(400, "the inference request needs an 'inputs' list", "inputs")
    blobs, at = {}, 0
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise oa.BadRequest(400, "each input needs a name", "inputs")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(tail):
                raise oa.BadRequest(400, f"binary_data_size of {tensor['name']} runs past the body", tensor["name"])
            blobs[tensor["name"]] = tail[at:at + size]
            at += size
    return body, blobs


def _values(tensor: dict, blob: bytes | None) -> list:
    dtype = tensor.get("datatype")
    if blob is not None:
        if dtype == "BYTES":
            return decode_bytes_tensor(blob)
        if dtype not in _NUMERIC:
            raise oa.BadRequest(400, f"{tensor['name']}: unsupported datatype {dtype}", tensor["name"])
        fmt, _ = _NUMERIC[dtype]
        width = struct.calcsize(fmt)
        return [struct.unpack_from(fmt, blob, i)[0] for i in range(0, len(blob) - width + 1, width)]
    data = tensor.get("data")
    if not isinstance(data, list):
        raise oa.BadRequest(400, f"{tensor['name']} has no data", tensor["name"])
    flat = []
    stack = list(reversed(data))
    while stack:  # the data may be nested like the shape
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return [v.encode() if dtype == "BYTES" and isinstance(v, str) else v for v in flat]


def kserve_routes(served: dict, metrics_hook) -> list[Route]:
    """Routes for the served models (`served`: name -> ServedModel)."""

    def find(name: str):
        if name not in served:
            raise oa.BadRequest(404, f"model {name!r} is not served; served: {', '.join(served)}", "model",
                                kind="not_found_error")
        return served[name]

    def v2_error(exc: oa.BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def server_meta(request: Request) -> Response:
        return JSONResponse({"name": "pyserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def model_ready(request: Request) -> Response:
        try:
            find(request.path_params["model"])
        except oa.BadRequest as exc:
            return v2_error(exc)
        return JSONResponse({"name": request.path_params["model"], "ready": True})

    async def model_meta(request: Request) -> Response:
        try:
            model = find(request.path_params["model"])
        except oa.BadRequest as exc:
            return v2_error(exc)
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}]
        inputs += [{"name": n, "datatype": t, "shape": [1], "optional": True} for n, t in SCALAR_INPUTS.items()]
        return JSONResponse({"name": model.name, "versions": ["1"], "platform": "pyserve",
                             "inputs": inputs, "outputs": [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}]})

    async def infer(request: Request) -> Response:
        try:
            model = find(request.path_params["model"])
            body, blobs = await _parse(request)
            options = dict(body.get("parameters") or {})
            text = None
            for tensor in body["inputs"]:
                values = _values(tensor, blobs.get(tensor["name"]))
                if tensor["name"] == TEXT_INPUT:
                    if len(values) != 1 or not isinstance(values[0], bytes):
                        raise oa.BadRequest(400, "text_input must hold exactly one BYTES element", TEXT_INPUT)
                    text = values[0].decode("utf-8", errors="replace")
                elif tensor["name"] in SCALAR_INPUTS and len(values) == 1:
                    options[tensor["name"]] = values[0]
                else:
                    raise oa.BadRequest(400, f"unknown input {tensor['name']!r}", tensor["name"])
            if not text:
                raise oa.BadRequest(400, "text_input is required", TEXT_INPUT)
            options.setdefault("max_tokens", 16)
            params = oa.sampling_params(options, chat=False)
            stream = model.engine.generate(text, params)
            out = None
            async for out in stream:
                pass
        except oa.BadRequest as exc:
            return v2_error(exc)
        except ValueError as exc:
            return v2_error(oa.BadRequest(400, str(exc)))
        metrics_hook(model.name, out)
        if out.error:
            return v2_error(oa.BadRequest(500, f"the model failed: {out.error}"))
        payload = out.outputs[0].text.encode()
        wanted = {o.get("name"): o for o in body.get("outputs") or [] if isinstance(o, dict)}
        binary = bool(((wanted.get(TEXT_OUTPUT) or {}).get("parameters") or {}).get("binary_data"))
        result = {"model_name": model.name, "model_version": "1", "outputs": []}
        if "id" in body:
            result["id"] = body["id"]
        tensor = {"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}
        if not binary:
            tensor["data"] = [payload.decode()]
            result["outputs"].append(tensor)
            return JSONResponse(result)
        blob = encode_bytes_tensor([payload])
        tensor["parameters"] = {"binary_data_size": len(blob)}
        result["outputs"].append(tensor)
        head = json.dumps(result).encode()
        return Response(head + blob, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    return [
        Route("/v2", server_meta),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
    ]
