"""Image generation through every front-end on a real server: the `openai` SDK (generate, edit),
KServe V2 (`tritonclient`) and msgpack (with progress), against the engine run directly."""

import base64
import json
import io

import numpy as np
import openai
import pytest

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from pyserve.engine import EngineDriver, load_engine  # noqa: E402
from pyserve.engine.diffusion import ImageRequest  # noqa: E402
from pyserve.server import start_in_thread  # noqa: E402
from pyserve.server.pictures import to_uint8  # noqa: E402

from tiny_models import make_sd_pipeline  # noqa: E402

PROMPT = "a tiny red fox"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sd-served"))


@pytest.fixture(scope="module")
def served(sd_dir):
    # room for the 400-step requests the cancellation tests send (the default allows 16x16 at 200)
    server = start_in_thread({"tiny-sd": EngineDriver(load_engine(sd_dir, device="cpu", max_image_cost=16 * 16 * 800))})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def offline(sd_dir):
    engine = load_engine(sd_dir, device="cpu")

    def generate(request: ImageRequest) -> np.ndarray:
        engine.add("r", request)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    return to_uint8(out.images)
    return generate


def png_pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image)


def test_openai_sdk_generates_the_engines_images(served, offline):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    resp = client.images.generate(model="tiny-sd", prompt=PROMPT, n=2, size="24x16", response_format="b64_json",
                                  extra_body={"seed": 5, "num_inference_steps": 4, "guidance_scale": 3.0,
                                              "scheduler": "euler", "negative_prompt": "blurry"})
    got = np.stack([png_pixels(d.b64_json) for d in resp.data])
    want = offline(ImageRequest(PROMPT, "blurry", n=2, width=24, height=16, num_inference_steps=4,
                                guidance_scale=3.0, scheduler="euler", seed=5))
    assert got.shape == (2, 16, 24, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # PNG is lossless; 1 allows float rounding


def test_openai_sdk_edits_an_image(served, offline):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    init = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(init).save(buf, format="PNG")
    resp = client.images.edit(model="tiny-sd", image=("init.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                              extra_body={"strength": 0.5, "seed": 2, "num_inference_steps": 6})
    got = png_pixels(resp.data[0].b64_json)
    import torch
    want = offline(ImageRequest(PROMPT, num_inference_steps=6, seed=2, strength=0.5,
                                init_image=torch.from_numpy(init).permute(2, 0, 1).float() / 255))
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - want[0].astype(int)).max() <= 1

    # streamed, with previews: the SDK sends partial_images and stream as form strings
    events = list(client.images.edit(model="tiny-sd", image=("init.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                                     stream=True, partial_images=2,
                                     extra_body={"strength": 0.5, "seed": 2, "num_inference_steps": 6}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert np.array_equal(png_pixels(events[-1].b64_json), got)


@pytest.mark.parametrize("file_format", ["png", "jpeg", "webp"])
def test_images_come_in_the_output_format_asked_for(served, offline, file_format):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    resp = client.images.generate(model="tiny-sd", prompt=PROMPT, output_format=file_format, output_compression=90,
                                  extra_body={"seed": 5, "num_inference_steps": 3})
    picture = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert picture.format == file_format.upper() and resp.output_format == file_format
    want = offline(ImageRequest(PROMPT, num_inference_steps=3, seed=5))[0]
    reference = io.BytesIO()  # the engine's pixels written by Pillow with the same settings
    Image.fromarray(want).save(reference, format=file_format.upper(), **({} if file_format == "png" else {"quality": 90}))
    got, expected = np.asarray(picture.convert("RGB")), np.asarray(Image.open(reference).convert("RGB"))
    assert got.shape == expected.shape == (16, 16, 3)
    if file_format == "png":
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    else:  # lossy: a one-level difference in a pixel can move its whole 8x8 block a little
        assert np.abs(got.astype(int) - expected.astype(int)).mean() <= 2
    for bad, field in (({"output_format": "gif"}, "output_format"), ({"output_compression": 101}, "output_compression")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.images.generate(model="tiny-sd", prompt=PROMPT, extra_body={"num_inference_steps": 2, **bad})


@pytest.mark.parametrize("body,field", [
    ({"size": "20x20"}, "height"), ({"size": "big"}, "size"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"scheduler": "lms"}, "scheduler"), ({"n": 99}, "n"),
    ({"response_format": "url"}, "response_format"), ({"prompt": 7}, "prompt"), ({"seed": "x"}, "seed"),
    ({"num_inference_steps": 500, "n": 2}, "num_inference_steps"),  # over the model's cost limit
])
def test_bad_image_requests_get_a_400_naming_the_field(served, body, field):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**{"model": "tiny-sd", "prompt": PROMPT, **{k: v for k, v in body.items()
                                                                             if k in ("size", "n", "prompt",
                                                                                      "response_format")}},
                               extra_body={k: v for k, v in body.items()
                                           if k not in ("size", "n", "prompt", "response_format")})
    assert field in str(err.value)


def test_the_cost_limit_defaults_to_four_native_images_at_50_steps(sd_dir):
    from pyserve.errors import InvalidParameter
    engine = load_engine(sd_dir, device="cpu")
    native = engine.spec.default_size
    assert ImageRequest(PROMPT, num_inference_steps=200).checked(engine.spec, 1024)  # 4 x 16 x 16 x 50: fits
    with pytest.raises(InvalidParameter, match="over this model's limit of 51200") as err:
        ImageRequest(PROMPT, num_inference_steps=201).checked(engine.spec, 1024)
    assert err.value.field == "num_inference_steps" and native == 16
    assert ImageRequest(PROMPT, num_inference_steps=201).checked(engine.spec, 1024, max_cost=16 * 16 * 201)
    # one image's pixels: at most the limit over 50 steps, even at fewer steps (a call is indivisible)
    assert ImageRequest(PROMPT, num_inference_steps=4, width=32, height=32).checked(engine.spec, 1024)
    with pytest.raises(InvalidParameter, match="1280 pixels, over this model's limit of 1024 an image") as err:
        ImageRequest(PROMPT, num_inference_steps=1, width=40, height=32).checked(engine.spec, 1024)
    assert err.value.field == "width"


def test_an_edit_with_something_that_is_not_an_image_is_refused(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="image"):
        client.images.edit(model="tiny-sd", image=("x.png", b"not a png at all", "image/png"), prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(model="tiny-sd", image=("x.png", b"x", "image/png"), mask=("m.png", b"m", "image/png"),
                           prompt=PROMPT)


def test_kserve_infer_returns_the_images_as_uint8(served, offline):
    import tritonclient.http as triton
    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    try:
        meta = client.get_model_metadata("tiny-sd")
        assert meta["outputs"][0]["name"] == "images" and meta["outputs"][0]["datatype"] == "UINT8"
        prompt = triton.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        inputs = [prompt]
        for name, dtype, value in (("seed", "INT64", np.int64), ("num_inference_steps", "INT32", np.int32),
                                   ("n", "INT32", np.int32)):
            t = triton.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([{"seed": 9, "num_inference_steps": 3, "n": 2}[name]], dtype=value))
            inputs.append(t)
        for binary in (False, True):
            result = client.infer("tiny-sd", inputs, outputs=[triton.InferRequestedOutput("images",
                                                                                         binary_data=binary)])
            images = result.as_numpy("images")
            want = offline(ImageRequest(PROMPT, n=2, num_inference_steps=3, seed=9))
            assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
            assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    finally:
        client.close()


def test_msgpack_infer_answers_as_kserve_does(served, offline):
    """The tensor form over msgpack: the same inputs and the same uint8 images as KServe's infer."""
    from pyserve.client import Client, RemoteError
    from pyserve.protocol import tensor_from_wire
    inputs = {"prompt": [PROMPT.encode()], "seed": np.array([9], dtype=np.int64),
              "num_inference_steps": np.array([3], dtype=np.int32), "n": np.array([2], dtype=np.int32)}
    with Client("127.0.0.1", served.msgpack_port) as c:
        images = tensor_from_wire(c.infer("tiny-sd", inputs)["outputs"]["images"])
        with pytest.raises(RemoteError) as err:
            c.infer("tiny-sd", {**inputs, "num_inference_steps": np.array([0], dtype=np.int32)})
        assert err.value.code == 400 and "num_inference_steps" in err.value.message
    want = offline(ImageRequest(PROMPT, n=2, num_inference_steps=3, seed=9))
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1


def test_msgpack_streams_progress_then_pngs(served, offline):
    from pyserve.client import AsyncClient, Client, RemoteError
    seen = []
    with Client("127.0.0.1", served.msgpack_port) as c:
        result = c.generate_images("tiny-sd", PROMPT, seed=4, num_inference_steps=5, size="16x24",
                                   progress=lambda step, total: seen.append((step, total)))
        with pytest.raises(RemoteError) as err:
            c.generate_images("tiny-sd", PROMPT, num_inference_steps=10_000)
        assert err.value.code == 400 and "num_inference_steps" in err.value.message
    assert seen == [(s, 5) for s in range(1, 5)]  # steps 1-4 as progress, the 5th with the images
    got = np.asarray(Image.open(io.BytesIO(result.images[0])))
    want = offline(ImageRequest(PROMPT, num_inference_steps=5, seed=4, width=16, height=24))
    assert got.shape == (24, 16, 3) and np.abs(got.astype(int) - want[0].astype(int)).max() <= 1
    assert result.seeds == [4] and (result.width, result.height) == (16, 24)

    import asyncio

    async def cancel_mid_loop():
        async with await AsyncClient.connect("127.0.0.1", served.msgpack_port) as c:
            task = asyncio.create_task(c.generate_images("tiny-sd", PROMPT, num_inference_steps=400, seed=1))
            await asyncio.sleep(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(cancel_mid_loop())
    driver = served.models.get("tiny-sd").driver
    import time
    deadline = time.monotonic() + 20
    while driver.stats().running + driver.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.stats().running == 0 and driver.stats().waiting == 0  # the slot came free


def test_openai_sdk_streams_previews_then_the_image(served, offline):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    events = list(client.images.generate(model="tiny-sd", prompt=PROMPT, stream=True, partial_images=2,
                                         extra_body={"seed": 8, "num_inference_steps": 6}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    previews = [png_pixels(e.b64_json) for e in events[:2]]
    final = png_pixels(events[-1].b64_json)
    want = offline(ImageRequest(PROMPT, num_inference_steps=6, seed=8))[0]
    assert np.abs(final.astype(int) - want.astype(int)).max() <= 1
    assert all(p.shape == final.shape for p in previews) and not np.array_equal(previews[0], final)
    with pytest.raises(openai.BadRequestError, match="num_inference_steps"):  # refused before the stream starts
        list(client.images.generate(model="tiny-sd", prompt=PROMPT, stream=True,
                                    extra_body={"num_inference_steps": 0}))


def test_image_metrics(served):
    import urllib.request
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    client.images.generate(model="tiny-sd", prompt=PROMPT, n=3, extra_body={"num_inference_steps": 2})
    with urllib.request.urlopen(served.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    labels = 'model="tiny-sd",task="image-generation"'
    assert f"pyserve_images_generated_total{{{labels}}}" in text
    count = float(text.split(f"pyserve_images_generated_total{{{labels}}} ")[1].split()[0])
    assert count >= 3
    for family in ("pyserve_engine_step_seconds_count", "pyserve_queue_time_seconds_count",
                   "pyserve_e2e_request_latency_seconds_count", "pyserve_batch_size_sequences_count"):
        assert f"{family}{{{labels}}}" in text, family


JUNK = [None, True, -1, 0, 2**70, 1.5, float("1e300"), "", "x" * 300, [], {}, [1, 2], {"a": 1}, "\ud800"]


def test_fuzzed_image_requests_get_a_json_answer_and_the_server_stays_healthy(served):
    """Arbitrary values in every field (small ones where a valid value costs denoising steps):
    each request gets a 200 or a 4xx in OpenAI's error shape, and /health stays 200."""
    import json
    import urllib.error
    import urllib.request
    from hypothesis import given, settings
    from hypothesis import strategies as st

    fields = {
        "prompt": st.sampled_from([PROMPT, "", 7, None, "\ud800", "x" * 2000]),
        "negative_prompt": st.sampled_from(JUNK + ["blurry"]),
        "n": st.sampled_from(JUNK + [1, 2]),
        "size": st.sampled_from(JUNK + ["16x16", "8x8", "20x20", "big", "0x0", "16x", "auto", "99999x99999"]),
        "num_inference_steps": st.sampled_from(JUNK + [1, 2]),
        "guidance_scale": st.sampled_from(JUNK + [1.0, 7.5, -3, 1e9]),
        "scheduler": st.sampled_from(JUNK + ["ddim", "euler_a", "lms"]),
        "seed": st.sampled_from(JUNK + [1, -(2**63), 2**64]),
        "response_format": st.sampled_from(JUNK + ["b64_json", "url"]),
        "partial_images": st.sampled_from(JUNK + [1, 4]),
        "stream": st.sampled_from([False, True, "yes", None]),
        "model": st.sampled_from(["tiny-sd", "nope", None, 3]),
    }

    def post(body: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(served.url + "/v1/images/generations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    @settings(max_examples=40, deadline=None)
    @given(st.fixed_dictionaries({}, optional=fields))
    def check(body):
        body.setdefault("num_inference_steps", 1)
        status, raw = post(json.dumps(body).encode())
        assert status == 200 or 400 <= status < 500, (body, status, raw[:300])
        if status != 200:
            assert "error" in json.loads(raw)
        with urllib.request.urlopen(served.url + "/health", timeout=10) as r:
            assert r.status == 200

    check()


def test_a_client_that_leaves_before_its_image_stops_its_denoising(served):
    """Not streamed: the server notices the closed connection and the engine drops the rows."""
    import socket
    import time
    data = json.dumps({"model": "tiny-sd", "prompt": PROMPT, "num_inference_steps": 400, "seed": 1}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    driver = served.models.get("tiny-sd").driver
    deadline = time.monotonic() + 20
    while driver.stats().running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert driver.stats().running == 1, "the request never started"
    sock.close()
    deadline = time.monotonic() + 20
    while driver.stats().running + driver.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.stats().running == 0 and driver.stats().waiting == 0
