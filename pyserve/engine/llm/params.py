"""Per-request sampling parameters, as the OpenAI and vLLM APIs name them."""

import math
from dataclasses import dataclass, field, fields

from ...errors import InvalidParameter
from ...kernels.rng import SEED_RANGE
from .structured import StructuredOutput

# Bounds that keep one request from costing the server unbounded work or overflowing a kernel's
# 32-bit parameters; each is named in the error that enforces it.
MAX_N = 128
MAX_TOKENS = 2**31 - 1
MAX_TOP_K = 2**31 - 1
MAX_LOGIT_BIAS = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    # None means: the model's generation_config.json, else the usual default.
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (each given the ones before it) and this many
    # alternatives; the first token has none.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None

    _DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}

    def resolved(self, model_defaults: dict) -> "SamplingParams":
        """A copy with unset fields taken from the model's defaults, then validated."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, default in self._DEFAULTS.items():
            if values[name] is None:
                values[name] = model_defaults.get(name, default)
        if values["max_tokens"] is None and "max_new_tokens" in model_defaults:
            values["max_tokens"] = model_defaults["max_new_tokens"]
        if isinstance(values["stop"], str):
            values["stop"] = [values["stop"]]
        values["stop"] = list(values["stop"] or [])
        out = SamplingParams(**values)
        out.validate()
        return out

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidParameter naming the first field that is out of range."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidParameter(name, "must be a finite number")
        checks = [
            ("n", 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}]"),
            ("max_tokens", self.max_tokens is None or 0 <= self.max_tokens <= MAX_TOKENS,
             f"must be in [0, {MAX_TOKENS}]"),
            ("min_tokens", 0 <= self.min_tokens <= MAX_TOKENS, f"must be in [0, {MAX_TOKENS}]"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("temperature", self.temperature is None or self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k is None or -1 <= self.top_k <= MAX_TOP_K, "must be -1, 0 (off) or positive"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed < SEED_RANGE[1], "must fit in 64 bits"),
            ("logit_bias", len(self.logit_bias) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries"),
            ("logit_bias", all(math.isfinite(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
             "values must be finite numbers in [-100, 100]"),
            ("stop", self.stop is None or isinstance(self.stop, str) or len(self.stop) <= MAX_STOP_STRINGS,
             f"at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(0 < len(s) <= MAX_STOP_LENGTH for s in _strings(self.stop)),
             f"each stop string must have 1 to {MAX_STOP_LENGTH} characters"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} ids"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParameter(name, message)
        if vocab_size is not None:
            for token in list(self.logit_bias) + list(self.stop_token_ids):
                if not 0 <= int(token) < vocab_size:
                    raise InvalidParameter("logit_bias" if token in self.logit_bias else "stop_token_ids",
                                           f"token id {token} is outside the vocabulary [0, {vocab_size})")


def _strings(stop: list[str] | str | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])
