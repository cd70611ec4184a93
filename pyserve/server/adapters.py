"""Text requests to engine inputs, shared by every front-end (OpenAI, KServe, msgpack).

Sampling parameters from a map of fields, every prompt form the OpenAI API allows, chat
messages, and tokenization off the event loop after a size check that refuses a hopeless prompt
before any of it is tokenized. All faults are `ClientError`s naming the field, so the front-ends
cannot drift apart.
"""

import asyncio
import json
from collections.abc import Mapping

from ..engine.llm import RequestOutput, SamplingParams, StructuredOutput, TextRequest
from ..errors import InvalidParameter
from ..tasks import ImageInput
from . import tool_calls, vision_inputs
from .auth import Principal
from .models import ServedModel

# A prompt longer than the context times this many characters per vocabulary entry cannot fit;
# the slack covers normalizers that drop characters.
_PROMPT_CHAR_SLACK = 4

_TYPES = {
    "model": str, "n": int, "max_tokens": int, "max_completion_tokens": int, "min_tokens": int, "seed": int,
    "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "repetition_penalty": (int, float),
    "stream": bool, "ignore_eos": bool, "logprobs": (bool, int), "top_logprobs": int, "user": str,
    "logit_bias": dict, "stop_token_ids": list, "echo": bool, "skip_special_tokens": bool, "cache_salt": str,
    "prompt_logprobs": int, "response_format": dict, "guided_json": (dict, str), "guided_regex": str,
    "guided_choice": list, "guided_grammar": str, "tools": list, "tool_choice": (str, dict),
    "parallel_tool_calls": bool, "store": bool,
}
MAX_CACHE_SALT = 1024
MAX_ROLE_CHARS = 64


def get_field(fields: Mapping, name: str, default=None, types: Mapping = _TYPES):
    """A field's value checked against its type in `types` (the text fields unless given); absent
    and explicit null both mean the default."""
    value = fields.get(name)
    if value is None:
        return default
    expected = types.get(name)
    if expected is not None:
        if isinstance(value, bool) and expected in (int, (int, float)):
            raise InvalidParameter(name, "must be a number, got a boolean")
        if not isinstance(value, expected):
            raise InvalidParameter(name, f"has the wrong type ({type(value).__name__})")
    return value


def required_text(fields: Mapping, name: str) -> str:
    """A field that must be a non-empty string."""
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParameter(name, "must be a non-empty string")
    return value


def _token_id_list(value, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidParameter(name, "must be a list of integer token ids")
    return value


def sampling_params(fields: Mapping, chat: bool) -> SamplingParams:
    """SamplingParams from a request's fields (OpenAI names; KServe and msgpack use the same)."""
    stop = fields.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise InvalidParameter("stop", "must be a string or a list of strings")
    bias = get_field(fields, "logit_bias") or {}
    try:
        bias = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError, OverflowError):
        raise InvalidParameter("logit_bias", "must map token ids to numbers") from None
    if chat:
        logprobs = get_field(fields, "top_logprobs") if get_field(fields, "logprobs") else None
        if get_field(fields, "logprobs") and logprobs is None:
            logprobs = 0
    else:
        logprobs = get_field(fields, "logprobs")
        if isinstance(logprobs, bool):
            raise InvalidParameter("logprobs", "must be an integer for completions")
    max_tokens = get_field(fields, "max_completion_tokens") if chat and fields.get("max_completion_tokens") is not None \
        else get_field(fields, "max_tokens", None if chat else 16)
    params = SamplingParams(
        n=get_field(fields, "n", 1), max_tokens=max_tokens, min_tokens=get_field(fields, "min_tokens", 0),
        stop=stop, stop_token_ids=_token_id_list(get_field(fields, "stop_token_ids", []), "stop_token_ids"),
        ignore_eos=get_field(fields, "ignore_eos", False), seed=get_field(fields, "seed"),
        temperature=get_field(fields, "temperature"), top_k=get_field(fields, "top_k"), top_p=get_field(fields, "top_p"),
        min_p=get_field(fields, "min_p"), repetition_penalty=get_field(fields, "repetition_penalty"),
        presence_penalty=get_field(fields, "presence_penalty", 0.0),
        frequency_penalty=get_field(fields, "frequency_penalty", 0.0), logit_bias=bias, logprobs=logprobs,
        prompt_logprobs=get_field(fields, "prompt_logprobs"),
        skip_special_tokens=get_field(fields, "skip_special_tokens", True), structured=structured_output(fields))
    params.validate()
    return params


