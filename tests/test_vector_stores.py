"""Vector stores through the `openai` SDK: files of every kind (text, Markdown, HTML, PDF) are
chunked as asked and indexed in the background; search fuses the nearest chunks by vector with
BM25's, honours attribute filters and the score threshold, and a reranker reorders; stores,
chunks and indexes outlive a restart; bad input is a 4xx naming the field, and nothing is half
made."""

import io
import json
import time

import numpy as np
import openai
import pytest

from conftest import cli_server
from pyserve.store import ranking
from tiny_models import make_encoder, make_sentence_transformer

FOX = "The quick brown fox jumps over the lazy dog. " * 40
HELLO = "Hello world, hello pyserve! Once upon a time there was a tiny model."


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF whose page shows `text` (written here: no PDF library needed to make one)."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from pyserve.engine import EngineDriver, load_engine
    from pyserve.server import start_in_thread
    from pyserve.server.config import ServerConfig
    root = tmp_path_factory.mktemp("retrieval")
    embedder = make_sentence_transformer(root / "st", "bert", pooling="mean", normalize=True)
    scorer = make_encoder(root / "ce", "bert", scorer=True)
    config = ServerConfig(port=0, msgpack_port=0, log_level="warning", data_dir=str(root / "data"))
    server = start_in_thread({"embedder": EngineDriver(load_engine(embedder, device="cpu")),
                              "reranker": EngineDriver(load_engine(scorer, device="cpu"))}, config)
    try:
        yield server, embedder, scorer
    finally:
        server.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


def upload(client, name: str, data: bytes, purpose: str = "assistants") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose).id


