"""The GAN plugin through the batch engine and the servers: outputs equal the generator module
run directly, seeded items do not depend on their batch, bad inputs name the input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pyserve.engine import EngineDriver, load_engine, run_engine
from pyserve.engine.batch import TensorRequest
from pyserve.errors import InvalidParameter
from pyserve.protocol import tensor_from_wire
from pyserve.server import start_in_thread

from tiny_models import make_gan


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory):
    return make_gan(tmp_path_factory.mktemp("gan"))


def reference_images(gan_dir, seeds, labels) -> np.ndarray:
    """The generator module itself (eval mode), on latents drawn from each seed."""
    from plugins.gan.model import DCGANGenerator, latents
    cfg = json.loads((gan_dir / "config.json").read_text())
    module = DCGANGenerator(cfg["latent_dim"], cfg["image_size"], cfg["channels"], cfg["base_channels"],
                            cfg["num_classes"])
    module.load_state_dict(load_file(gan_dir / "model.safetensors"))
    with torch.no_grad():
        x = module.eval()(latents(torch.tensor(seeds), cfg["latent_dim"]), torch.tensor(labels))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()



def test_images_match_the_module_and_do_not_depend_on_the_batch(gan_dir):
    engine = load_engine(gan_dir, device="cpu")
    seeds, labels = [3, 1, 4, 1, 5], [7, 0, 2, 9, 7]
    batched = run_engine(engine, {f"r{i}": TensorRequest({"seed": np.array([s]), "class_label": np.array([c])})
                           for i, (s, c) in enumerate(zip(seeds, labels))})
    alone = run_engine(engine, {"r0": TensorRequest({"seed": np.array([3]), "class_label": np.array([7])})})
    want = reference_images(gan_dir, seeds, labels)
    got = np.concatenate([batched[f"r{i}"].outputs["images"] for i in range(5)])
    assert got.shape == (5, 16, 16, 1) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    np.testing.assert_array_equal(alone["r0"].outputs["images"], batched["r0"].outputs["images"])
    assert not np.array_equal(got[0], got[2])  # different seeds and classes differ


@pytest.mark.parametrize("inputs,field", [
    ({"seed": np.array([1]), "class_label": np.array([10])}, "class_label"),
    ({"seed": np.array([1.0]), "class_label": np.array([1])}, "seed"),
    ({"seed": np.array([[1]]), "class_label": np.array([1])}, "seed"),
    ({"seed": np.array([1])}, "class_label"),
])
def test_bad_inputs_name_the_input(gan_dir, inputs, field):
    with pytest.raises(InvalidParameter, match=field):
        load_engine(gan_dir, device="cpu").add("r", TensorRequest(inputs))


def test_served_over_kserve_and_msgpack(gan_dir):
    import tritonclient.http as triton
    from pyserve.client import Client
    server = start_in_thread({"gan": EngineDriver(load_engine(gan_dir, device="cpu"))})
    try:
        want = reference_images(gan_dir, [11, 12], [1, 2])
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        meta = client.get_model_metadata("gan")
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("seed", "INT64", [-1]), ("class_label", "INT64", [-1])]
        assert meta["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 16, 16, 1]}]
        seed, label = triton.InferInput("seed", [2], "INT64"), triton.InferInput("class_label", [2], "INT64")
        seed.set_data_from_numpy(np.array([11, 12], dtype=np.int64))
        label.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        for binary in (False, True):
            got = client.infer("gan", [seed, label], outputs=[triton.InferRequestedOutput("images", binary_data=binary)])
            assert np.abs(got.as_numpy("images").astype(int) - want.astype(int)).max() <= 1
        bad = triton.InferInput("class_label", [2], "INT64")
        bad.set_data_from_numpy(np.array([1, 99], dtype=np.int64))
        with pytest.raises(Exception, match="class_label"):
            client.infer("gan", [seed, bad])
        client.close()
        with Client("127.0.0.1", server.msgpack_port) as c:
            result = c.infer("gan", {"seed": np.array([11, 12], dtype=np.int64),
                                     "class_label": np.array([1, 2], dtype=np.int64)})
        images = result["outputs"]["images"]
        array = tensor_from_wire(images)
        assert np.abs(array.astype(int) - want.astype(int)).max() <= 1

        # Triton's config and statistics routes, as tritonclient reads them
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        config = client.get_model_config("gan")
        assert config["max_batch_size"] == 16  # the model directory's batching
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
            ("seed", "TYPE_INT64", []), ("class_label", "TYPE_INT64", [])]
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("images", "TYPE_UINT8", [16, 16, 1])]
        stats = client.get_inference_statistics("gan")["model_stats"]
        assert [s["name"] for s in stats] == ["gan"]
        assert stats[0]["inference_count"] == 3  # two over KServe and one over msgpack; the refused one never ran
        assert stats[0]["execution_count"] >= 1 and stats[0]["inference_stats"]["success"]["ns"] > 0
        assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == ["gan"]
        with pytest.raises(triton.InferenceServerException, match="nope"):
            client.get_model_config("nope")
        client.close()
    finally:
        server.stop()


def test_the_images_api_draws_the_class_the_prompt_names(gan_dir):
    import base64
    import io

    import openai
    from PIL import Image

    from pyserve.kernels.rng import row_seed
    server = start_in_thread({"gan": EngineDriver(load_engine(gan_dir, device="cpu"))})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        resp = client.images.generate(model="gan", prompt="the digit seven", n=3, extra_body={"seed": 5})
        got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in resp.data])
        want = reference_images(gan_dir, [row_seed(5, i) for i in range(3)], [7, 7, 7])[..., 0]
        assert got.shape == (3, 16, 16) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
        by_label = client.images.generate(model="gan", prompt="", n=1, extra_body={"seed": 5, "class_label": 7})
        assert by_label.data[0].b64_json == resp.data[0].b64_json
        for kwargs, field in ((dict(prompt="a cat"), "prompt"), (dict(prompt="seven", stream=True), "stream"),
                              (dict(prompt="", extra_body={"class_label": 12}), "class_label")):
            with pytest.raises(openai.BadRequestError, match=field):
                client.images.generate(model="gan", **kwargs)
        from pyserve.client import Client
        with Client("127.0.0.1", server.msgpack_port) as c:  # msgpack's images method, as the images API
            pngs = c.generate_images("gan", "the digit seven", n=3, seed=5)
        assert [np.asarray(Image.open(io.BytesIO(png))).tolist() for png in pngs.images] == got.tolist()
        assert pngs.seeds == [row_seed(5, i) for i in range(3)]  # each image's seed, as diffusion reports them
    finally:
        server.stop()


def test_command_line_batching_flags_override_the_config(gan_dir):
    """--max-queue-size 1 on the command line: a two-item request no longer fits the queue."""
    import tritonclient.http as triton
    from conftest import cli_server
    with cli_server(gan_dir, "--max-queue-size", "1", "--max-batch-size", "1") as (proc, url, _):
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        seed, label = triton.InferInput("seed", [2], "INT64"), triton.InferInput("class_label", [2], "INT64")
        seed.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        label.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        with pytest.raises(triton.InferenceServerException, match="exceed the queue.s 1"):  # never fits: 413
            client.infer("tiny", [seed, label])
        seed.set_shape([1]), label.set_shape([1])
        seed.set_data_from_numpy(np.array([1], dtype=np.int64))
        label.set_data_from_numpy(np.array([1], dtype=np.int64))
        assert client.infer("tiny", [seed, label]).as_numpy("images").shape == (1, 16, 16, 1)
        client.close()
