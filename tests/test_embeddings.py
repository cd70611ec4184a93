"""Encoders: embeddings equal sentence-transformers' on the same weights for every family, pooling
and module chain; cross-encoder scores equal transformers' logits; the encoder engine packs inputs
by a token budget and shares steps between requests; the routes speak what the `openai` SDK
(base64 by default), LangChain and Cohere/Jina/vLLM-style clients send; KServe V2 and msgpack
infer go through the same translator; bad input is a 400 naming the field."""

import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch

from pyserve.engine import EngineDriver, load_engine
from pyserve.engine.embedding import EncodeRequest, EncoderEngine
from pyserve.plugin import PluginRegistry
from tiny_models import ENCODER_FAMILIES, make_encoder, make_sentence_transformer

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "café", "once upon a time there was a tiny model",
         "hello pyserve"]
PLUGINS = PluginRegistry.discover()


def encoder(model_dir):
    return load_engine(model_dir, registry=PLUGINS, device="cpu")


def engine_vectors(engine: EncoderEngine, items, types=None) -> np.ndarray:
    engine.add("r", EncodeRequest(items, types))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].error is None, outs[-1].error
    return outs[-1].vectors


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
@pytest.mark.parametrize("pooling, dense, normalize", [("mean", 0, True), ("cls", 16, True), ("max", 0, False),
                                                       ("lasttoken", 0, True)])
def test_embeddings_equal_sentence_transformers(tmp_path, family, pooling, dense, normalize):
    from sentence_transformers import SentenceTransformer
    model_dir = make_sentence_transformer(tmp_path / "st", family, pooling=pooling, dense=dense, normalize=normalize)
    want = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    engine = encoder(model_dir)
    got = torch.from_numpy(engine_vectors(engine, [engine.model.tokenizer.encode_input(t)[0] for t in TEXTS]))
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.9999
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_cross_encoder_scores_equal_transformers_logits(tmp_path, family):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model_dir = make_encoder(tmp_path / "ce", family, scorer=True)
    pairs = [("hello world", t) for t in TEXTS]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    if family != "bert":
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()(**batch).logits
    engine = encoder(model_dir)
    encoded = [engine.model.tokenizer.encode_input(a, b) for a, b in pairs]
    got = engine_vectors(engine, [ids for ids, _ in encoded], [types for _, types in encoded])
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)
    assert got[:, 0].std() > 1e-3  # the documents score differently


def test_the_engine_packs_by_a_token_budget_and_shares_steps_between_requests(tmp_path):
    engine = encoder(make_sentence_transformer(tmp_path / "st"))
    engine.max_tokens = 130  # room for 3 inputs of 40 tokens
    steps = []
    engine.step_observers.append(lambda requests, inputs: steps.append((requests, inputs)))
    big = [[2] + [50] * 38 + [3]] * 9
    engine.add("big", EncodeRequest(big))
    engine.add("small", EncodeRequest([[2, 47, 3]]))
    finished = []
    while engine.has_unfinished():
        finished += [out.request_id for out in engine.step()]
    assert steps[0] == (2, 4)  # the small request rides along in the first step (3 x 40 + 3 tokens)
    assert finished == ["small", "big"] and sum(n for _, n in steps) == 10
    alone = engine_vectors(engine, [[2, 47, 3]])
    mixed = engine_vectors(engine, big[:2] + [[2, 47, 3]])
    np.testing.assert_allclose(mixed[2], alone[0], atol=1e-6)  # packing does not change a vector


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from pyserve import LLM
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    from tiny_models import make_model
    root = tmp_path_factory.mktemp("encoders")
    embedder = make_sentence_transformer(root / "st", "bert", pooling="mean", dense=0, normalize=True,
                                         prompts={"query": "query: ", "document": ""})
    scorer = make_encoder(root / "ce", "roberta", scorer=True)
    llm_dir = make_model(root / "llm", "llama")
    server = start_in_thread({"embedder": EngineDriver(encoder(embedder)), "reranker": EngineDriver(encoder(scorer)),
                              "llm": AsyncLLMEngine(LLM(llm_dir, device="cpu").engine)})
    try:
        yield server, embedder, scorer
    finally:
        server.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_openai_sdk_gets_sentence_transformers_embeddings(served, client):
    from sentence_transformers import SentenceTransformer
    _, embedder, _ = served
    reference = SentenceTransformer(str(embedder), device="cpu")
    got = client.embeddings.create(model="embedder", input=TEXTS)  # the SDK asks for base64 and decodes it
    want = reference.encode(TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.usage.prompt_tokens > len(TEXTS)
    floats = client.embeddings.create(model="embedder", input="hello world", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-5)
    ids = reference.tokenizer("hello world")["input_ids"]
    by_ids = client.embeddings.create(model="embedder", input=[ids, ids[:2] + ids[-1:]])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[0], atol=1e-5)
    query = client.embeddings.create(model="embedder", input="hello world", extra_body={"prompt_name": "query"})
    np.testing.assert_allclose(query.data[0].embedding, reference.encode("hello world", prompt_name="query"), atol=1e-5)


