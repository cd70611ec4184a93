"""Vector stores at work: files indexed in the background (text, chunks, embeddings by the
store's served embedding model), and hybrid search: the query's nearest chunks by vector and its
best chunks by BM25, fused by reciprocal rank, then reordered by the store's reranker when it
has one. Records and indexes live in the data directory (`pyserve.store.vector_stores`), so a
restart finds them; files that were being indexed are indexed again.
"""

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ClientError, InvalidParameter
from ..store import DataDir, VectorStore, VectorStoreFile
from ..store import documents, ranking
from ..tasks import EMBED, SCORE
from . import translators
from .models import ModelRegistry, ServedModel
from .translators.embedding import unit_rows

log = logging.getLogger("pyserve.retrieval")

AUTO_CHUNK_TOKENS, AUTO_OVERLAP_TOKENS = 800, 400  # OpenAI's auto strategy, cut to the model's limit
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 100, 4096
EMBED_BATCH = 256  # chunks in one engine request
CANDIDATES = 100  # each ranking's depth before fusion
RERANK_DEPTH = 20  # fused results a reranker reorders
RANKERS = ("auto", "default-2024-11-15", "hybrid", "dense", "keyword")
MAX_RESULTS = 50
GROUNDING_RESULTS = 5  # sources a grounded chat puts in its prompt unless asked for another number


@dataclass
class SearchResult:
    chunk_id: int
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict

    def body(self) -> dict:
        return {"file_id": self.file_id, "filename": self.filename, "score": self.score,
                "attributes": self.attributes, "content": [{"type": "text", "text": self.text}]}


