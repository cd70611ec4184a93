"""Vision-language chat (LLaVA-style): image preprocessing, prompt logits and greedy tokens
against transformers, chunked prefill through an image, the prefix cache keyed by image."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyserve import LLM, SamplingParams
from pyserve.tasks import ImageInput

from tiny_models import make_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def reference(llava_dir):
    import transformers
    return transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, torch_dtype=torch.float32).eval()


def picture(seed: int, size=(41, 53)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_input(llm, image) -> ImageInput:
    return ImageInput(llm.engine.info.vision.preprocess(image), hashlib.sha256(image.tobytes()).hexdigest())


def chat_ids(llm, n_images: int, text="What is in the picture?") -> list[int]:
    """The chat prompt with each <image> token expanded to the image's feature count."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    ids = llm.engine.tokenizer.encode_chat([{"role": "user", "content": content}])
    vision = llm.engine.info.vision
    return [t for i in ids for t in ([i] * vision.tokens_per_image if i == vision.image_token_id else [i])]


def test_preprocessing_matches_the_clip_processor(llava_dir):
    import transformers
    llm = LLM(llava_dir, device="cpu")
    theirs = transformers.CLIPImageProcessor.from_pretrained(llava_dir)
    for image in (picture(0), picture(1, (30, 30)), picture(2, (90, 31)), picture(3).convert("L")):
        want = theirs(image, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(llm.engine.info.vision.preprocess(image), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 7, "block_size": 4}],
                         ids=["one-step", "chunked-through-images"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_greedy_tokens_match_transformers(llava_dir, reference, engine_args, n_images):
    llm = LLM(llava_dir, device="cpu", **engine_args)
    images = [picture(10 + k) for k in range(n_images)]
    ids = chat_ids(llm, n_images)
    pixels = torch.stack([image_input(llm, im).pixels for im in images])
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
        want_tokens = reference.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8,
                                         min_new_tokens=8, do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
    want = torch.log_softmax(logits, -1)
    for attempt in range(2):  # the second finds the prompt, images included, in the prefix cache
        llm.engine.add_request(f"r{attempt}", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                  prompt_logprobs=0),
                               images=[image_input(llm, im) for im in images])
        outs = [o for _ in range(100) for o in llm.engine.step() if o.finished]
        out = outs[0]
        got = torch.tensor([e["logprob"] for e in out.prompt_logprobs[1:]])
        torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        assert out.outputs[0].token_ids == want_tokens
    from pyserve.errors import InvalidParameter
    with pytest.raises(InvalidParameter, match="image tokens"):  # placeholders without their images
        llm.generate(ids, SamplingParams(max_tokens=8))


def test_a_last_chunk_of_one_image_token_takes_the_image(llava_dir, reference):
    """A prompt that ends inside its image, chunked so that the last step brings one image token:
    that step looks like a decode step but must read the image's features, not the token's."""
    probe = LLM(llava_dir, device="cpu")
    vision = probe.engine.info.vision
    ids = chat_ids(probe, 1)
    ids = ids[:max(i for i, t in enumerate(ids) if t == vision.image_token_id) + 1]  # up to the image's end
    llm = LLM(llava_dir, device="cpu", max_num_batched_tokens=len(ids) - 1)
    image = picture(21)
    pixels = image_input(llm, image).pixels[None]
    with torch.no_grad():
        want = reference.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
    llm.engine.add_request("r", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           images=[image_input(llm, image)])
    outs = [o for _ in range(100) for o in llm.engine.step() if o.finished]
    assert outs[0].outputs[0].token_ids == want


def test_other_feature_layers_and_the_full_strategy(tmp_path):
    """vision_feature_layer -1 and "full" (the class token kept: one more token per image)."""
    import transformers
    model_dir = make_llava(tmp_path / "full", seed=3, feature_layer=-1, strategy="full")
    llm = LLM(model_dir, device="cpu")
    assert llm.engine.info.vision.tokens_per_image == 26
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    image = picture(40)
    ids = chat_ids(llm, 1)
    with torch.no_grad():
        want = reference.generate(input_ids=torch.tensor([ids]), pixel_values=image_input(llm, image).pixels[None],
                                  max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
    llm.engine.add_request("f", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           images=[image_input(llm, image)])
    done = [o for _ in range(50) for o in llm.engine.step() if o.finished][0]
    assert done.token_ids == want[0, len(ids):].tolist()


def test_the_prefix_cache_never_mixes_images_and_batches_keep_them_apart(llava_dir, reference):
    llm = LLM(llava_dir, device="cpu")
    ids = chat_ids(llm, 1)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def run(images_per_request):
        for r, image in enumerate(images_per_request):
            llm.engine.add_request(f"q{r}-{id(image)}", ids, params, images=[image_input(llm, image)])
        finished = {}
        while llm.engine.has_unfinished():
            finished.update({o.request_id: o for o in llm.engine.step() if o.finished})
        return [finished[k] for k in sorted(finished)]

    a, b = picture(20), picture(21)
    alone_a, alone_b = run([a])[0], run([b])[0]
    assert alone_b.num_cached_tokens == 0  # another image: nothing reused past the shared root
    again_a = run([a])[0]
    assert again_a.num_cached_tokens > 0 and again_a.token_ids == alone_a.token_ids
    with torch.no_grad():  # and both are what transformers generates for that image
        want = reference.generate(input_ids=torch.tensor([ids]), pixel_values=image_input(llm, a).pixels[None],
                                  max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
    assert again_a.token_ids == want[0, len(ids):].tolist()
    together = run([a, b])
    assert sorted(o.token_ids for o in together) == sorted([alone_a.token_ids, alone_b.token_ids])
    assert alone_a.token_ids != alone_b.token_ids  # the image matters


def test_image_count_must_match_the_prompt(llava_dir):
    from pyserve.errors import InvalidParameter
    llm = LLM(llava_dir, device="cpu")
    with pytest.raises(InvalidParameter, match="need 50 image tokens"):
        llm.engine.add_request("x", chat_ids(llm, 1), SamplingParams(), images=[image_input(llm, picture(1))] * 2)
    assert not llm.engine.has_unfinished()


# -- through the servers ---------------------------------------------------------------------------

def data_url(image: Image.Image, fmt="PNG") -> str:
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(llava_dir):
    from conftest import serving
    with serving(llava_dir, allowed_image_hosts=frozenset({"127.0.0.1"})) as running:
        yield running


@pytest.fixture
def client(served):
    import openai
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(llava_dir):
    """Expected outputs: a second engine (the served one belongs to the server's thread)."""
    return LLM(llava_dir, device="cpu")


def test_openai_sdk_sends_images_plain_and_streaming(client, offline):
    llm = offline
    image = picture(30)
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
               {"type": "text", "text": "What is in the picture?"}]
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          max_tokens=8, temperature=0)
    import io
    png = io.BytesIO()
    image.save(png, format="PNG")
    decoded = Image.open(io.BytesIO(png.getvalue()))
    want = llm.engine
    want_ids = chat_ids(llm, 1)
    llm.engine.add_request("offline", want_ids, SamplingParams(max_tokens=8, temperature=0),
                           images=[ImageInput(llm.engine.info.vision.preprocess(decoded), "x")])
    done = [o for _ in range(100) for o in want.step() if o.finished][0]
    assert resp.choices[0].message.content == done.text
    assert resp.usage.prompt_tokens == len(want_ids)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, stream=True)
        if c.choices)
    assert streamed == done.text
    jpeg = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture(31), "JPEG")}}, {"type": "text", "text": "x"}]}])
    assert jpeg.choices[0].finish_reason in ("stop", "length")


