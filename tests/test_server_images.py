"""Image generation through every front-end on a real server: the `openai` SDK (generate, edit),
KServe V2 (`tritonclient`) and msgpack (with progress), against the engine run directly."""

import base64
import io

import numpy as np
import openai
import pytest

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from pyserve.engine import EngineDriver, load_engine  # noqa: E402
from pyserve.engine.diffusion import ImageRequest  # noqa: E402
from pyserve.server import start_in_thread  # noqa: E402
from pyserve.server.image_adapters import to_uint8  # noqa: E402

from tiny_models import make_sd_pipeline  # noqa: E402

PROMPT = "a tiny red fox"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sd-served"))


@pytest.fixture(scope="module")
def served(sd_dir):
    server = start_in_thread({"tiny-sd": EngineDriver(load_engine(sd_dir, device="cpu"))})
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


@pytest.mark.parametrize("body,field", [
    ({"size": "20x20"}, "height"), ({"size": "big"}, "size"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"scheduler": "lms"}, "scheduler"), ({"n": 99}, "n"),
    ({"response_format": "url"}, "response_format"), ({"prompt": 7}, "prompt"), ({"seed": "x"}, "seed"),
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


def test_an_edit_with_something_that_is_not_an_image_is_refused(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="image"):
        client.images.edit(model="tiny-sd", image=("x.png", b"not a png at all", "image/png"), prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(model="tiny-sd", image=("x.png", b"x", "image/png"), mask=("m.png", b"m", "image/png"),
                           prompt=PROMPT)