class Retrieval:
    def __init__(self, data: DataDir, models: ModelRegistry):
        self.data, self.models = data, models
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Index again the files a stopped server was indexing."""
        for record in await asyncio.to_thread(self.data.vector_stores.in_progress):
            store = await asyncio.to_thread(self.data.vector_stores.get_any, record.store_id)
            if store is not None:
                self._schedule(store, record)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- models

    def embedder(self, name) -> ServedModel:
        """The store's embedding model: `name`, or the only embedding model served."""
        if name is None:
            served = [m for m in self.models if m.driver.info.encoder is not None
                      and m.driver.info.encoder.kind == EMBED]
            if len(served) != 1:
                raise InvalidParameter("embedding_model", "name the served embedding model that indexes this store"
                                       if served else "no embedding model is served: a vector store needs one")
            return served[0]
        return self._encoder(name, EMBED, "embedding_model")

    def reranker(self, name) -> ServedModel | None:
        return None if name is None else self._encoder(name, SCORE, "reranker")

    def _encoder(self, name, kind: str, field: str) -> ServedModel:
        if not isinstance(name, str) or name not in self.models.names():
            raise InvalidParameter(field, f"must name a served model; served: {', '.join(self.models.names())}")
        model = self.models.get(name)
        spec = model.driver.info.encoder
        if spec is None or spec.kind != kind:
            raise InvalidParameter(field, f"{name!r} is not {'an embedding model' if kind == EMBED else 'a cross-encoder'}")
        return model

    def chunking(self, value, model: ServedModel) -> dict:
        """A file's chunking strategy, checked against the embedding model's input limit."""
        limit = model.max_model_len - model.tokenizer.backend.num_special_tokens_to_add(False)
        if value is None or value == {"type": "auto"}:
            size = min(AUTO_CHUNK_TOKENS, limit)
            return {"type": "static", "static": {"max_chunk_size_tokens": size,
                                                 "chunk_overlap_tokens": min(AUTO_OVERLAP_TOKENS, size // 2)}}
        static = value.get("static") if isinstance(value, dict) and value.get("type") == "static" else None
        if not isinstance(static, dict):
            raise InvalidParameter("chunking_strategy", 'must be {"type": "auto"} or {"type": "static", "static": '
                                                        '{"max_chunk_size_tokens", "chunk_overlap_tokens"}}')
        size, overlap = static.get("max_chunk_size_tokens"), static.get("chunk_overlap_tokens", 0)
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_CHUNK_TOKENS <= size <= MAX_CHUNK_TOKENS:
            raise InvalidParameter("chunking_strategy.static.max_chunk_size_tokens",
                                   f"must be an integer from {MIN_CHUNK_TOKENS} to {MAX_CHUNK_TOKENS}")
        if size > limit:
            raise InvalidParameter("chunking_strategy.static.max_chunk_size_tokens",
                                   f"is {size}; the store's embedding model {model.name!r} takes at most {limit}")
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= size // 2:
            raise InvalidParameter("chunking_strategy.static.chunk_overlap_tokens",
                                   f"must be an integer from 0 to half the chunk size ({size // 2})")
        return {"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}}

    # -- indexing

    def attach(self, store: VectorStore, record: VectorStoreFile) -> None:
        self._schedule(store, record)

    def _schedule(self, store: VectorStore, record: VectorStoreFile) -> None:
        task = asyncio.create_task(self._index(store, record), name=f"pyserve-index-{record.file_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _index(self, store: VectorStore, record: VectorStoreFile) -> None:
        stores = self.data.vector_stores
        try:
            upload = await asyncio.to_thread(self.data.files.get, record.file_id, store.tenant)
            content = await asyncio.to_thread(self.data.files.content, record.file_id, store.tenant)
            text = await asyncio.to_thread(documents.text_of, upload.filename, content)
            model = self.embedder(store.embedding_model)
            static = record.chunking["static"]
            pieces = await asyncio.to_thread(documents.chunks, model.tokenizer, text, static["max_chunk_size_tokens"],
                                             static["chunk_overlap_tokens"])
            texts = [t for t, _ in pieces]
            vectors = await self.embed(model, texts, "document")
            await asyncio.to_thread(stores.add_chunks, store.id, record.file_id, texts, [n for _, n in pieces], vectors)
            record.status, record.usage_bytes = "completed", sum(len(t.encode()) for t in texts)
        except asyncio.CancelledError:
            raise  # the server stops: the record stays in progress and is indexed again at the next start
        except ClientError as exc:
            record.status, record.last_error = "failed", {"code": "invalid_file", "message": exc.message}
        except Exception as exc:  # noqa: BLE001 - one file's failure is its own
            log.exception("indexing %s into %s failed", record.file_id, store.id)
            record.status, record.last_error = "failed", {"code": "server_error", "message": f"{type(exc).__name__}"}
        await asyncio.to_thread(stores.save_file, record)

    async def embed(self, model: ServedModel, texts: list[str], prompt: str) -> np.ndarray:
        """Unit vectors of texts (cut to the model's limit), with the model's `prompt` prompt if it has one."""
        translator = translators.for_model(model)
        fields = {"truncate_prompt_tokens": -1}
        if prompt in model.driver.info.encoder.prompts:
            fields["prompt_name"] = prompt
        parts = []
        for start in range(0, len(texts), EMBED_BATCH):
            request = await asyncio.to_thread(translator.embedding_request, model, texts[start:start + EMBED_BATCH],
                                              fields)
            out = await model.final_output(request)
            if out.error:
                raise translator.failure(out)
            parts.append(translator.vectors_of(out))
        vectors = np.concatenate(parts) if parts else np.zeros((0, model.driver.info.encoder.dimensions), np.float32)
        return unit_rows(vectors)

    # -- search

    async def search(self, store: VectorStore, query: str, max_results: int = 10, filters: dict | None = None,
                     ranker: str = "auto", score_threshold: float = 0.0) -> list[SearchResult]:
        stores = self.data.vector_stores
        rankings = []
        if ranker != "keyword":
            vector = (await self.embed(self.embedder(store.embedding_model), [query], "query"))[0]
            rankings.append([i for i, _ in await asyncio.to_thread(stores.index(store.id).search, vector, CANDIDATES)])
        if ranker not in ("dense",):
            rankings.append(await asyncio.to_thread(stores.keyword_search, store.id, query, CANDIDATES))
        fused = ranking.fuse(rankings)
        files = {f.file_id: f for f in await asyncio.to_thread(stores.files, store.id, "completed")}
        chunks = await asyncio.to_thread(stores.chunks, [i for i, _ in fused])
        names = {}
        results = []
        for chunk_id, score in fused:
            chunk = chunks.get(chunk_id)
            record = files.get(chunk.file_id) if chunk is not None else None
            if record is None or (filters is not None and not ranking.matches(record.attributes, filters)):
                continue
            if chunk.file_id not in names:
                names[chunk.file_id] = (await asyncio.to_thread(self.data.files.get, chunk.file_id, store.tenant)).filename
            results.append(SearchResult(chunk_id, chunk.file_id, names[chunk.file_id], score, chunk.text,
                                        record.attributes))
        reranker = self.reranker(store.reranker)
        if reranker is not None and results:
            results = await self._rerank(reranker, query, results[:max(RERANK_DEPTH, max_results)])
        return [r for r in results if r.score >= score_threshold][:max_results]

    async def _rerank(self, model: ServedModel, query: str, results: list[SearchResult]) -> list[SearchResult]:
        translator = translators.for_model(model)
        request = await asyncio.to_thread(translator.score_request, model, [(query, r.text) for r in results],
                                          {"truncate_prompt_tokens": -1})
        out = await model.final_output(request)
        if out.error:
            raise translator.failure(out)
        for result, score in zip(results, translator.scores_of(request, out)):
            result.score = score
        return sorted(results, key=lambda r: -r.score)

    # -- grounded chat

    async def ground(self, tenant: str | None, spec, messages: list[dict]) -> tuple[list[dict], list[SearchResult]]:
        """A chat's messages with the sources found for its last user turn put before that turn's
        text, and the sources: `spec` is the chat's `retrieval` ({"vector_store_ids": [...],
        "max_num_results": k, and search's "filters" and "ranking_options"})."""
        if not isinstance(spec, dict) or not isinstance(spec.get("vector_store_ids"), list) \
                or not spec["vector_store_ids"] or not all(isinstance(i, str) for i in spec["vector_store_ids"]):
            raise InvalidParameter("retrieval.vector_store_ids", "must be a non-empty list of vector store ids")
        options = search_options({"max_num_results": GROUNDING_RESULTS, **spec}, "retrieval.")
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        if last is None or not isinstance(messages[last].get("content"), str) or not messages[last]["content"].strip():
            raise InvalidParameter("messages", "a grounded chat needs a user turn with text to search for")
        question = messages[last]["content"]
        found = []
        for store_id in dict.fromkeys(spec["vector_store_ids"]):
            try:
                store = await asyncio.to_thread(self.data.vector_stores.get, store_id, tenant)
            except ClientError:
                raise InvalidParameter("retrieval.vector_store_ids", f"no vector store has id {store_id!r}") from None
            found += await self.search(store, question, **options)
        sources = sorted(found, key=lambda r: -r.score)[:options["max_results"]]
        if not sources:
            return messages, []
        context = "\n\n".join(f"[{n}] {r.filename}: {r.text}" for n, r in enumerate(sources, start=1))
        grounded = dict(messages[last], content=f"Sources:\n{context}\n\nAnswer from the sources above.\n\n{question}")
        return messages[:last] + [grounded] + messages[last + 1:], sources


def search_options(body: dict, prefix: str = "") -> dict:
    """`Retrieval.search`'s keyword arguments from a request's fields (OpenAI names), checked;
    `prefix` is where the fields sit in the request, for the errors."""
    max_results = body.get("max_num_results", 10)
    if not isinstance(max_results, int) or isinstance(max_results, bool) or not 1 <= max_results <= MAX_RESULTS:
        raise InvalidParameter(f"{prefix}max_num_results", f"must be an integer from 1 to {MAX_RESULTS}")
    filters = body.get("filters")
    if filters is not None:
        ranking.check_filter(filters)
    options = body.get("ranking_options") or {}
    if not isinstance(options, dict):
        raise InvalidParameter(f"{prefix}ranking_options", "must be an object")
    ranker = options.get("ranker", "auto")
    if ranker not in RANKERS:
        raise InvalidParameter(f"{prefix}ranking_options.ranker", f"must be one of {', '.join(RANKERS)}")
    threshold = options.get("score_threshold", 0.0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise InvalidParameter(f"{prefix}ranking_options.score_threshold", "must be a number from 0 to 1")
    return {"max_results": max_results, "filters": filters, "ranker": ranker, "score_threshold": float(threshold)}
