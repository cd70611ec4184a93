"""KServe V2 / Open Inference Protocol against the real `tritonclient.http`, JSON and binary."""

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from pyserve import SamplingParams

from conftest import serving


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
    config = client.get_model_config("tiny")  # Triton's shape: a text model takes no batch dimension
    assert config["max_batch_size"] == 0
    assert config["input"][0] == {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}
    assert config["output"] == [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [1]}]


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


def test_repository_unload_and_load(tiny_llama_dir):
    import json
    import urllib.request

    from pyserve import LLM
    from pyserve.engine.llm import AsyncLLMEngine

    def loader(name):
        if name != "second":
            raise KeyError(name)
        return AsyncLLMEngine(LLM(tiny_llama_dir, device="cpu").engine)

    def post(url):
        req = urllib.request.Request(url, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with serving(tiny_llama_dir, loader=loader) as (server, _):
        c = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            assert [m["name"] for m in c.get_model_repository_index()] == ["tiny"]
            c.load_model("second")
            assert c.is_model_ready("second")
            assert {m["name"] for m in c.get_model_repository_index()} == {"tiny", "second"}
            inputs, outputs = text_request("Hello", False)
            assert c.infer("second", inputs, outputs=outputs).as_numpy("text_output") is not None
            c.unload_model("second")
            assert not c.is_model_ready("second")
            status, body = post(server.url + "/v2/repository/models/unknown/load")
            assert status == 404 and "unknown" in body["error"]
        finally:
            c.close()
