"""Structured output: the grammar a request's text must match, and the per-step masks of the
tokens that keep it matching.

llguidance does the parsing. It was chosen over xgrammar because it has no run-time dependencies
(xgrammar needs transformers and a pinned torch) and compiles a grammar in about a millisecond,
so a request pays nothing up front; `bench/structured.py` compares their mask times here.

Example:
    compiler = GrammarCompiler(tokenizer, vocab_size=32000)
    matcher = compiler.matcher(StructuredOutput(regex="[0-9]+"))
    masks = MaskFiller(vocab_size=32000)
    bits = masks.start([matcher]).result()   # [1, 1000] int32: digits only (kernels.sample's allowed_bits)
"""

import concurrent.futures
import functools
import json
import time
from dataclasses import dataclass

import llguidance
import llguidance.gbnf_to_lark
import torch

from ...errors import InvalidParameter
from ...tokenizer import Tokenizer

# A regex or grammar larger than this is refused before compiling: llguidance's GBNF-to-Lark
# conversion is Python, holding the GIL (0.7 s for 600 KB, 0.1 s at this limit).
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_CHOICES = 1024
# JSON as json.dumps writes it: no free whitespace, which a weak model would otherwise fill forever.
# A schema may still ask for more through llguidance's "x-guidance" options.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match: exactly one of the constraints, as vLLM names them.

    `grammar` is Lark (llguidance's dialect, which also embeds JSON schemas as `%json{...}`) or
    GBNF/EBNF (`root ::= ...`). `field` is the request field that errors name.
    """

    json: dict | None = None  # a JSON schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    field: str = "structured_output"

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (not yet checked)."""
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise InvalidParameter(self.field, f"give exactly one constraint, got {given or 'none'}")
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise InvalidParameter(self.field, "the JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(_text(self.regex, self.field))
        if self.choice is not None:
            if not 0 < len(self.choice) <= MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParameter(self.field, f"choices must be 1 to {MAX_CHOICES} non-empty strings")
            # JSON string literals are Lark string literals: every character arrives escaped.
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        lark = llguidance.gbnf_to_lark.any_to_lark(_text(self.grammar, self.field))
        return llguidance.LLMatcher.grammar_from_lark(lark)


def _text(value, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidParameter(field, "must be a non-empty string")
    if len(value) > MAX_GRAMMAR_CHARS:
        raise InvalidParameter(field, f"longer than {MAX_GRAMMAR_CHARS} characters")
    return value


class GrammarCompiler:
    """Checks constraints against one model's vocabulary and makes a matcher per sequence."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(tokenizer.eos_token_ids) or None)
        self._checked = functools.lru_cache(maxsize=64)(self._check)

    def _check(self, grammar: str) -> str:
        return llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the output; InvalidParameter naming spec.field when the
        schema or grammar is invalid or unsupported."""
        try:
            grammar = spec.grammar_text()
        except InvalidParameter:
            raise
        except Exception as exc:  # noqa: BLE001 - llguidance's converters raise plain exceptions on bad input
            raise InvalidParameter(spec.field, f"invalid or unsupported: {exc}") from None
        error = self._checked(grammar)
        if error:
            raise InvalidParameter(spec.field, f"invalid or unsupported: {error.strip().splitlines()[0]}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParameter(spec.field, matcher.get_error().strip().splitlines()[0])
        return matcher


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed a sampled token to its matcher; True once the grammar is complete (nothing may follow
    but the end). A token the mask did not allow puts the matcher in error: a RuntimeError."""
    if not matcher.consume_token(token):
        raise RuntimeError(f"structured output: {matcher.get_error().strip().splitlines()[0]}")
    return matcher.is_stopped()


class MaskFiller:
    """Fills the allowed-token masks of a step's constrained rows in a worker thread, so that the
    work overlaps the model's forward pass (llguidance releases the GIL and spreads rows over its
    own threads)."""

    def __init__(self, vocab_size: int):
        self.words = (vocab_size + 31) // 32
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pyserve-masks")
        self._executor: llguidance.LLExecutor | None = None
        self.stats = MaskStats()

    def start(self, matchers: list[llguidance.LLMatcher]) -> concurrent.futures.Future:
        """Future of (bits [M, words] int32, one row per matcher in order)."""
        return self._pool.submit(self._fill, matchers)

    def _fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        start = time.perf_counter()
        bits = torch.empty(len(matchers), self.words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                               self.words * 4, len(matchers))
        self.stats.steps += 1
        self.stats.rows += len(matchers)
        self.stats.fill_seconds += time.perf_counter() - start
        return bits

    def wait(self, future: concurrent.futures.Future) -> torch.Tensor:
        """The masks of `start`, counting the time the caller had to wait for them."""
        start = time.perf_counter()
        bits = future.result()
        self.stats.wait_seconds += time.perf_counter() - start
        return bits


@dataclass
class MaskStats:
    """Where structured output's time goes: filling masks (in the worker) and waiting for them
    (the part the forward pass did not hide)."""

    steps: int = 0
    rows: int = 0
    fill_seconds: float = 0.0
    wait_seconds: float = 0.0
