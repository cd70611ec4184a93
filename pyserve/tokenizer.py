"""Tokenizers from Hugging Face model directories: `tokenizer.json` through `tokenizers`, special
tokens from `tokenizer_config.json`, the chat template (rendered with jinja2), generation
defaults from `generation_config.json`; and incremental detokenisation for streaming."""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    generation_defaults: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        backend = HFTokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        gen = _read_json(model_dir / "generation_config.json")
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_ids = gen.get("eos_token_id", _read_json(model_dir / "config.json").get("eos_token_id"))
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        if not eos_ids and eos is not None and backend.token_to_id(eos) is not None:
            eos_ids = [backend.token_to_id(eos)]
        template = _chat_template(model_dir, cfg)
        defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                        "max_new_tokens") if k in gen}
        if gen.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return cls(backend, bos, eos, eos_ids, template, defaults)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it), so a long prompt
        # tokenized in a worker thread never stalls the server's event loop.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """The longest vocabulary entry: a text longer than this times N has more than N tokens."""
        return max((len(piece) for piece in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode_input(self, text: str, pair: str | None = None,
                     truncate_to: int | None = None) -> tuple[list[int], list[int]]:
        """An encoder's input: token ids of a text (or of a pair: a cross-encoder's query and
        document) with the tokenizer's special tokens, and each token's type (0: first text, 1:
        the pair's second). `truncate_to` cuts the text (of a pair, the longer text a token at a
        time) so the whole fits in that many tokens, special tokens kept, as transformers'
        default truncation does."""
        first = self.backend.encode(text, add_special_tokens=False)
        second = None if pair is None else self.backend.encode(pair, add_special_tokens=False)
        if truncate_to is not None:
            room = max(1 if second is None else 2, truncate_to - self.backend.num_special_tokens_to_add(pair is not None))
            if second is None:
                if len(first.ids) > room:
                    first.truncate(room)
            else:  # transformers' longest_first: a token off the longer text until both fit
                keep_first, keep_second = len(first.ids), len(second.ids)
                while keep_first + keep_second > room:
                    if keep_first >= keep_second:
                        keep_first -= 1
                    else:
                        keep_second -= 1
                first.truncate(keep_first)
                second.truncate(keep_second)
        encoding = self.backend.post_process(first, second)
        return encoding.ids, encoding.type_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation ready for the assistant's reply. The template writes the
        special tokens itself, so encoding must not add them again."""
        text = self.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json 'chat_template')")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        # As transformers renders templates: plain JSON (jinja's own tojson escapes <, > and & for HTML).
        env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, separators=None, sort_keys=False: \
            json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _chat_template(model_dir: Path, cfg: dict) -> str | None:
    """The chat template, looked for where transformers looks: chat_template.jinja, then
    chat_template.json, then tokenizer_config.json (named templates: "default")."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = _read_json(model_dir / "chat_template.json").get("chat_template") or cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece.

    Decoding a window that starts a few tokens back keeps merges across token boundaries
    (spaces, byte-level pieces) right; text ending in U+FFFD waits, since the next token may
    complete a multi-byte character, but never for more than a character's four bytes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # context for the first output tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append a token; return the new text it completes (possibly '')."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        incomplete = full.endswith("\ufffd") and len(self.ids) - self.read_offset < 4
        if len(full) > len(prefix) and not incomplete:
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += new
            return new
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), once no token follows."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        rest = full[len(prefix):]
        self.text += rest
        return rest
