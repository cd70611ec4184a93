"""The committed demo models: how good they are, measured against simple baselines, and a smoke
test of no-argument `pyserve serve` calling every demo model over HTTP and msgpack."""

import base64
import io
import json
import random

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
            forecast = c.infer("seasonal-forecaster", {"history": seasonal_series(1, 48, seed=7),
                                                       "seed": np.array([1])})
            assert tensor_from_wire(forecast["outputs"]["quantiles"]).shape == (1, 3, 12)
