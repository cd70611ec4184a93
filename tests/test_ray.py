"""Replicas on Ray Serve: a local Ray instance (started and stopped here, on 127.0.0.1) serving two
replicas of a tiny model behind pyserve's own routes, used through real clients."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from pyserve import LLM, SamplingParams  # noqa: E402

from conftest import free_port  # noqa: E402

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def on_ray(tiny_llama_dir):
    from ray import serve

    from pyserve.ray import APP_NAME, RayOptions, build_application

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application({"tiny": str(tiny_llama_dir)},
                                    RayOptions(replicas=2, cpus_per_replica=0.5, engine_options={"device": "cpu"})),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def served_by(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'pyserve_replica_requests_total\{[^}]*replica="(\w+)"[^}]*\} (\S+)',
                                                   text)}


def test_two_replicas_serve_the_openai_sdk_and_tritonclient(on_ray, tiny_llama_dir):
    import tritonclient.http as triton

    want = LLM(tiny_llama_dir, device="cpu").generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0].text
    client = openai.OpenAI(base_url=f"{on_ray}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]

    def plain(i):  # another cache salt, another placement key: the requests spread over the replicas
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"cache_salt": f"salt-{i}"}).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(plain, range(16)))
    assert texts == [want] * 16
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=12, temperature=0, stream=True)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=12, temperature=0).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat

    kserve = triton.InferenceServerClient(url=on_ray.removeprefix("http://"))
    inputs = [triton.InferInput("text_input", [1], "BYTES"), triton.InferInput("max_tokens", [1], "INT32"),
              triton.InferInput("temperature", [1], "FP32")]
    inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    inputs[1].set_data_from_numpy(np.array([12], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([0.0], dtype=np.float32))
    out = kserve.infer("tiny", inputs).as_numpy("text_output")[0]
    assert (out.decode() if isinstance(out, bytes) else out) == want
    kserve.close()

    counts = served_by(on_ray)
    assert len(counts) == 2 and sum(counts.values()) >= 18  # both replicas answered
    metrics = urllib.request.urlopen(f"{on_ray}/metrics", timeout=30).read().decode()
    assert 'pyserve_engine_ready{model="tiny",task="text-generation"} 1.0' in metrics

    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # a client's fault crosses Ray intact
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=-1)


def test_a_seeded_request_gives_the_same_text_on_either_replica(on_ray):
    client = openai.OpenAI(base_url=f"{on_ray}/v1", api_key="none")
    before = served_by(on_ray)

    def seeded(i):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1234,
                                         extra_body={"cache_salt": f"seeded-{i}"}).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = set(pool.map(seeded, range(16)))
    after = served_by(on_ray)
    assert len(texts) == 1
    assert all(after[r] > before.get(r, 0) for r in after)  # both replicas drew it


def test_a_conversation_stays_on_one_replica_and_meets_its_cached_prefix(on_ray):
    client = openai.OpenAI(base_url=f"{on_ray}/v1", api_key="none")
    system = "You are a terse assistant."
    before = served_by(on_ray)
    history = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    cached = []
    for turn in range(4):
        reply = client.chat.completions.create(model="tiny", messages=history, max_tokens=4, temperature=0)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        history += [{"role": "assistant", "content": reply.choices[0].message.content},
                    {"role": "user", "content": f"And {turn}?"}]
    after = served_by(on_ray)
    moved = {r: after[r] - before.get(r, 0) for r in after if after[r] - before.get(r, 0)}
    assert list(moved.values()) == [4]  # every turn on the same replica
    assert all(c > 0 for c in cached[1:])  # where the earlier turns' blocks were
    spread = set()
    for i in range(12):  # other conversations go elsewhere too
        before = served_by(on_ray)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Topic {i}: {i * 7919}"}],
                                       max_tokens=1, temperature=0)
        after = served_by(on_ray)
        spread |= {r for r in after if after[r] > before.get(r, 0)}
    assert len(spread) == 2


def test_a_replica_killed_mid_stream_fails_its_streams_and_the_next_requests_succeed(on_ray):
    from ray import serve

    client = openai.OpenAI(base_url=f"{on_ray}/v1", api_key="none", max_retries=0)
    started, outcomes = threading.Barrier(13), []

    def stream(i):  # twelve placement keys: both replicas get streams
        chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "cache_salt": f"stream-{i}"})
        text = ""
        try:
            for i, chunk in enumerate(chunks):
                text += chunk.choices[0].text if chunk.choices else ""
                if i == 0:
                    started.wait(timeout=60)
            outcomes.append(("done", text))
        except openai.APIError as exc:
            outcomes.append(("error", str(exc)))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "engine-tiny" in a["name"]]
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)  # no stream hangs
    errors = [message for kind, message in outcomes if kind == "error"]
    assert errors and all("replica" in message for message in errors)
    assert any(kind == "done" for kind, _ in outcomes)
    for _ in range(4):
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    deadline = time.monotonic() + 120  # and Ray Serve brings the replica back
    while serve.status().applications["pyserve"].deployments["engine-tiny"].replica_states.get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)


def test_a_replica_may_span_tensor_parallel_ranks(on_ray, tiny_llama_dir):
    from ray import serve

    from pyserve.ray import APP_NAME, RayOptions, build_application

    want = LLM(tiny_llama_dir, device="cpu").generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0].text
    serve.run(build_application({"tiny": str(tiny_llama_dir)}, RayOptions(
        replicas=1, cpus_per_replica=0.5, engine_options={"device": "cpu", "tensor_parallel_size": 2})),
        name=APP_NAME, route_prefix="/")  # (replaces the two-replica application: this test goes last)
    client = openai.OpenAI(base_url=f"{on_ray}/v1", api_key="none")
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text == want
