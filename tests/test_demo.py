"""The committed demo models: how good they are, measured against simple baselines, and a smoke
test of no-argument `pyserve serve` calling every demo model over HTTP and msgpack."""

import base64
import io
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyserve.demo import DEMO_MODELS, demo_model_dirs
from pyserve.demo.data import DIGIT_NAMES, is_held_out, python_docs, seasonal_series
from pyserve.demo.quality import DigitClassifier, mase, seasonal_naive
from pyserve.demo.train_text import model_perplexity, token_stream, unigram_perplexity
from pyserve.engine import load_engine, run_engine

from conftest import cli_server

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
DIRS = demo_model_dirs()
ROOT = Path(__file__).resolve().parent.parent


def _example(path: str):
    """A script of examples/ as a module (they are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / "examples" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


def test_the_demo_models_are_committed_and_small():
    sizes = {name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
             for name, path in DIRS.items() if name != "digits-vae"}  # the VAE is inside digits-sd
    assert set(DEMO_MODELS) <= set(DIRS) and all(p.is_dir() for p in DIRS.values())
    assert sum(sizes.values()) < 30 * 2**20, sizes


def test_text_model_perplexity_beats_a_unigram_model_3x():
    """Held-out documents (never trained on), scored by transformers' Llama on the committed weights."""
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DIRS["pydoc-chat"] / "tokenizer.json"))
    docs = python_docs()
    train, held = (token_stream(tok, {k: v for k, v in docs.items() if is_held_out(k) == held_out},
                                random.Random(0), chat=False) for held_out in (False, True))
    unigram = unigram_perplexity(train, held, tok.get_vocab_size())
    model = transformers.LlamaForCausalLM.from_pretrained(DIRS["pydoc-chat"], torch_dtype=torch.float32).eval()
    model_ppl = model_perplexity(model, held, context=256)
    print(f"held-out perplexity {model_ppl:.1f}, unigram {unigram:.1f}: {unigram / model_ppl:.1f}x better")
    assert unigram / model_ppl >= 3


def test_the_demo_embedder_finds_held_out_documents_and_equals_sentence_transformers():
    """Held-out documents (never trained on): a question about each, or its first sentence, finds
    it among all of them by the committed embedder, served by pyserve as sentence-transformers
    computes it."""
    from sentence_transformers import SentenceTransformer

    from pyserve.demo.train_embedder import pairs
    from pyserve.engine.embedding import EncodeRequest
    held = pairs({k: v for k, v in python_docs().items() if is_held_out(k)}, random.Random(1))
    engine = load_engine(DIRS["pydoc-embed"], device="cpu")
    tokenizer = engine.model.tokenizer
    limit = engine.model.spec.max_model_len

    def vectors(texts):
        engine.add("r", EncodeRequest([tokenizer.encode_input(t, truncate_to=limit)[0] for t in texts]))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        return outs[-1].vectors
    queries, documents = vectors([q for q, _ in held]), vectors([d for _, d in held])
    recall = float(((queries @ documents.T).argmax(1) == np.arange(len(held))).mean())
    print(f"held-out recall@1 {recall:.3f} among {len(held)} documents (chance {1 / len(held):.4f})")
    assert recall >= 20 / len(held)  # at least 20x chance
    reference = SentenceTransformer(str(DIRS["pydoc-embed"]), device="cpu", model_kwargs={"dtype": torch.float32}
                                    ).encode([q for q, _ in held[:8]])
    np.testing.assert_allclose(queries[:8], reference, atol=1e-5)


