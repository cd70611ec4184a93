"""KServe V2 / Open Inference Protocol against the real `tritonclient.http`, JSON and binary."""

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from pyserve import SamplingParams

from conftest import serving


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with serving(tiny_llama_dir) as running:
        yield running


@pytest.fixture
def client(served):
    c = triton.InferenceServerClient(url=served[0].url.removeprefix("http://"))
    yield c
    c.close()


def text_request(prompt: str, binary: bool, **scalars):
    inputs = [triton.InferInput("text_input", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object), binary_data=binary)
    for name, (value, dtype, np_type) in scalars.items():
        tensor = triton.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(np.array([value], dtype=np_type), binary_data=binary)
        inputs.append(tensor)
    return inputs, [triton.InferRequestedOutput("text_output", binary_data=binary)]


def test_health_metadata_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("missing")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "text_input" and meta["outputs"][0]["name"] == "text_output"
    assert client.get_server_metadata()["name"] == "pyserve"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_text_matches_the_engine(client, reference, binary):
    llm = reference
    inputs, outputs = text_request("Hello world", binary, max_tokens=(10, "INT32", np.int32),
                                   temperature=(0.0, "FP32", np.float32))
    result = client.infer("tiny", inputs, outputs=outputs)
    text = result.as_numpy("text_output")[0]
    want = llm.generate("Hello world", SamplingParams(max_tokens=10, temperature=0))[0].text
    assert (text.decode() if isinstance(text, bytes) else text) == want


def test_bad_requests_are_4xx(client):
    inputs, outputs = text_request("Hello", False, top_p=(1.5, "FP32", np.float32))
    with pytest.raises(InferenceServerException, match="top_p"):
        client.infer("tiny", inputs, outputs=outputs)
    inputs, outputs = text_request("Hello", False)
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("missing", inputs, outputs=outputs)
    bogus = triton.InferInput("image", [1], "BYTES")
    bogus.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException, match="unknown input"):
        client.infer("tiny", [bogus])
