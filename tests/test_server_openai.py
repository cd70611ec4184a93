"""The OpenAI-compatible HTTP API against the official `openai` SDK, on a real local server."""

import json
import threading
import time
import urllib.error
import urllib.request

import openai
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from pyserve import SamplingParams
from pyserve.server.auth import AccessPolicy

from conftest import serving

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with serving(tiny_llama_dir, api_key=KEY) as running:
        yield running


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def offline(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw))[0]


def test_models_and_completions_match_the_engine(client, reference):
    llm = reference
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="nope"):  # OpenAI's 404 error object, naming the model
        client.models.retrieve("nope")
    resp = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    want = offline(llm, "Hello world", max_tokens=12, temperature=0)
    assert resp.choices[0].text == want.text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_streaming_completion_concatenates_to_the_full_text(client, reference):
    llm = reference
    chunks = list(client.completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=1.0,
                                            seed=3, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = offline(llm, "Hello world", max_tokens=20, temperature=1.0, seed=3)
    assert text == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_plain_and_streaming(client, reference):
    llm = reference
    messages = [{"role": "user", "content": "Hi there"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, n=2,
                                          logprobs=True, top_logprobs=2)
    want = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0))[0]
    assert [c.message.content for c in resp.choices] == [want.text, want.text]
    assert resp.choices[0].message.role == "assistant"
    assert len(resp.choices[0].logprobs.content) == len(want.token_ids)
    assert len(resp.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == want.text


def test_errors_use_the_openai_shape_and_name_the_field(client, served):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt="x" * 5000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    bad = openai.OpenAI(base_url=served[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def raw_post(url, data: bytes, headers=None):
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_invalid_json_wrong_types_request_id_and_health(served):
    server, _ = served
    status, _, body = raw_post(server.url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, _, body = raw_post(server.url + "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "7"}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, headers, _ = raw_post(server.url + "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode(),
                                  {"X-Request-Id": "abc-123"})
    assert status == 200 and headers.get("X-Request-Id") == "abc-123"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # no key needed
        assert r.status == 200


def test_concurrent_streams_all_finish_and_free_their_blocks(served, reference):
    server, llm = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    want = offline(reference, "Hello world", max_tokens=8, temperature=0, ignore_eos=True).text
    results, errors = [], []

    def one():
        try:
            stream = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            results.append("".join(c.choices[0].text for c in stream if c.choices))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == [want] * 100
    deadline = time.monotonic() + 10
    while llm.engine.num_free_blocks() != llm.engine.num_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.engine.num_free_blocks() == llm.engine.num_blocks


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(served):
    import http.client

    server, llm = served
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "Hello world", "max_tokens": 2000, "stream": True,
                       "ignore_eos": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event arrived: the request is running
    assert llm.engine.num_free_blocks() < llm.engine.num_blocks
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    while llm.engine.num_free_blocks() != llm.engine.num_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.engine.num_free_blocks() == llm.engine.num_blocks
    assert not llm.engine.has_unfinished()


def scrape(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def test_metrics_move_as_requests_run(client, served):
    server, _ = served
    before = scrape(server)
    client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    after = scrape(server)
    key = "pyserve_requests_total{model=tiny,status=length,task=text-generation}"
    assert after[key] == before.get(key, 0) + 1
    gen = "pyserve_generation_tokens_total{model=tiny,task=text-generation}"
    assert after[gen] == before.get(gen, 0) + 6
    ttft = "pyserve_time_to_first_token_seconds_count{model=tiny,task=text-generation}"
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after["pyserve_inter_token_latency_seconds_count{model=tiny,task=text-generation}"] >= 5
    assert after["pyserve_batch_size_tokens_count{model=tiny,task=text-generation}"] > before.get(
        "pyserve_batch_size_tokens_count{model=tiny,task=text-generation}", 0)
    assert after["pyserve_kv_cache_usage_ratio{model=tiny,task=text-generation}"] == 0.0
    assert "pyserve_requests_running{model=tiny,task=text-generation}" in after and "pyserve_queue_time_seconds_count{model=tiny,task=text-generation}" in after


def test_feedback_is_stored_durably_and_exported(tiny_llama_dir, tmp_path):
    with serving(tiny_llama_dir, api_key=KEY, data_dir=str(tmp_path)) as (server, _):
        status, _, body = raw_post(server.url + "/v1/feedback", json.dumps(
            {"response_id": "cmpl-1", "rating": 1, "comment": "good", "user": "u1", "model": "tiny"}).encode())
        assert status == 201 and body["id"] == 1
        status, _, body = raw_post(server.url + "/v1/feedback", json.dumps({"response_id": "cmpl-2",
                                                                            "rating": "great"}).encode())
        assert status == 400 and body["error"]["param"] == "rating"
        for name, size in (("comment", 10_001), ("response_id", 257), ("user", 257)):  # 7 MB comments filled disks
            status, _, body = raw_post(server.url + "/v1/feedback", json.dumps(
                {"response_id": "cmpl-4", "rating": 1, name: "x" * size}).encode())
            assert status == 400 and body["error"]["param"] == name
    access = AccessPolicy([KEY], admin_keys=["admin-key"])
    with serving(tiny_llama_dir, access=access, data_dir=str(tmp_path)) as (server, _):  # a restart keeps it
        raw_post(server.url + "/v1/feedback", json.dumps({"response_id": "cmpl-3", "rating": -1}).encode())
        req = urllib.request.Request(server.url + "/v1/feedback/export", headers={"Authorization": "Bearer admin-key"})
        with urllib.request.urlopen(req, timeout=10) as r:
            rows = [json.loads(line) for line in r.read().decode().splitlines()]
    assert [(r["response_id"], r["rating"], r["comment"]) for r in rows] == [("cmpl-1", 1, "good"), ("cmpl-3", -1, None)]


def test_graceful_shutdown_lets_open_requests_finish(tiny_llama_dir):
    with serving(tiny_llama_dir) as (server, llm):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))  # the request is running
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = [c for c in stream]
        stopper.join(timeout=30)
        assert rest and rest[-1].choices[0].finish_reason == "length"
        assert first.choices and not server.thread.is_alive()
        with pytest.raises(openai.APIConnectionError):  # and no new requests are taken
            client.models.list()


def test_oversized_bodies_get_413(served):
    import socket

    server, _ = served
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # announce a huge body, send little
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {9 * 2**20}\r\n\r\n{{".encode())
        reply = b""
        while b"exceeds" not in reply:  # headers and body may come in separate segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds" in reply


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
          "logit_bias", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "min_tokens", "ignore_eos", "stream", "stream_options", "user", "stop_token_ids"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8), st.booleans())
def test_request_validation_only_ever_raises_bad_request(body, chat):
    from pyserve.errors import ClientError
    from pyserve.server import adapters

    try:
        params = adapters.sampling_params(body, chat)
        if chat:
            adapters.chat_messages(body.get("messages"))
        else:
            adapters.completion_prompts(body.get("prompt"))
    except ClientError as exc:
        assert 400 <= exc.status < 500 and exc.message and exc.field
    else:
        params.validate()
