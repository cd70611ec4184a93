"""Per-request sampling parameters, as the OpenAI and vLLM APIs name them."""

from dataclasses import dataclass, field, fields


class InvalidParameter(ValueError):
    """A request parameter is out of range; the message names it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.field = name


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
    skip_special_tokens: bool = True

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
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("temperature", self.temperature is None or self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k is None or self.top_k >= -1, "must be -1, 0 (off) or positive"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParameter(name, message)
        if vocab_size is not None:
            for token in list(self.logit_bias) + list(self.stop_token_ids):
                if not 0 <= int(token) < vocab_size:
                    raise InvalidParameter("logit_bias" if token in self.logit_bias else "stop_token_ids",
                                           f"token id {token} is outside the vocabulary [0, {vocab_size})")