def test_the_demo_reranker_prefers_the_right_document():
    """Held-out pairs: the committed cross-encoder scores a question's own document above the
    document sharing most words with the question, more often than not; pyserve's scores equal
    transformers' logits."""
    import transformers

    from pyserve.demo.train_embedder import encode, overlap_negative, pairs
    from pyserve.engine.embedding import EncodeRequest
    held = pairs({k: v for k, v in python_docs().items() if is_held_out(k)}, random.Random(1))
    rng = random.Random(0)
    documents = [d for _, d in held]
    words = [set(re.findall(r"\w+", d.lower())) for d in documents]
    engine = load_engine(DIRS["pydoc-rerank"], device="cpu")
    tokenizer, limit = engine.model.tokenizer, engine.model.spec.max_model_len
    rows = [(q, documents[i]) for i, (q, _) in enumerate(held)]
    rows += [(q, documents[overlap_negative(q, documents, words, i, rng)]) for i, (q, _) in enumerate(held)]
    encoded = [tokenizer.encode_input(q, d, truncate_to=limit) for q, d in rows]
    engine.add("r", EncodeRequest([ids for ids, _ in encoded], [types for _, types in encoded]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    scores = outs[-1].vectors[:, 0]
    accuracy = float((scores[:len(held)] > scores[len(held):]).mean())
    print(f"held-out: the right document scores higher in {accuracy:.1%} of {len(held)} pairs")
    assert accuracy >= 0.65  # a coin: 0.5
    model = transformers.BertForSequenceClassification.from_pretrained(DIRS["pydoc-rerank"],
                                                                       dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(DIRS["pydoc-rerank"]))
    with torch.no_grad():
        want = model(**encode(hf_tokenizer, [q for q, _ in rows[:8]], [d for _, d in rows[:8]])).logits[:, 0]
    np.testing.assert_allclose(scores[:8], want.numpy(), atol=1e-4)


def test_text_to_image_draws_the_digit_the_prompt_names(classifier):
    from pyserve.engine.diffusion import ImageRequest

    engine = load_engine(DIRS["digits-sd"], device="cpu")
    requests = {f"d{d}-{v}": ImageRequest(prompt=text, n=4, seed=100 * d + v, guidance_scale=5.0)
                for d in range(10) for v, text in enumerate((f"the digit {DIGIT_NAMES[d]}", f"a handwritten {d}"))}
    outs = run_engine(engine, requests)
    images = np.concatenate([outs[k].images for k in requests])
    labels = np.repeat([int(k[1]) for k in requests], 4)
    accuracy = classifier.accuracy(images, labels)
    print(f"text-to-image: the classifier reads the requested digit in {accuracy:.0%} of {len(labels)} images")
    assert accuracy >= 0.8


def test_gan_draws_the_digit_asked_for(classifier):
    from pyserve.engine.batch import TensorRequest

    engine = load_engine(DIRS["digits-gan"], device="cpu")
    labels = np.arange(500) % 10
    out = run_engine(engine, {"r": TensorRequest({"seed": np.arange(500), "class_label": labels})})["r"]
    accuracy = classifier.accuracy(out.outputs["images"], labels)
    print(f"GAN: the classifier reads the requested digit in {accuracy:.0%} of 500 images")
    assert accuracy >= 0.8


def test_forecaster_beats_seasonal_naive():
    from pyserve.engine.batch import TensorRequest

    config = json.loads((DIRS["seasonal-forecaster"] / "config.json").read_text())
    context, horizon = config["context_length"], config["horizon"]
    series = seasonal_series(60, context + horizon, seed=12345)  # never seen in training (seed 0)
    history, actual = series[:, :context], series[:, context:]
    engine = load_engine(DIRS["seasonal-forecaster"], device="cpu")
    out = run_engine(engine, {"r": TensorRequest({"history": history, "seed": np.arange(60)})})["r"]
    median = out.outputs["quantiles"][:, 1]
    model, naive = mase(median, actual, history, 12), mase(seasonal_naive(history, horizon, 12), actual, history, 12)
    print(f"MASE: forecaster {model:.3f}, seasonal naive {naive:.3f}")
    assert model < 1 and model < naive


def test_pyserve_serve_with_no_arguments_serves_every_demo_model():
    import openai
    import tritonclient.http as triton
    from PIL import Image

    from pyserve.client import Client
    from pyserve.protocol import tensor_from_wire

    with cli_server(None) as (proc, url, msgpack_port):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == set(DEMO_MODELS)
        chat = client.chat.completions.create(model="pydoc-chat", max_tokens=24, seed=1,
                                              messages=[{"role": "user", "content": "Tell me about json.dumps."}])
        assert chat.choices[0].message.content.strip()
        docs = python_docs()  # a vector store of two documents, searched with the demo embedder and reranker
        ids = [client.files.create(file=(f"{name}.txt", io.BytesIO(docs[name].encode())), purpose="assistants").id
               for name in ("json.dumps", "shutil.copy")]
        store = client.vector_stores.create(name="docs", file_ids=ids, extra_body={"reranker": "pydoc-rerank"})
        while client.vector_stores.retrieve(store.id).file_counts.in_progress:
            time.sleep(0.1)
        found = client.vector_stores.search(store.id, query="Serialize an object to a JSON formatted string")
        assert found.data[0].filename == "json.dumps.txt"
        # the README's retrieval example, as written: the project's docs/ folder, a grounded question
        example = _example("retrieval/ask_docs.py")
        asked = example.main([str(ROOT / "docs"), "How are the KV cache blocks paged and freed?",
                              "--base-url", url + "/v1"])
        assert asked["answer"].strip() and asked["sources"]
        assert {s["filename"] for s in asked["sources"]} <= {p.name for p in (ROOT / "docs").rglob("*.md")}
        for model, prompt in (("digits-sd", "the digit three"), ("digits-gan", "three"), ("digits-vae", "")):
            image = client.images.generate(model=model, prompt=prompt, n=1, extra_body={"seed": 3}).data[0]
            assert Image.open(io.BytesIO(base64.b64decode(image.b64_json))).size == (32, 32)

        kserve = triton.InferenceServerClient(url=url.removeprefix("http://"))
        history = triton.InferInput("history", [1, 48], "FP32")
        history.set_data_from_numpy(seasonal_series(1, 48, seed=7))
        seed = triton.InferInput("seed", [1], "INT64")
        seed.set_data_from_numpy(np.array([1], dtype=np.int64))
        assert kserve.infer("seasonal-forecaster", [history, seed]).as_numpy("mean").shape == (1, 12)
        kserve.close()

        with Client("127.0.0.1", msgpack_port) as c:
            assert c.generate("pydoc-chat", "The for statement", max_tokens=8).text
            assert len(c.generate_images("digits-sd", "the digit one", num_inference_steps=4).images) == 1
            # the demo image model answers msgpack infer as KServe's: uint8 images
            sd = tensor_from_wire(c.infer("digits-sd", {"prompt": [b"the digit one"], "seed": np.array([3]),
                                                        "num_inference_steps": np.array([4], dtype=np.int32)})
                                  ["outputs"]["images"])
            assert sd.dtype == np.uint8 and sd.shape == (1, 32, 32, 3)
            digit = tensor_from_wire(c.infer("digits-gan", {"seed": np.array([1]), "class_label": np.array([4])})
                                     ["outputs"]["images"])
            latents = tensor_from_wire(c.infer("digits-vae", {"images": np.repeat(digit, 3, axis=-1)})
                                       ["outputs"]["latents"])
            assert latents.shape == (1, 4, 8, 8)
            embedded = c.infer("pydoc-embed", {"text": np.array([b"json.dumps"], dtype=object)})
            assert tensor_from_wire(embedded["outputs"]["embedding"]).shape == (1, 192)
            forecast = c.infer("seasonal-forecaster", {"history": seasonal_series(1, 48, seed=7),
                                                       "seed": np.array([1])})
            assert tensor_from_wire(forecast["outputs"]["quantiles"]).shape == (1, 3, 12)
