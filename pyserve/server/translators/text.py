"""Text generation: the OpenAI and msgpack text routes, and text as tensors.

As tensors (KServe V2 infer, msgpack infer) a request is a BYTES input `text_input` with optional
one-element inputs or request `parameters` (max_tokens, temperature, top_p, top_k, seed, ...); the
answer is a BYTES output `text_output`.
"""

import math
from collections.abc import Mapping

from ...errors import ClientError, InvalidParameter, ModelFailure
from ...tasks import TEXT_GENERATION
from .. import adapters
from ..tensors import Tensors, bytes_array
from .base import Caller, Outcome, TensorSignature, Translator

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
# Scalar inputs a text request may carry besides text_input: name -> KServe V2 datatype.
SCALAR_INPUTS = {"max_tokens": "INT32", "min_tokens": "INT32", "temperature": "FP32", "top_p": "FP32",
                 "top_k": "INT32", "min_p": "FP32", "seed": "INT64", "repetition_penalty": "FP32",
                 "presence_penalty": "FP32", "frequency_penalty": "FP32", "ignore_eos": "BOOL"}


def text_fields(tensors: Tensors, parameters: Mapping) -> tuple[str, dict]:
    """The prompt and the request's fields (OpenAI names) from named tensors and parameters."""
    fields = dict(parameters)
    text = None
    for name, array in tensors.items():
        values = array.reshape(-1).tolist()
        if name == TEXT_INPUT:
            if len(values) != 1 or not isinstance(values[0], bytes):
                raise InvalidParameter(TEXT_INPUT, "must hold exactly one BYTES element")
            text = values[0].decode("utf-8", errors="replace")
        elif name in SCALAR_INPUTS and len(values) == 1 and not isinstance(values[0], bytes):
            value = values[0]
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidParameter(name, "must be a finite number")
            fields[name] = value
        else:
            raise InvalidParameter(name, f"unknown input, or not one element (inputs: {TEXT_INPUT}, "
                                         f"{', '.join(SCALAR_INPUTS)})")
    if not text:
        raise InvalidParameter(TEXT_INPUT, "is required")
    fields.setdefault("max_tokens", 16)
    return text, fields


class TextTranslator(Translator):
    task = TEXT_GENERATION
    text = True

    def signature(self, model) -> TensorSignature:
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1], "optional": False}]
        inputs += [{"name": n, "datatype": t, "shape": [1], "optional": True} for n, t in SCALAR_INPUTS.items()]
        return TensorSignature(inputs, [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}])

    async def infer_request(self, model, tensors: Tensors, parameters: Mapping, caller: Caller):
        text, fields = text_fields(tensors, parameters)
        params = adapters.sampling_params(fields, chat=False)
        ids = await adapters.prompt_ids(model, text, TEXT_INPUT)
        return adapters.text_request(ids, params, parameters, caller.principal, lora=model.lora)

    def infer_outputs(self, model, out) -> Tensors:
        return {TEXT_OUTPUT: bytes_array([out.outputs[0].text.encode()])}

    def infer_extras(self, out) -> dict:
        return {"usage": adapters.usage([out])}

    def embedding_request(self, model, inputs: list, fields: Mapping):
        raise InvalidParameter("model", f"{model.name!r} is a text-generation model: it serves embeddings only "
                                        f"when started with --task embed")

    def failure(self, out) -> ClientError:
        """The request's own fault (a constraint that cannot go on) as a 4xx naming its field, the
        model's as a 500."""
        if out.error_status < 500:
            return ClientError(out.error, out.error_field, status=out.error_status)
        return ModelFailure(f"the model failed: {out.error}")

    def outcome(self, out, aborted: bool) -> Outcome:
        generated = sum(len(o.token_ids) for o in out.outputs)
        status = "abort" if aborted else "error" if out.error else out.outputs[0].finish_reason or "unknown"
        return Outcome(status, len(out.prompt_token_ids), generated, max(len(out.outputs), 1))

