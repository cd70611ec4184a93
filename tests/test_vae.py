"""The VAE plugin: encode, decode and sample through the batch engine match diffusers'
AutoencoderKL run directly; the operation follows from the inputs sent; bad inputs name the input;
the three operations over KServe V2 and msgpack."""

import numpy as np
import pytest
import torch

from pyserve.engine import EngineDriver, load_engine, run_engine
from pyserve.engine.batch import TensorRequest
from pyserve.errors import InvalidParameter
from pyserve.kernels import rng
from pyserve.protocol import tensor_from_wire
from pyserve.server import start_in_thread

from tiny_models import make_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def reference(vae_dir):
    import diffusers
    return diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()


def pixels(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def images(n: int, side: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_encode_decode_and_sample_match_diffusers(vae_dir, reference):
    engine = load_engine(vae_dir, device="cpu")
    pictures, latents = images(3), np.random.default_rng(1).normal(size=(2, 4, 4, 6)).astype(np.float32)
    out = run_engine(engine, {"enc": TensorRequest({"images": pictures}),
                              "dec": TensorRequest({"latents": latents}),
                              "sam": TensorRequest({"seed": np.array([5, 6])})})
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
        decoded = pixels(reference.decode(torch.from_numpy(latents)).sample)
        z = rng.seeded_normal(torch.tensor([5, 6]), 4 * 4 * 4, rng.VAE_LATENT_STREAM).view(2, 4, 4, 4)
        sampled = pixels(reference.decode(z).sample)
    torch.testing.assert_close(torch.from_numpy(out["enc"].outputs["latents"]), posterior.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(out["enc"].outputs["latent_std"]), posterior.std, atol=1e-4, rtol=1e-4)
    assert out["dec"].outputs["images"].shape == (2, 16, 24, 3)
    assert np.abs(out["dec"].outputs["images"].astype(int) - decoded.astype(int)).max() <= 1
    assert np.abs(out["sam"].outputs["images"].astype(int) - sampled.astype(int)).max() <= 1
    alone = run_engine(engine, {"one": TensorRequest({"seed": np.array([6])})})["one"].outputs["images"]
    np.testing.assert_array_equal(alone[0], out["sam"].outputs["images"][1])  # seeded: batch-invariant


@pytest.mark.parametrize("request_,field", [
    (TensorRequest({"images": images(1, side=14)}), "images"),  # not a multiple of the factor, 4
    (TensorRequest({"images": images(1)[..., :1]}), "images"),  # one channel
    (TensorRequest({"latents": np.full((1, 4, 2, 2), np.nan, np.float32)}), "latents"),
    (TensorRequest({"latents": np.zeros((1, 3, 2, 2), np.float32)}), "latents"),  # 3 channels, not 4
    (TensorRequest({"seed": np.array([1]), "latents": np.zeros((1, 4, 2, 2), np.float32)}), "inputs"),
    (TensorRequest({"seed": np.array([1])}, operation="morph"), "operation"),
    (TensorRequest({"seed": np.array([1])}, operation="decode"), "latents"),
])
def test_bad_inputs_name_the_input(vae_dir, request_, field):
    with pytest.raises(InvalidParameter, match=field):
        load_engine(vae_dir, device="cpu").add("r", request_)


def test_operations_over_kserve_and_msgpack(vae_dir):
    import tritonclient.http as triton
    from pyserve.client import Client
    server = start_in_thread({"vae": EngineDriver(load_engine(vae_dir, device="cpu"))})
    try:
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        meta = client.get_model_metadata("vae")
        assert [op["name"] for op in meta["operations"]] == ["encode", "decode", "sample"]
        assert {t["name"] for t in meta["inputs"]} == {"images", "latents", "seed"}
        assert all(t["optional"] for t in meta["inputs"])
        picture = triton.InferInput("images", [1, 16, 16, 3], "UINT8")
        picture.set_data_from_numpy(images(1))
        encoded = client.infer("vae", [picture])
        assert encoded.as_numpy("latents").shape == (1, 4, 4, 4)
        latents = triton.InferInput("latents", [1, 4, 4, 4], "FP32")
        latents.set_data_from_numpy(encoded.as_numpy("latents"))
        decoded = client.infer("vae", [latents]).as_numpy("images")
        assert decoded.shape == (1, 16, 16, 3) and decoded.dtype == np.uint8
        with pytest.raises(triton.InferenceServerException, match="operation"):
            client.infer("vae", [latents], parameters={"operation": "morph"})

        with Client("127.0.0.1", server.msgpack_port) as c:
            got = tensor_from_wire(c.infer("vae", {"seed": np.array([5, 6])})["outputs"]["images"])
            assert got.shape == (2, 16, 16, 3)
            again = tensor_from_wire(c.infer("vae", {"seed": np.array([6])})["outputs"]["images"])
            np.testing.assert_array_equal(again[0], got[1])
        # The sample operation is an image producer, so the images API serves it too.
        import openai
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert len(client.images.generate(model="vae", prompt="", n=2, extra_body={"seed": 3}).data) == 2
    finally:
        server.stop()