def test_dimensions_truncate_and_renormalise_as_matryoshka_does(served, client):
    from sentence_transformers import SentenceTransformer
    reference = SentenceTransformer(str(served[1]), device="cpu", truncate_dim=16)
    got = np.array([d.embedding for d in client.embeddings.create(model="embedder", input=TEXTS, dimensions=16).data])
    want = reference.encode(TEXTS)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_langchain_openai_embeddings_work(served):
    from langchain_openai import OpenAIEmbeddings
    from sentence_transformers import SentenceTransformer
    embeddings = OpenAIEmbeddings(model="embedder", base_url=served[0].url + "/v1", api_key="none",
                                  check_embedding_ctx_length=False)  # no tiktoken download: send the texts
    want = SentenceTransformer(str(served[1]), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(embeddings.embed_query(TEXTS[0]), want[0], atol=1e-5)


def test_rerank_and_score_equal_the_cross_encoders_logits(served):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    server, _, scorer = served
    tokenizer = AutoTokenizer.from_pretrained(str(scorer))
    documents = TEXTS[1:]
    batch = tokenizer(["hello world"] * len(documents), documents, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(str(scorer)).eval()(**batch).logits[:, 0]
    want = torch.sigmoid(logits).tolist()
    status, ranked = post(server, "/v1/rerank", {"model": "reranker", "query": "hello world", "documents": documents,
                                                 "top_n": 2})
    assert status == 200
    order = sorted(range(len(documents)), key=lambda i: -want[i])[:2]
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["document"]["text"] for r in ranked["results"]] == [documents[i] for i in order]
    np.testing.assert_allclose([r["relevance_score"] for r in ranked["results"]], [want[i] for i in order], atol=1e-5)
    status, scored = post(server, "/v1/score", {"model": "reranker", "text_1": "hello world", "text_2": documents})
    assert status == 200
    np.testing.assert_allclose([d["score"] for d in scored["data"]], want, atol=1e-5)
    status, bare = post(server, "/v2/rerank", {"model": "reranker", "query": "hello world",
                                               "documents": [{"text": d} for d in documents],
                                               "return_documents": False})
    assert status == 200 and "document" not in bare["results"][0]


def test_an_embedding_model_scores_by_cosine(served):
    from sentence_transformers import SentenceTransformer
    server, embedder, _ = served
    vectors = SentenceTransformer(str(embedder), device="cpu").encode(TEXTS[:3], normalize_embeddings=True)
    status, scored = post(server, "/v1/score", {"model": "embedder", "text_1": TEXTS[0], "text_2": TEXTS[1:3]})
    assert status == 200
    np.testing.assert_allclose([d["score"] for d in scored["data"]], vectors[1:3] @ vectors[0], atol=1e-5)


def test_kserve_and_msgpack_infer_go_through_the_same_translator(served):
    import tritonclient.http as triton
    from sentence_transformers import SentenceTransformer

    from pyserve.client import Client
    from pyserve.protocol import tensor_from_wire
    server, embedder, _ = served
    want = SentenceTransformer(str(embedder), device="cpu").encode(TEXTS[:2])
    kserve = triton.InferenceServerClient(server.url.removeprefix("http://"))
    metadata = kserve.get_model_metadata("embedder")
    assert [i["name"] for i in metadata["inputs"]] == ["text"] and metadata["outputs"][0]["name"] == "embedding"
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:2]], dtype=object))
    np.testing.assert_allclose(kserve.infer("embedder", [text]).as_numpy("embedding"), want, atol=1e-5)
    with Client("127.0.0.1", server.msgpack_port) as msgpack:
        result = msgpack.infer("embedder", {"text": np.array([t.encode() for t in TEXTS[:2]], dtype=object)})
    np.testing.assert_allclose(tensor_from_wire(result["outputs"]["embedding"]), want, atol=1e-5)
    assert result["usage"]["prompt_tokens"] > 2


