"""Encoders (the encoder engine): embeddings of texts or token ids, and relevance scores of
(query, document) pairs, for the OpenAI embeddings route, /v1/rerank, /v1/score and tensors.

As tensors (KServe V2 infer, msgpack infer) a request is a BYTES input `text` of one or more
texts (and, for a cross-encoder, `text_pair` of as many documents); the answer is `embedding`
FP32 [n, dimensions], or `score` FP32 [n, labels] (the raw logits). Parameters:
`truncate_prompt_tokens`, `prompt_name`.

A text longer than the model takes is a 400 naming the limit, unless `truncate_prompt_tokens`
(a token count, or -1 for the model's limit) asks to cut it, as sentence-transformers does.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ...engine.embedding import EncodeRequest
from ...errors import ClientError, InvalidParameter
from ...tasks import EMBED, EMBEDDING, SCORE
from ..tensors import Tensors
from .base import Caller, Outcome, TensorSignature, Translator, Unsupported

TEXT, TEXT_PAIR = "text", "text_pair"


@dataclass
class PairedRequest(EncodeRequest):
    """Embeddings of distinct texts, to be scored in pairs (indices into the items) by cosine."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
MAX_TEXT_CHARS = 2_000_000  # one input: far past any encoder's context, yet bounded before tokenizing


class EmbeddingTranslator(Translator):
    task = EMBEDDING

    # -- OpenAI-shaped routes ----------------------------------------------------------------

    def embedding_request(self, model, inputs: list, fields: Mapping) -> EncodeRequest:
        spec = model.driver.info.encoder
        if spec.kind != EMBED:
            raise Unsupported(model, "embeddings (it is a cross-encoder: ask /v1/rerank or /v1/score)")
        dimensions = fields.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or not 1 <= dimensions <= spec.dimensions):
            raise InvalidParameter("dimensions", f"must be an integer from 1 to the model's {spec.dimensions}")
        prefix = _prompt(model, fields)
        limit = _truncation(model, fields)
        vocab = model.tokenizer.vocab_size
        items = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                _check_text(item, f"input[{i}]")
                items.append(model.tokenizer.encode_input(prefix + item, truncate_to=limit)[0])
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise InvalidParameter("input", f"input[{i}] holds a token id outside the vocabulary [0, {vocab})")
                items.append(item if limit is None else item[:limit])
        return EncodeRequest(items)

    def score_request(self, model, pairs: list[tuple[str, str]], fields: Mapping) -> EncodeRequest:
        """A cross-encoder's request scores each pair; an embedding model's embeds each distinct text
        once (`PairedRequest`), and a pair's score is the cosine of its two vectors (as vLLM's)."""
        if model.driver.info.encoder.kind == EMBED:
            texts = list(dict.fromkeys(text for pair in pairs for text in pair))
            at = {text: i for i, text in enumerate(texts)}
            request = self.embedding_request(model, texts, fields)
            return PairedRequest(request.items, pairs=[(at[a], at[b]) for a, b in pairs])
        limit = _truncation(model, fields)
        items, types = [], []
        for i, (query, document) in enumerate(pairs):
            _check_text(query, "query")
            _check_text(document, f"documents[{i}]")
            ids, kinds = model.tokenizer.encode_input(query, document, truncate_to=limit)
            items.append(ids)
            types.append(kinds)
        return EncodeRequest(items, types)

    def vectors_of(self, out) -> np.ndarray:
        return out.vectors

    def scores_of(self, request: EncodeRequest, out) -> list[float]:
        """Cosines of the pairs' vectors, or a cross-encoder's sigmoid of its first logit (as
        sentence-transformers' CrossEncoder gives a one-label model's score)."""
        if isinstance(request, PairedRequest):
            unit = unit_rows(out.vectors)
            return [float(unit[a] @ unit[b]) for a, b in request.pairs]
        return [float(s) for s in 1.0 / (1.0 + np.exp(-out.vectors[:, 0].astype(np.float64)))]

    def failure(self, out) -> ClientError:
        return ClientError(out.error, status=out.status)

    def outcome(self, out, aborted: bool) -> Outcome:
        status = "abort" if aborted else "error" if out.error else "finished"
        return Outcome(status, prompt_tokens=out.prompt_tokens)

    # -- tensor form -------------------------------------------------------------------------

    def signature(self, model) -> TensorSignature:
        spec = model.driver.info.encoder
        inputs = [{"name": TEXT, "datatype": "BYTES", "shape": [-1]}]
        if spec.kind == SCORE:
            inputs.append({"name": TEXT_PAIR, "datatype": "BYTES", "shape": [-1]})
        output = "embedding" if spec.kind == EMBED else "score"
        return TensorSignature(inputs, [{"name": output, "datatype": "FP32", "shape": [-1, spec.dimensions]}])

    async def infer_request(self, model, tensors: Tensors, parameters: Mapping, caller: Caller) -> EncodeRequest:
        unknown = set(tensors) - {TEXT, TEXT_PAIR}
        if unknown:
            raise InvalidParameter(sorted(unknown)[0], f"unknown input; the model takes {TEXT}"
                                                       f"{' and ' + TEXT_PAIR if TEXT_PAIR in tensors else ''}")
        texts = _texts(tensors, TEXT)
        if model.driver.info.encoder.kind == SCORE:
            documents = _texts(tensors, TEXT_PAIR)
            if len(documents) != len(texts):
                raise InvalidParameter(TEXT_PAIR, f"must hold as many texts as {TEXT} ({len(texts)})")
            return await asyncio.to_thread(self.score_request, model, list(zip(texts, documents)), parameters)
        return await asyncio.to_thread(self.embedding_request, model, texts, parameters)

    def infer_outputs(self, model, out) -> Tensors:
        name = "embedding" if model.driver.info.encoder.kind == EMBED else "score"
        return {name: out.vectors.astype(np.float32)}

    def infer_extras(self, out) -> dict:
        return {"usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _texts(tensors: Tensors, name: str) -> list[str]:
    array = tensors.get(name)
    if array is None:
        raise InvalidParameter(name, "is required")
    values = array.reshape(-1).tolist()
    if not values or not all(isinstance(v, bytes) for v in values):
        raise InvalidParameter(name, "must hold one or more BYTES elements")
    return [v.decode("utf-8", errors="replace") for v in values]


def _check_text(text, name: str) -> None:
    if not isinstance(text, str) or not text:
        raise InvalidParameter(name, "must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidParameter(name, f"has {len(text)} characters; at most {MAX_TEXT_CHARS} are taken")


def _prompt(model, fields: Mapping) -> str:
    """The sentence-transformers prompt put before each text: `prompt_name`'s, or the model's default."""
    spec = model.driver.info.encoder
    prompts, name = spec.prompts, fields.get("prompt_name")
    if name is None:
        name = spec.default_prompt_name
        return prompts.get(name, "") if name else ""
    if name not in prompts:
        raise InvalidParameter("prompt_name", f"must be one of the model's prompts: {', '.join(prompts) or 'none'}")
    return prompts[name]


def _truncation(model, fields: Mapping) -> int | None:
    """Tokens an input is cut to: None (a longer one is refused by the engine), or the count asked
    for (-1: the model's limit)."""
    value = fields.get("truncate_prompt_tokens")
    if value is None:
        return None
    limit = model.max_model_len
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or 1 <= value <= limit):
        raise InvalidParameter("truncate_prompt_tokens", f"must be -1 (the model's limit) or from 1 to {limit}")
    return limit if value == -1 else value