def structured_output(fields: Mapping) -> StructuredOutput | None:
    """The constraint a request puts on its output: OpenAI's `response_format`, or vLLM's
    `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (at most one of them)."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if get_field(fields, name) is not None]
    if len(given) > 1:
        raise InvalidParameter(given[1], f"give one of {', '.join(given)}, not several")
    if not given:
        return None
    name = given[0]
    value = get_field(fields, name)
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidParameter(name, "is not valid JSON") from None
        return StructuredOutput(json=value, field=name)
    if name == "guided_choice":
        return StructuredOutput(choice=tuple(value), field=name)
    return StructuredOutput(**{name.removeprefix("guided_"): value, "field": name})


def _response_format(value: dict) -> StructuredOutput | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True, field="response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidParameter("response_format", "json_schema must be an object with a `schema` object")
        schema = spec.get("schema", {})
        return StructuredOutput(json=closed_objects(schema) if spec.get("strict") else schema, field="response_format")
    raise InvalidParameter("response_format", f"type must be text, json_object or json_schema, got {kind!r}")


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that does not say otherwise:
    what OpenAI's `strict` means (a strict object has exactly the properties it lists)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    if isinstance(out.get("items"), dict):
        out["items"] = closed_objects(out["items"])
    return out


MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def metadata(value) -> dict[str, str]:
    """A request's `metadata` (stored completions and responses), checked as OpenAI bounds it."""
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS
            or not all(isinstance(k, str) and len(k) <= MAX_METADATA_KEY and isinstance(v, str)
                       and len(v) <= MAX_METADATA_VALUE for k, v in value.items())):
        raise InvalidParameter("metadata", f"must map at most {MAX_METADATA_KEYS} keys of {MAX_METADATA_KEY} "
                                           f"characters to strings of {MAX_METADATA_VALUE}")
    return value


def completion_prompts(value) -> list[str | list[int]]:
    """Every form of the OpenAI `prompt`: a string, a list of strings, token ids, or lists of them."""
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        prompts = [p if isinstance(p, str) else _token_id_list(p, "prompt") for p in value]
    else:
        raise InvalidParameter("prompt", "must be a string, a list of strings, a list of token ids, "
                                         "or a list of lists of token ids")
    if any(not p for p in prompts):
        raise InvalidParameter("prompt", "must not be empty")
    for p in prompts:
        if isinstance(p, str):
            check_text(p, "prompt")
    return prompts