@pytest.mark.parametrize("path, body, field, words", [
    ("/v1/embeddings", {"model": "embedder", "input": ""}, "input[0]", "non-empty"),
    ("/v1/embeddings", {"model": "embedder", "input": []}, "input", "non-empty"),
    ("/v1/embeddings", {"model": "embedder", "input": [1, "a"]}, "input", "list of strings"),
    ("/v1/embeddings", {"model": "embedder", "input": "a", "encoding_format": "int8"}, "encoding_format", "float"),
    ("/v1/embeddings", {"model": "embedder", "input": "a", "dimensions": 0}, "dimensions", "from 1"),
    ("/v1/embeddings", {"model": "embedder", "input": "a", "dimensions": 65}, "dimensions", "64"),
    ("/v1/embeddings", {"model": "embedder", "input": [[1, 99999]]}, "input", "vocabulary"),
    ("/v1/embeddings", {"model": "embedder", "input": "hello " * 200}, "input", "at most 120"),
    ("/v1/embeddings", {"model": "embedder", "input": "a", "prompt_name": "nope"}, "prompt_name", "query"),
    ("/v1/embeddings", {"model": "llm", "input": "a"}, "model", "--task embed"),
    ("/v1/embeddings", {"model": "reranker", "input": "a"}, "model", "cross-encoder"),
    ("/v1/rerank", {"model": "embedder", "query": "q", "documents": ["d"]}, None, None),
    ("/v1/rerank", {"model": "reranker", "query": "", "documents": ["d"]}, "query", "non-empty"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": [3]}, "documents", "documents[0]"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": ["d"], "top_n": 0}, "top_n", "positive"),
    ("/v1/score", {"model": "reranker", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2", "as many"),
    ("/v1/score", {"model": "llm", "text_1": "a", "text_2": "b"}, "model", "relevance scores"),
])
def test_bad_input_is_a_400_naming_the_field(served, path, body, field, words):
    status, answer = post(served[0], path, body)
    if field is None:  # an embedding model reranks by cosine: not an error
        assert status == 200
        return
    assert status == 400, answer
    assert answer["error"]["param"] == field and words in answer["error"]["message"]


def test_truncate_prompt_tokens_cuts_as_sentence_transformers_does(served, client):
    from sentence_transformers import SentenceTransformer
    reference = SentenceTransformer(str(served[1]), device="cpu")
    reference.max_seq_length = 12
    text = "the quick brown fox jumps over the lazy dog " * 5
    got = client.embeddings.create(model="embedder", input=text, extra_body={"truncate_prompt_tokens": 12})
    np.testing.assert_allclose(got.data[0].embedding, reference.encode(text), atol=1e-5)
    assert got.usage.prompt_tokens == 12


def test_a_decoder_started_with_task_embed_serves_last_token_embeddings(tmp_path):
    """--task embed: a Llama's last token's final hidden state, normalised, as transformers' model
    computes it; over /v1/embeddings like any embedding model."""
    from transformers import AutoModel

    from pyserve.server import start_in_thread
    from tiny_models import make_model
    model_dir = make_model(tmp_path / "llm", "llama")
    engine = load_engine(model_dir, device="cpu", task="embed")
    texts = ["Hello world", "Once upon a time there was a tiny model.", "café"]
    ids = [engine.model.tokenizer.encode_input(t)[0] for t in texts]
    got = engine_vectors(engine, ids)
    reference = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([reference(torch.tensor([i])).last_hidden_state[0, -1] for i in ids])
    np.testing.assert_allclose(got, torch.nn.functional.normalize(want, dim=-1).numpy(), atol=1e-5)
    server = start_in_thread({"decoder": EngineDriver(engine)})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        served = client.embeddings.create(model="decoder", input=texts)
        np.testing.assert_allclose([d.embedding for d in served.data], got, atol=1e-6)
    finally:
        server.stop()
