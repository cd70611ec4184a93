"""KServe V2 / Open Inference Protocol routes, with the binary tensor extension.

A text model takes a BYTES input `text_input` (optional scalar inputs or request `parameters`:
max_tokens, temperature, top_p, top_k, seed, ...) and returns a BYTES output `text_output`.
An image model takes a BYTES input `prompt` (optional `negative_prompt` and scalar inputs:
n, height, width, num_inference_steps, guidance_scale, seed; `scheduler` as a parameter) and
returns a UINT8 output `images` [n, H, W, 3].
"""

import json
from dataclasses import dataclass

import numpy as np

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ClientError, InvalidParameter, ModelFailure
from ..tasks import IMAGE_GENERATION, TENSOR, TEXT_GENERATION
from . import adapters, image_adapters, tensor_adapters
from .adapters import SCALAR_INPUTS, TEXT_INPUT, TEXT_OUTPUT
from .responses import parse_json, read_body

HEADER_LENGTH = "inference-header-content-length"


async def _parse(request: Request) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and the binary blobs of inputs that use the binary extension."""
    raw = await read_body(request)
    header_len = request.headers.get(HEADER_LENGTH)
    if header_len is not None:
        if not header_len.isdigit() or int(header_len) > len(raw):
            raise ClientError(f"{HEADER_LENGTH} must be a length within the body", HEADER_LENGTH)
        head, tail = raw[:int(header_len)], raw[int(header_len):]
    else:
        head, tail = raw, b""
    body = parse_json(head, "the inference request")
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidParameter("inputs", "the inference request needs an 'inputs' list")
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
    if model.task == TENSOR:
        return JSONResponse({"name": model.name, "versions": ["1"], "platform": "pyserve", "task": model.task,
                             **tensor_adapters.signature_metadata(model.driver.info.operations)})
    if model.task == IMAGE_GENERATION:
        text_inputs = (image_adapters.PROMPT_INPUT, image_adapters.NEGATIVE_INPUT)
        scalars = image_adapters.SCALAR_INPUTS
        outputs = [{"name": image_adapters.IMAGES_OUTPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    else:
        text_inputs, scalars = (TEXT_INPUT,), SCALAR_INPUTS
        outputs = [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}]
    inputs = [{"name": n, "datatype": "BYTES", "shape": [1], "optional": i > 0} for i, n in enumerate(text_inputs)]
    inputs += [{"name": n, "datatype": t, "shape": [1], "optional": True} for n, t in scalars.items()]
    return JSONResponse({"name": model.name, "versions": ["1"], "platform": "pyserve", "task": model.task,
                         "inputs": inputs, "outputs": outputs})


@dataclass
class _Output:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]

    def json_data(self) -> list:
        return [v.decode() for v in self.values] if self.datatype == "BYTES" else self.values.reshape(-1).tolist()

    def raw(self) -> bytes:
        return adapters.encode_bytes_tensor(self.values) if self.datatype == "BYTES" else \
            np.ascontiguousarray(self.values).tobytes()


async def infer(request: Request) -> Response:
    model = request.app.state.models.get(request.path_params["model"])
    body, blobs = await _parse(request)
    if model.task == TENSOR:
        return _answer(body, model.name, await _infer_tensor(request, model, body, blobs))
    if model.task not in (TEXT_GENERATION, IMAGE_GENERATION):
        raise InvalidParameter("model", f"{model.name!r} is a {model.task} model, which does not infer here yet")
    inputs = [(t["name"], adapters.kserve_tensor_values(t, blobs.get(t["name"]))) for t in body["inputs"]]
    run = _infer_image if model.task == IMAGE_GENERATION else _infer_text
    return _answer(body, model.name, [await run(request, model, body, inputs)])


async def _infer_tensor(request: Request, model, body: dict, blobs: dict) -> list[_Output]:
    arrays = {t["name"]: tensor_adapters.kserve_array(t, blobs.get(t["name"])) for t in body["inputs"]}
    out = await model.final_output(tensor_adapters.tensor_request(arrays, body.get("parameters")))
    request.app.state.metrics.request_finished(model, out)
    if out.error:
        raise ClientError(out.error, status=out.status)
    return [_Output(name, tensor_adapters.KSERVE_DATATYPES.get(str(array.dtype), "BYTES"), list(array.shape), array)
            for name, array in out.outputs.items()]


async def _infer_text(request: Request, model, body: dict, inputs) -> _Output:
    text, params = adapters.text_from_tensors(inputs, body.get("parameters"))
    ids = await adapters.prompt_ids(model, text, TEXT_INPUT)
    out = await model.final_output(adapters.text_request(ids, params, body.get("parameters"), request.state.principal,
                                                             lora=model.lora))
    request.app.state.metrics.finished(model, [out])
    if out.error:
        raise ModelFailure(f"the model failed: {out.error}")
    return _Output(TEXT_OUTPUT, "BYTES", [1], [out.outputs[0].text.encode()])


async def _infer_image(request: Request, model, body: dict, inputs) -> _Output:
    out = await model.final_output(image_adapters.image_from_tensors(inputs, body.get("parameters")))
    request.app.state.metrics.request_finished(model, out, out.images)
    if out.error:
        raise ModelFailure(f"the model failed: {out.error}")
    images = image_adapters.to_uint8(out.images)
    return _Output(image_adapters.IMAGES_OUTPUT, "UINT8", list(images.shape), images)


def _answer(body: dict, model_name: str, outputs: list[_Output]) -> Response:
    """The inference response (the requested outputs, else all), in JSON or, where the request
    asked for it, the binary extension."""
    requested = body.get("outputs") if isinstance(body.get("outputs"), list) else []
    wanted = {o.get("name"): o for o in requested if isinstance(o, dict)}
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    result = {"model_name": model_name, "model_version": "1", "outputs": []}
    if isinstance(body.get("id"), str):
        result["id"] = body["id"]
    blobs = []
    for output in outputs:
        if wanted and output.name not in wanted:
            continue
        options = (wanted.get(output.name) or {}).get("parameters")
        binary = bool(options.get("binary_data")) if isinstance(options, dict) else \
            bool(parameters.get("binary_data_output"))
        tensor = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if binary:
            blobs.append(output.raw())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = output.json_data()
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
    Route("/v2/models/{model}", model_meta),
    Route("/v2/models/{model}/ready", model_ready),
    Route("/v2/models/{model}/infer", infer, methods=["POST"]),
]
