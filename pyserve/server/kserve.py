"""KServe V2 / Open Inference Protocol routes, with the binary tensor extension.

Every model answers in the tensor form its task's translator gives it (pyserve.server.translators):
text models take `text_input` and answer `text_output`, image models take `prompt` and answer
uint8 `images`, one-shot models their declared tensors.
"""

import json

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ClientError, InvalidParameter
from . import inference, tensors, translators
from .responses import parse_json, read_body, unless_client_leaves
from .translators import Caller

HEADER_LENGTH = "inference-header-content-length"


async def _parse(request: Request) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and the binary blobs of inputs that use the binary extension."""
    raw = await read_body(request)
    header_len = request.headers.get(HEADER_LENGTH)
    if header_len is not None:
        # a length has no more digits than the body has bytes (int() refuses 4,300 digits and more)
        if not header_len.isdigit() or len(header_len) > len(str(len(raw))) or int(header_len) > len(raw):
            raise ClientError(f"{HEADER_LENGTH} must be a length within the body", HEADER_LENGTH)
        head, tail = raw[:int(header_len)], raw[int(header_len):]
    else:
        head, tail = raw, b""
    body = parse_json(head, "the inference request")
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidParameter("inputs", "the inference request needs an 'inputs' list")
    outputs = body.get("outputs", [])  # checked before the model runs
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidParameter("outputs", "must be a list of objects with a string name")
    blobs, at = {}, 0
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidParameter("inputs", "each input needs a name")
        size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(
            tensor.get("parameters") or {}, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(tail):
                raise InvalidParameter(tensor["name"], "binary_data_size runs past the body")
            blobs[tensor["name"]] = tail[at:at + size]
            at += size
    return body, blobs


async def server_meta(request: Request) -> Response:
    return JSONResponse({"name": "pyserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    ok = all(m.driver.ready for m in request.app.state.models)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def model_ready(request: Request) -> Response:
    model = request.app.state.models.get(request.path_params["model"])
    ok = model.driver.ready
    return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)


async def model_meta(request: Request) -> Response:
    model = request.app.state.models.get(request.path_params["model"])
    signature = translators.for_model(model).signature(model)
    return JSONResponse({"name": model.name, "versions": ["1"], "platform": "pyserve", "task": model.task,
                         **signature.metadata()})


def _triton_tensors(tensors: list[dict], batched: bool) -> list[dict]:
    """KServe metadata tensors as Triton config entries (a batched model's dims leave out the batch)."""
    return [{"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
             "dims": t["shape"][1:] if batched else t["shape"], **({"optional": True} if t.get("optional") else {})}
            for t in tensors]


async def model_config(request: Request) -> Response:
    """Triton's model configuration (GET /v2/models/{m}/config), as tritonclient reads it."""
    model = request.app.state.models.get(request.path_params["model"])
    signature = translators.for_model(model).signature(model)
    batch = model.driver.info.max_batch_size
    config = {"name": model.name, "platform": "pyserve", "backend": "pyserve", "max_batch_size": batch,
              "input": _triton_tensors(signature.inputs, batch > 0),
              "output": _triton_tensors(signature.outputs, batch > 0)}
    if batch:
        config["dynamic_batching"] = {}
    return JSONResponse(config)


async def model_stats(request: Request) -> Response:
    """Triton's statistics extension: GET /v2/models/{m}/stats, or /v2/models/stats for all."""
    models = request.app.state.models
    name = request.path_params.get("model")
    chosen = [models.get(name)] if name is not None else list(models)
    return JSONResponse({"model_stats": [request.app.state.metrics.model_statistics(m) for m in chosen]})


async def infer(request: Request) -> Response:
    model = request.app.state.models.get(request.path_params["model"])
    body, blobs = await _parse(request)
    inputs = {t["name"]: tensors.from_kserve(t, blobs.get(t["name"])) for t in body["inputs"]}
    caller = Caller(request.state.principal, request.app.state.images)
    outputs, _ = await unless_client_leaves(request, inference.infer(model, inputs, body.get("parameters"), caller))
    return _answer(body, model.name, outputs)


def _answer(body: dict, model_name: str, outputs: dict[str, np.ndarray]) -> Response:
    """The inference response (the requested outputs, else all), in JSON or, where the request
    asked for it, the binary extension."""
    wanted = {o["name"]: o for o in body.get("outputs", [])}  # _parse checked their shape
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    result = {"model_name": model_name, "model_version": "1", "outputs": []}
    if isinstance(body.get("id"), str):
        result["id"] = body["id"]
    blobs = []
    for name, array in outputs.items():
        if wanted and name not in wanted:
            continue
        options = (wanted.get(name) or {}).get("parameters")
        binary = bool(options.get("binary_data")) if isinstance(options, dict) else \
            bool(parameters.get("binary_data_output"))
        tensor = {"name": name, "datatype": tensors.kserve_datatype(array), "shape": list(array.shape)}
        if binary:
            blobs.append(tensors.kserve_raw(array))
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = tensors.kserve_json_data(array)
        result["outputs"].append(tensor)
    if not blobs:
        return JSONResponse(result)
    head = json.dumps(result).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


routes = [
    Route("/v2", server_meta),
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v2/models/stats", model_stats),
    Route("/v2/models/{model}", model_meta),
    Route("/v2/models/{model}/config", model_config),
    Route("/v2/models/{model}/stats", model_stats),
    Route("/v2/models/{model}/ready", model_ready),
    Route("/v2/models/{model}/infer", infer, methods=["POST"]),
]