def indexed(client, store_id: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while (store := client.vector_stores.retrieve(store_id)).file_counts.in_progress:
        assert time.monotonic() < deadline, "indexing never ended"
        time.sleep(0.05)
    return store


def test_files_of_every_kind_are_chunked_indexed_and_found(served, client):
    from pyserve.tokenizer import Tokenizer
    files = {"fox.txt": FOX.encode(), "hello.md": f"# Greeting\n\n{HELLO}".encode(),
             "page.html": b"<html><head><style>p{}</style></head><body><p>A cafe in Tokyo.</p>"
                          b"<script>alert(1)</script></body></html>", "doc.pdf": tiny_pdf("Emoji and naive text")}
    ids = {name: upload(client, name, data, "user_data" if name.endswith(".md") else "assistants")
           for name, data in files.items()}
    store = client.vector_stores.create(name="docs", file_ids=[ids["fox.txt"], ids["hello.md"]],
                                        chunking_strategy={"type": "static", "static": {
                                            "max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20}})
    client.vector_stores.files.create(store.id, file_id=ids["page.html"], attributes={"kind": "web", "year": 2024})
    client.vector_stores.files.create(store.id, file_id=ids["doc.pdf"], attributes={"kind": "pdf", "year": 2019})
    store = indexed(client, store.id)
    assert (store.file_counts.completed, store.file_counts.failed, store.status) == (4, 0, "completed")
    assert store.usage_bytes > len(FOX)  # overlapping chunks hold some text twice

    fox_chunks = client.vector_stores.files.content(file_id=ids["fox.txt"], vector_store_id=store.id).data
    tokenizer = Tokenizer.from_dir(served[1])
    counts = [len(tokenizer.encode_input(c.text)[0]) - 2 for c in fox_chunks]
    assert max(counts) <= 100 and len(fox_chunks) == -(-(len(tokenizer.encode_input(FOX)[0]) - 2 - 100) // 80) + 1
    assert fox_chunks[1].text[:30] in fox_chunks[0].text  # 20 tokens of overlap
    html = client.vector_stores.files.content(file_id=ids["page.html"], vector_store_id=store.id).data
    assert [c.text for c in html] == ["A cafe in Tokyo."]  # no script, no style
    pdf = client.vector_stores.files.content(file_id=ids["doc.pdf"], vector_store_id=store.id).data
    assert "Emoji and naive text" in pdf[0].text

    found = client.vector_stores.search(store.id, query="hello pyserve", max_num_results=3)
    assert found.data[0].filename == "hello.md" and found.data[0].score > 0.95
    assert len(found.data) == 3 and found.data[0].score >= found.data[1].score >= found.data[2].score
    web = client.vector_stores.search(store.id, query="fox", filters={"type": "eq", "key": "kind", "value": "web"})
    assert [r.filename for r in web.data] == ["page.html"]
    recent = client.vector_stores.search(store.id, query="text", filters={
        "type": "and", "filters": [{"type": "gte", "key": "year", "value": 2020}, {"type": "ne", "key": "kind",
                                                                                   "value": "pdf"}]})
    assert {r.filename for r in recent.data} == {"page.html"}
    between = (found.data[0].score + found.data[1].score) / 2
    strict = client.vector_stores.search(store.id, query="hello pyserve", ranking_options={"score_threshold": between})
    assert [r.filename for r in strict.data] == ["hello.md"]

    client.vector_stores.files.delete(file_id=ids["hello.md"], vector_store_id=store.id)
    assert "hello.md" not in {r.filename for r in client.vector_stores.search(store.id, query="hello pyserve").data}
    assert client.vector_stores.retrieve(store.id).file_counts.total == 3
    assert client.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_the_dense_and_keyword_rankings_are_fused_by_reciprocal_rank():
    fused = ranking.fuse([[1, 2, 3], [3, 1, 4]])
    assert [item for item, _ in fused] == [1, 3, 2, 4] and fused[0][1] == pytest.approx((1 / 61 + 1 / 62) / (2 / 61))
    assert ranking.fuse([[7], [7]])[0] == (7, pytest.approx(1.0))


def test_a_reranker_orders_by_the_cross_encoders_scores(served, client):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    _, _, scorer = served
    docs = ["hello world", "the lazy dog", "once upon a time", "a tiny model", "cafe"]
    ids = [upload(client, f"{i}.txt", d.encode()) for i, d in enumerate(docs)]
    store = indexed(client, client.vector_stores.create(name="ranked", file_ids=ids,
                                                                 extra_body={"reranker": "reranker"}).id)
    found = client.vector_stores.search(store.id, query="hello pyserve", max_num_results=5)
    tokenizer = AutoTokenizer.from_pretrained(str(scorer))
    batch = tokenizer(["hello pyserve"] * len(docs), docs, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch.sigmoid(AutoModelForSequenceClassification.from_pretrained(str(scorer)).eval()(**batch)
                             .logits[:, 0]).numpy()
    got = {r.content[0].text: r.score for r in found.data}
    np.testing.assert_allclose([got[d] for d in docs], want, atol=1e-5)
    assert [r.content[0].text for r in found.data] == [docs[i] for i in np.argsort(-want)]


@pytest.mark.parametrize("call, field, status", [
    (lambda c, f: c.vector_stores.create(name="x", extra_body={"embedding_model": "reranker"}), "embedding_model", 400),
    (lambda c, f: c.vector_stores.create(name="x", extra_body={"embedding_model": "nope"}), "embedding_model", 400),
    (lambda c, f: c.vector_stores.create(name="x", extra_body={"reranker": "embedder"}), "reranker", 400),
    (lambda c, f: c.vector_stores.create(name="x", file_ids=["file-nope"]), "file_id", 400),
    (lambda c, f: c.vector_stores.create(name="x", file_ids=[f["tune"]]), "file_id", 400),
    (lambda c, f: c.vector_stores.create(name="x", chunking_strategy={"type": "static", "static": {
        "max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}}), "chunking_strategy.static.max_chunk_size_tokens",
     400),
    (lambda c, f: c.vector_stores.create(name="x", chunking_strategy={"type": "static", "static": {
        "max_chunk_size_tokens": 100, "chunk_overlap_tokens": 80}}), "chunking_strategy.static.chunk_overlap_tokens",
     400),
    (lambda c, f: c.vector_stores.create(name="x", chunking_strategy={"type": "static", "static": {
        "max_chunk_size_tokens": 4000, "chunk_overlap_tokens": 0}}), "chunking_strategy.static.max_chunk_size_tokens",
     400),
    (lambda c, f: c.vector_stores.search("vs_nope", query="q"), "vector_store_id", 404),
    (lambda c, f: c.vector_stores.search(f["store"], query=""), "query", 400),
    (lambda c, f: c.vector_stores.search(f["store"], query="q", max_num_results=0), "max_num_results", 400),
    (lambda c, f: c.vector_stores.search(f["store"], query="q", filters={"type": "like", "key": "a", "value": 1}),
     "filters", 400),
    (lambda c, f: c.vector_stores.search(f["store"], query="q", ranking_options={"ranker": "magic"}),
     "ranking_options.ranker", 400),
    (lambda c, f: c.vector_stores.files.create(f["store"], file_id=f["text"], attributes={"k": [1]}), "attributes", 400),
])
def test_bad_input_is_a_4xx_naming_the_field_and_nothing_is_half_made(client, call, field, status):
    fixtures = {"tune": upload(client, "t.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).encode(), "fine-tune"),
        "text": upload(client, "a.txt", b"some text")}
    fixtures["store"] = client.vector_stores.create(name="target").id
    before = {s.id for s in client.vector_stores.list(limit=100)}
    with pytest.raises(openai.APIStatusError) as caught:
        call(client, fixtures)
    assert caught.value.status_code == status and caught.value.body["param"] == field
    assert {s.id for s in client.vector_stores.list(limit=100)} == before
    assert client.vector_stores.files.list(fixtures["store"]).data == []


def test_a_file_that_is_not_text_fails_and_one_being_indexed_has_no_content_yet(served, client, monkeypatch):
    store = client.vector_stores.create(name="odd")
    binary = upload(client, "blob.bin", bytes(range(256)) * 8)
    record = client.vector_stores.files.create(store.id, file_id=binary)
    assert record.status == "in_progress"
    indexed(client, store.id)
    failed = client.vector_stores.files.retrieve(file_id=binary, vector_store_id=store.id)
    assert failed.status == "failed" and "not text" in failed.last_error.message
    with pytest.raises(openai.ConflictError, match="failed"):
        client.vector_stores.files.content(file_id=binary, vector_store_id=store.id)
    from pyserve.server import retrieval as module
    original = module.documents.chunks  # the next file's indexing takes a second
    monkeypatch.setattr(module.documents, "chunks", lambda *args: time.sleep(1.0) or original(*args))
    text = upload(client, "slow.txt", HELLO.encode())
    client.vector_stores.files.create(store.id, file_id=text)
    with pytest.raises(openai.ConflictError) as caught:
        client.vector_stores.files.content(file_id=text, vector_store_id=store.id)
    assert caught.value.body["param"] == "file_id"
    with pytest.raises(openai.ConflictError, match="being indexed"):
        client.vector_stores.files.create(store.id, file_id=text)
    assert indexed(client, store.id).file_counts.completed == 1


def test_stores_and_their_indexes_outlive_a_restart(tmp_path):
    model = make_sentence_transformer(tmp_path / "st", "bert")
    with cli_server(model, "--data-dir", str(tmp_path / "data")) as (_, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        store = client.vector_stores.create(name="kept", file_ids=[upload(client, "a.txt", HELLO.encode()),
                                                                   upload(client, "b.txt", FOX.encode())])
        indexed(client, store.id)
        before = client.vector_stores.search(store.id, query="hello pyserve")
    with cli_server(model, "--data-dir", str(tmp_path / "data")) as (_, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert client.vector_stores.retrieve(store.id).file_counts.completed == 2
        after = client.vector_stores.search(store.id, query="hello pyserve")
    assert [(r.file_id, r.score, r.content[0].text) for r in after.data] == \
        [(r.file_id, r.score, r.content[0].text) for r in before.data]


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    """A chat model and an embedding model behind one server, and a store of two files."""
    from pyserve import LLM
    from pyserve.engine import EngineDriver, load_engine
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    from tiny_models import make_model
    root = tmp_path_factory.mktemp("grounded")
    server = start_in_thread({"chat": AsyncLLMEngine(LLM(make_model(root / "llm", "llama"), device="cpu").engine),
                              "embedder": EngineDriver(load_engine(make_sentence_transformer(root / "st"),
                                                                   device="cpu"))})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    store = client.vector_stores.create(name="kb", file_ids=[upload(client, "hello.txt", HELLO.encode()),
                                                             upload(client, "fox.txt", FOX[:45].encode())])
    indexed(client, store.id)
    try:
        yield client, store.id
    finally:
        server.stop()


def test_a_grounded_chat_answers_from_its_sources_and_returns_them(grounded):
    client, store_id = grounded
    question = [{"role": "user", "content": "hello pyserve"}]
    retrieval = {"vector_store_ids": [store_id], "max_num_results": 2}
    answer = client.chat.completions.create(model="chat", messages=question, max_tokens=8, temperature=0,
                                            extra_body={"retrieval": retrieval})
    sources = answer.model_extra["sources"]
    found = client.vector_stores.search(store_id, query="hello pyserve", max_num_results=2).data
    assert [(s["filename"], s["text"]) for s in sources] == [(r.filename, r.content[0].text) for r in found]
    context = "\n\n".join(f"[{n}] {s['filename']}: {s['text']}" for n, s in enumerate(sources, start=1))
    by_hand = client.chat.completions.create(model="chat", max_tokens=8, temperature=0, messages=[{
        "role": "user", "content": f"Sources:\n{context}\n\nAnswer from the sources above.\n\nhello pyserve"}])
    assert answer.choices[0].message.content == by_hand.choices[0].message.content
    stream = client.chat.completions.create(model="chat", messages=question, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"retrieval": retrieval})
    chunks = list(stream)
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == by_hand.choices[0].message.content

    response = client.responses.create(model="chat", input="hello pyserve", max_output_tokens=8, temperature=0,
                                       tools=[{"type": "file_search", "vector_store_ids": [store_id],
                                               "max_num_results": 2}])
    call, message = response.output[0], response.output[1]
    assert call.type == "file_search_call" and call.queries == ["hello pyserve"]
    assert [r.filename for r in call.results] == [s["filename"] for s in sources]
    assert response.output_text == by_hand.choices[0].message.content


def test_a_grounded_chat_names_a_bad_store(grounded):
    client, _ = grounded
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"retrieval": {"vector_store_ids": ["vs_nope"]}})
    assert caught.value.body["param"] == "retrieval.vector_store_ids"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="chat", input="hi", tools=[{"type": "file_search", "vector_store_ids": []}])
    assert caught.value.body["param"] == "tools"
