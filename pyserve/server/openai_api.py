"""OpenAI-compatible request parsing and response shapes (completions and chat completions)."""

import time
import uuid
from dataclasses import dataclass

from ..engine.llm import RequestOutput, SamplingParams
from ..engine.llm.params import InvalidParameter


class BadRequest(Exception):
    """A client error: HTTP status, message and the offending parameter, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


_TYPES = {
    "model": str, "n": int, "max_tokens": int, "max_completion_tokens": int, "min_tokens": int, "seed": int,
    "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "repetition_penalty": (int, float),
    "stream": bool, "ignore_eos": bool, "logprobs": (bool, int), "top_logprobs": int, "user": str,
    "logit_bias": dict, "stop_token_ids": list,
}


def _get(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:  # absent and explicit null both mean "use the default"
        return default
    expected = _TYPES.get(name)
    if value is not None and expected is not None:
        if isinstance(value, bool) and expected in (int, (int, float)):
            raise BadRequest(400, f"{name} must be a number, got a boolean", name)
        if not isinstance(value, expected):
            raise BadRequest(400, f"{name} has the wrong type ({type(value).__name__})", name)
    return value


def sampling_params(body: dict, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body; errors name the field."""
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise BadRequest(400, "stop must be a string or a list of strings", "stop")
    bias = _get(body, "logit_bias") or {}
    try:
        bias = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise BadRequest(400, "logit_bias must map token ids to numbers", "logit_bias") from None
    if chat:
        logprobs = _get(body, "top_logprobs") if _get(body, "logprobs") else None
        if _get(body, "logprobs") and logprobs is None:
            logprobs = 0
    else:
        logprobs = _get(body, "logprobs")
        if isinstance(logprobs, bool):
            raise BadRequest(400, "logprobs must be an integer for completions", "logprobs")
    max_tokens = _get(body, "max_completion_tokens") if chat and "max_completion_tokens" in body else \
        _get(body, "max_tokens", 16 if not chat else None)
    params = SamplingParams(
        n=_get(body, "n", 1), max_tokens=max_tokens, min_tokens=_get(body, "min_tokens", 0),
        stop=stop, stop_token_ids=_get(body, "stop_token_ids") or [], ignore_eos=_get(body, "ignore_eos", False),
        seed=_get(body, "seed"), temperature=_get(body, "temperature"), top_k=_get(body, "top_k"),
        top_p=_get(body, "top_p"), min_p=_get(body, "min_p"), repetition_penalty=_get(body, "repetition_penalty"),
        presence_penalty=_get(body, "presence_penalty", 0.0), frequency_penalty=_get(body, "frequency_penalty", 0.0),
        logit_bias=bias, logprobs=logprobs)
    try:
        params.validate()
    except InvalidParameter as exc:
        raise BadRequest(400, str(exc), exc.field) from None
    return params


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def usage_of(out: RequestOutput) -> Usage:
    return Usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, out: RequestOutput, tokenizer) -> dict:
    choices = []
    for o in out.outputs:
        choice = {"index": o.index, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None}
        if o.logprobs is not None:
            choice["logprobs"] = {
                "tokens": [tokenizer.decode([e["token_id"]], False) for e in o.logprobs],
                "token_logprobs": [e["logprob"] for e in o.logprobs],
                "top_logprobs": [{tokenizer.decode([t], False): lp for t, lp in e["top"].items()} for e in o.logprobs],
                "text_offset": []}
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_of(out).body()}


def chat_logprobs(entries: list[dict], tokenizer) -> dict:
    def item(token_id, logprob):
        text = tokenizer.decode([token_id], False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e["top"].items()]} for e in entries]}


def chat_body(rid: str, model: str, out: RequestOutput, tokenizer) -> dict:
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "logprobs": chat_logprobs(o.logprobs, tokenizer) if o.logprobs is not None else None}
               for o in out.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_of(out).body()}