def check_text(text: str, name: str) -> str:
    """A string that can be encoded (JSON lets a lone surrogate through; UTF-8 cannot carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameter(name, "is not valid Unicode (a lone surrogate?)") from None
    return text


def chat_messages(value) -> list[dict]:
    """Validated chat messages, with content parts reduced to their text."""
    if not isinstance(value, list) or not value:
        raise InvalidParameter("messages", "must be a non-empty list")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidParameter("messages", f"messages[{i}] must be an object with a string role")
        if len(m["role"]) > MAX_ROLE_CHARS:  # a role is a word: text goes in content, which is size-checked
            raise InvalidParameter("messages", f"messages[{i}].role is longer than {MAX_ROLE_CHARS} characters")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text, and images for models that read them
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise InvalidParameter("messages", f"messages[{i}].content parts must be objects")
            for part in content:
                check_text(part.get("text", ""), "messages")
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise InvalidParameter("messages", f"messages[{i}].content must be a string or a list of parts")
        else:
            check_text(content, "messages")
        message = {**m, "content": content, "role": check_text(m["role"], "messages")}
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        messages.append(message)
    return messages


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant turn's earlier tool calls, with their JSON arguments as objects: chat templates
    write them with `tojson`."""
    if not isinstance(calls, list):
        raise InvalidParameter("messages", f"{where} must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidParameter("messages", f"{where}[{j}] must have a function with a name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise InvalidParameter("messages", f"{where}[{j}].function.arguments is not JSON") from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def _check_prompt_size(model: ServedModel, num_chars: int, name: str) -> None:
    tokenizer = model.tokenizer
    limit = model.max_model_len * tokenizer.max_chars_per_token * _PROMPT_CHAR_SLACK
    if num_chars > limit:
        raise InvalidParameter(name, f"{num_chars} characters cannot fit the model's context of "
                                     f"{model.max_model_len} tokens")


async def prompt_ids(model: ServedModel, prompt: str | list[int], name: str = "prompt") -> list[int]:
    """Token ids of a prompt, tokenized in a worker thread after the size check (token ids get
    theirs here too: millions of them would otherwise reach the engine's thread)."""
    if not isinstance(prompt, str):
        if len(prompt) >= model.max_model_len:
            raise InvalidParameter(name, f"{len(prompt)} tokens; the model's context is {model.max_model_len}")
        return prompt
    if model.tokenizer is None:
        raise InvalidParameter(name, "this model has no tokenizer: send token ids")
    _check_prompt_size(model, len(prompt), name)
    return await asyncio.to_thread(model.tokenizer.encode, prompt)


async def chat_prompt(model: ServedModel, messages: list[dict], tools: list[dict] | None = None,
                      images: vision_inputs.ImageFetcher | None = None) -> tuple[list[int], list[ImageInput]]:
    """Token ids of a conversation rendered with the model's chat template, and its images
    prepared for the model, off the event loop. `tools` go to the template, or into a system
    message when the template has no place for them."""
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise InvalidParameter("messages", "this model has no chat template")
    messages, parts = vision_inputs.split_images(messages)
    if parts and model.vision is None:
        raise InvalidParameter(parts[0].where, f"{model.name!r} does not read images")
    if model.vision is None:  # text-only templates take content as a string
        messages = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list)
                    else m for m in messages]
    text_size = sum(len(p.get("text", "")) for m in messages
                    for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
    _check_prompt_size(model, text_size + len(json.dumps(tools or [])), "messages")
    if tools and not tool_calls.teaches_tools(model.tokenizer):
        messages, tools = tool_calls.with_tool_prompt(messages, tools), None
    try:
        ids = await asyncio.to_thread(model.tokenizer.encode_chat, messages, tools)
    except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
        raise InvalidParameter("messages", f"the chat template failed: {exc}") from None
    if model.vision is None:
        return ids, []
    prepared = await vision_inputs.prepare(parts, model.vision, images or vision_inputs.ImageFetcher())
    return vision_inputs.expand_image_tokens(ids, model.vision), prepared


def text_request(prompt_ids: list[int], params: SamplingParams, fields: Mapping | None,
                 principal: Principal | None, images: list[ImageInput] = (), lora: str | None = None) -> TextRequest:
    """The engine request, salted by the request's `cache_salt` and, when the server salts by API
    key, by the caller's tenant, so that only requests with both equal share cached prefixes."""
    salt = get_field(fields or {}, "cache_salt")
    if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT:
        raise InvalidParameter("cache_salt", f"must have 1 to {MAX_CACHE_SALT} characters")
    tenant = principal.tenant if principal is not None else None
    if tenant is not None:  # a hex digest: the first "/" tells tenant from salt
        salt = f"{tenant}/{salt or ''}"
    return TextRequest(prompt_ids, params, salt, list(images), lora)


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}
