"""Encoder routes: POST /v1/embeddings (OpenAI's shape), POST /v1/rerank (Cohere's and Jina's;
also /v2/rerank) and POST /v1/score (vLLM's). The model's translator tokenizes (off the event
loop) and reads the answer; a client that leaves aborts its request.

Example (with an embedding model served as "minilm"):
    >>> client.embeddings.create(model="minilm", input=["a", "b"], dimensions=64)       # doctest: +SKIP
    >>> httpx.post(url + "/v1/rerank", json={"model": "reranker", "query": "q",         # doctest: +SKIP
    ...                                     "documents": ["d1", "d2"], "top_n": 1})
"""

import asyncio
import base64
import time
import uuid

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidParameter
from . import translators
from .models import ServedModel
from .translators.embedding import unit_rows
from .responses import json_body, unless_client_leaves

ENCODING_FORMATS = ("float", "base64")


async def embeddings(request: Request) -> Response:
    body = await json_body(request)
    model = request.app.state.models.get(body.get("model"))
    inputs = _inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidParameter("encoding_format", f"must be one of {', '.join(ENCODING_FORMATS)}")
    dimensions = body.get("dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidParameter("user", "must be a string")
    translator = translators.for_model(model)
    engine_request = await asyncio.to_thread(translator.embedding_request, model, inputs, body)
    out = await _run(request, model, translator, engine_request)
    vectors = translator.vectors_of(out)
    if dimensions is not None:  # Matryoshka: the leading dimensions, unit length again
        vectors = unit_rows(vectors[:, :dimensions])
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64"
             else v.astype(np.float32).tolist()} for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": model.name,
                         "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}})


async def rerank(request: Request) -> Response:
    body = await json_body(request)
    model = request.app.state.models.get(body.get("model"))
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidParameter("query", "must be a non-empty string")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise InvalidParameter("documents", "must be a non-empty list of strings (or {\"text\": ...} objects)")
    texts = [d.get("text") if isinstance(d, dict) else d for d in documents]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidParameter("documents", f"documents[{i}] must be a string or an object with a string text")
    top_n = body.get("top_n", len(texts))
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
        raise InvalidParameter("top_n", "must be a positive integer")
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise InvalidParameter("return_documents", "must be true or false")
    scores, tokens = await _scores(request, model, [(query, text) for text in texts], body)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": texts[i]}} if return_documents
                                                              else {})} for i in order]
    return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": model.name, "results": results,
                         "usage": {"total_tokens": tokens}, "meta": {"billed_units": {"search_units": 1}}})


async def score(request: Request) -> Response:
    body = await json_body(request)
    model = request.app.state.models.get(body.get("model"))
    first, second = (_side(body.get(name), name) for name in ("text_1", "text_2"))
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise InvalidParameter("text_2", f"must hold as many texts as text_1 ({len(first)}), or text_1 one text")
    scores, tokens = await _scores(request, model, list(zip(first, second)), body)
    return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": model.name,
                         "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _scores(request: Request, model: ServedModel, pairs: list[tuple[str, str]], body) -> tuple[list[float], int]:
    translator = translators.for_model(model)
    engine_request = await asyncio.to_thread(translator.score_request, model, pairs, body)
    out = await _run(request, model, translator, engine_request)
    return translator.scores_of(engine_request, out), out.prompt_tokens


async def _run(request: Request, model: ServedModel, translator, engine_request):
    out = await unless_client_leaves(request, model.final_output(engine_request))
    if out.error:
        raise translator.failure(out)
    return out


def _inputs(value) -> list:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
               for v in value):
            return value
    raise InvalidParameter("input", "must be a non-empty string, a list of strings, a list of token ids or a list "
                                    "of token-id lists")


def _side(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise InvalidParameter(name, "must be a string or a non-empty list of strings")


routes = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/rerank", rerank, methods=["POST"]),
    Route("/v2/rerank", rerank, methods=["POST"]),
    Route("/v1/score", score, methods=["POST"]),
]
