"""Tensor requests for one-shot models (the batch engine), from KServe V2 and msgpack tensors:
wire tensors to numpy arrays of their declared shape, request parameters (`priority`,
`timeout` in microseconds as Triton names them, `operation`) to a `TensorRequest`, and arrays back to the
KServe datatypes and msgpack wire form."""

from collections.abc import Mapping

import numpy as np

from ..engine.batch import TensorRequest
from ..errors import InvalidParameter
from ..tasks import Operation
from .adapters import kserve_tensor_values, wire_tensor_values

KSERVE_DATATYPES = {"int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
                    "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "float16": "FP16",
                    "float32": "FP32", "float64": "FP64", "bool": "BOOL"}
_NUMPY = {v: k for k, v in KSERVE_DATATYPES.items()}


def _shaped(name: str, values: list, dtype: str, shape) -> np.ndarray:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise InvalidParameter(name, "shape must be a list of sizes")
    if int(np.prod(shape)) != len(values):
        raise InvalidParameter(name, f"shape {shape} holds {int(np.prod(shape))} values, got {len(values)}")
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidParameter(name, f"values do not fit {dtype}: {exc}") from None


def kserve_array(tensor: dict, blob: bytes | None) -> np.ndarray:
    name, datatype = tensor["name"], tensor.get("datatype")
    if datatype not in _NUMPY:
        raise InvalidParameter(name, f"datatype must be one of {', '.join(_NUMPY)}, got {datatype!r}")
    return _shaped(name, kserve_tensor_values(tensor, blob), _NUMPY[datatype], tensor.get("shape"))


def wire_array(name: str, tensor) -> np.ndarray:
    values = wire_tensor_values(name, tensor)
    return _shaped(name, values, str(np.dtype(tensor["dtype"])), tensor.get("shape"))


def tensor_request(arrays: dict[str, np.ndarray], parameters: Mapping | None) -> TensorRequest:
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InvalidParameter("parameters", "must be a map")
    parameters = parameters or {}
    priority, timeout = parameters.get("priority", 0), parameters.get("timeout")
    operation = parameters.get("operation")
    if operation is not None and not isinstance(operation, str):
        raise InvalidParameter("operation", "must be a string")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidParameter("priority", "must be an integer (higher goes first)")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise InvalidParameter("timeout", "must be a positive number of microseconds")
    return TensorRequest(arrays, priority, None if timeout is None else timeout / 1e6, operation)


def signature_metadata(operations: tuple[Operation, ...]) -> dict:
    """KServe V2 model metadata `inputs` and `outputs`; a model that does several things lists
    every tensor (inputs marked optional) and, as an extension, each operation's own lists."""
    def tensors(specs, optional: bool = False):
        return [{"name": t.name, "datatype": KSERVE_DATATYPES.get(t.dtype, t.dtype), "shape": [-1, *t.shape],
                 **({"optional": True} if optional else {})} for t in specs]

    if len(operations) == 1:
        return {"inputs": tensors(operations[0].inputs), "outputs": tensors(operations[0].outputs)}
    inputs = {t.name: t for op in operations for t in op.inputs}
    outputs = {t.name: t for op in operations for t in op.outputs}
    return {"inputs": tensors(inputs.values(), optional=True), "outputs": tensors(outputs.values()),
            "operations": [{"name": op.name, "inputs": tensors(op.inputs), "outputs": tensors(op.outputs)}
                           for op in operations]}