def test_images_from_allowed_hosts_only(client, tmp_path):
    import functools
    import http.server
    import threading
    picture(32).save(tmp_path / "p.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/p.png"
        resp = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}])
        assert resp.choices[0].finish_reason in ("stop", "length")
        import openai
        with pytest.raises(openai.BadRequestError, match="not allowed"):
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url.replace("127.0.0.1", "localhost")}}]}])
    finally:
        httpd.shutdown()


class HostileImageHost:
    """A local host with /redirect (to the same path on `localhost`, which the server does not
    allow) and /slow (headers, then a byte a second)."""

    def __init__(self):
        import http.server
        import threading
        import time
        self.paths = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.paths.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/secret")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(30):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:  # the server hung up: what this host is for
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def test_remote_images_cannot_redirect_elsewhere_or_trickle(client, monkeypatch):
    """A redirect from an allowed host to another is refused at the hop; a host that trickles is cut
    off at the fetch deadline; six such fetches leave string-prompt completions (tokenized in
    the event loop's default pool) answering meanwhile."""
    import concurrent.futures

    import openai

    from pyserve.server import vision_inputs
    monkeypatch.setattr(vision_inputs, "FETCH_DEADLINE_S", 3.0)
    host = HostileImageHost()

    def ask(path: str):
        return client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": host.url + path}}, {"type": "text", "text": "x"}]}])
    try:
        with pytest.raises(openai.BadRequestError, match="not allowed"):
            ask("/redirect")
        assert host.paths == ["/redirect"]  # the redirect's target was never asked for
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(ask, "/slow") for _ in range(6)]
            done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=2)
            assert done.choices[0].finish_reason in ("stop", "length")
            assert not all(f.done() for f in slow)  # the completion did not wait for them
            for f in slow:
                with pytest.raises(openai.BadRequestError, match="did not arrive within 3 s"):
                    f.result()
    finally:
        host.httpd.shutdown()


@pytest.mark.parametrize("part,field", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, "messages[0].content[0]"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "messages[0].content[0]"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/x.png"}}, "messages[0].content[0]"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, "messages[0].content[0]"),
    ({"type": "image_url"}, "messages[0].content[0]"),
])
def test_bad_images_get_400_naming_the_part(client, part, field):
    import openai
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [part]}])
    assert field in err.value.message


def test_too_many_images_and_images_for_text_models(client, tiny_llama_dir):
    import openai
    many = [{"type": "image_url", "image_url": {"url": data_url(picture(1, (8, 8)))}}] * 9
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": many}])
    from conftest import serving
    with serving(tiny_llama_dir) as (server, _):
        text = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="does not read images"):
            text.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": many[:1]}])


def test_msgpack_chat_takes_image_bytes(served, offline):
    import io
    from pyserve.client import Client
    server, llm = served[0], offline
    buf = io.BytesIO()
    picture(33).save(buf, format="PNG")
    with Client("127.0.0.1", server.msgpack_port) as c:
        out = c.chat("tiny", [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()},
                                                           {"type": "text", "text": "What?"}]}],
                     max_tokens=6, temperature=0)
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    want = llm.engine
    want.add_request("mp", chat_ids(llm, 1, "What?"), SamplingParams(max_tokens=6, temperature=0),
                     images=[ImageInput(want.info.vision.preprocess(decoded), "y")])
    done = [o for _ in range(100) for o in want.step() if o.finished][0]
    assert out.text == done.text


def test_tools_and_images_in_one_conversation(client):
    """A template without tools gets them in the system turn, next to image parts."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}}]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(50))}},
                                             {"type": "text", "text": "Call f"}]}]
    resp = client.chat.completions.create(model="tiny", messages=messages, tools=tools, tool_choice="required",
                                          max_tokens=60, temperature=0, parallel_tool_calls=False)
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "f" and json.loads(call.function.arguments)["n"] in (1, 2)
