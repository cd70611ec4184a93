"""One-shot models (the batch engine): their declared tensors as they are, and, for models with an
operation that turns seeds into 8-bit images (a GAN's, a VAE's sample), the images API as well.

Request parameters `priority`, `timeout` (microseconds, as Triton names them) and `operation` go
to the `TensorRequest`.
"""

import random
from collections.abc import Mapping

import numpy as np

from ...engine.batch import TensorRequest
from ...engine.diffusion.requests import MAX_IMAGES
from ...errors import ClientError, InvalidParameter
from ...kernels.rng import SEED_RANGE, row_seed
from ...tasks import TENSOR, Operation
from ..tensors import KSERVE_DATATYPES, Tensors
from .base import Caller, TensorSignature, Translator, Unsupported
from .image import check_response_format, field


MAX_TIMEOUT_US = 24 * 3600 * 10**6  # a day: more is no limit at all, and 10**400 overflows a float


def _tensor_specs(specs, optional: bool = False) -> list[dict]:
    return [{"name": t.name, "datatype": KSERVE_DATATYPES.get(t.dtype, t.dtype), "shape": [-1, *t.shape],
             **({"optional": True} if optional else {})} for t in specs]


def tensor_request(arrays: Tensors, parameters: Mapping) -> TensorRequest:
    priority, timeout = parameters.get("priority", 0), parameters.get("timeout")
    operation = parameters.get("operation")
    if operation is not None and not isinstance(operation, str):
        raise InvalidParameter("operation", "must be a string")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidParameter("priority", "must be an integer (higher goes first)")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)
                                or not 0 < timeout <= MAX_TIMEOUT_US):
        raise InvalidParameter("timeout", f"must be a positive number of microseconds, at most {MAX_TIMEOUT_US}")
    return TensorRequest(arrays, priority, None if timeout is None else timeout / 1e6, operation)


def image_operation(model) -> Operation | None:
    """The operation that turns seeds into [H, W, C] uint8 `images`, if the model has one."""
    op = model.driver.info.operation(takes="seed", makes="images")
    if op is not None and any(t.name == "images" and t.dtype == "uint8" and len(t.shape) == 3 for t in op.outputs):
        return op
    return None


class TensorTranslator(Translator):
    task = TENSOR

    def signature(self, model) -> TensorSignature:
        """Every tensor a model takes and makes; a model that does several things lists all of them
        (inputs marked optional) and, as an extension, each operation's own lists."""
        operations = model.driver.info.operations
        if len(operations) == 1:
            return TensorSignature(_tensor_specs(operations[0].inputs), _tensor_specs(operations[0].outputs))
        inputs = {t.name: t for op in operations for t in op.inputs}
        outputs = {t.name: t for op in operations for t in op.outputs}
        return TensorSignature(_tensor_specs(inputs.values(), optional=True), _tensor_specs(outputs.values()),
                               {"operations": [{"name": op.name, "inputs": _tensor_specs(op.inputs),
                                                "outputs": _tensor_specs(op.outputs)} for op in operations]})

    async def infer_request(self, model, tensors: Tensors, parameters: Mapping, caller: Caller) -> TensorRequest:
        return tensor_request(tensors, parameters)

    def infer_outputs(self, model, out) -> Tensors:
        return dict(out.outputs)

    def failure(self, out) -> ClientError:
        return ClientError(out.error, status=out.status)  # a full queue is a 503, a bad item a 400

    def image_request(self, model, fields: Mapping, init_image=None) -> TensorRequest:
        """n images from n seeds (the request's seed spread as diffusion spreads it), of the class
        `class_label` or the one the prompt names."""
        operation = image_operation(model)
        if operation is None:
            raise Unsupported(model, "image generation")
        if init_image is not None:
            raise InvalidParameter("image", f"{model.name!r} makes images from seeds; it does not edit pictures")
        check_response_format(fields)
        n, seed = field(fields, "n", 1), field(fields, "seed")
        if not 1 <= n <= MAX_IMAGES:
            raise InvalidParameter("n", f"must be in [1, {MAX_IMAGES}]")
        if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise InvalidParameter("seed", "must fit in 64 bits")
        first = random.getrandbits(63) if seed is None else seed
        inputs = {"seed": np.array([row_seed(first, i) for i in range(n)], dtype=np.int64)}
        if any(t.name == "class_label" for t in operation.inputs):
            inputs["class_label"] = np.full(n, self._class_label(model, fields), dtype=np.int64)
        return TensorRequest(inputs, operation=operation.name)

    @staticmethod
    def _class_label(model, fields: Mapping) -> int:
        names = model.driver.info.class_names
        label = field(fields, "class_label")
        prompt = field(fields, "prompt", "").strip().lower()
        if label is None and prompt:
            matches = [i for i, name in enumerate(names) if name.lower() in prompt]
            if len(matches) != 1:
                raise InvalidParameter("prompt", f"must name exactly one class of {', '.join(names) or 'none'} "
                                                 "(or send class_label)")
            label = matches[0]
        if label is None:
            raise InvalidParameter("class_label", "this model is class-conditional: send class_label or a prompt "
                                                  "naming a class")
        return label

    def images_of(self, out) -> np.ndarray | None:
        return out.outputs.get("images")

    def image_extras(self, request: TensorRequest, out) -> dict:
        return {"seeds": request.inputs["seed"].tolist()}
