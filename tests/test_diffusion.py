"""The diffusion engine against diffusers' own pipelines, on tiny random pipelines made here:
for the same initial noise, prompts and schedule the images must match, and a seeded image must
not depend on what else was in the batch."""

import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pyserve.engine import load_engine  # noqa: E402
from pyserve.engine.diffusion import ImageRequest, initial_noise  # noqa: E402
from pyserve.kernels.rng import row_seed  # noqa: E402
from pyserve.kernels import rng  # noqa: E402

from tiny_models import make_ddpm_pipeline, make_sd_pipeline  # noqa: E402

CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
PROMPT = "a tiny red fox"


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd_dir(request, tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp(f"sd-{request.param}"), prediction_type=request.param)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return make_ddpm_pipeline(tmp_path_factory.mktemp("ddpm"))


def run(engine, requests: dict[str, ImageRequest], join_at: dict[str, int] | None = None) -> dict:
    """Run requests to the end; those in join_at are added only before that engine step."""
    join_at = join_at or {}
    for rid, req in requests.items():
        if rid not in join_at:
            engine.add(rid, req)
    images = {}
    for step in range(1000):
        for rid, at in join_at.items():
            if at == step:
                engine.add(rid, requests[rid])
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                images[out.request_id] = out.images
        if len(images) == len(requests):
            return images
    raise AssertionError("the engine did not finish")


def our_step_noise(seed: int, shape, first_step: int = 0):
    """The step noise the fused kernel draws for image `seed`, in diffusers' call order."""
    offsets = torch.arange(int(torch.Size(shape).numel()))
    calls = iter(range(first_step, 10_000))
    return lambda *a, **k: rng.normal(torch.tensor(seed), torch.tensor(next(calls)), offsets,
                                      rng.NOISE_STREAM).reshape(1, *shape)


def pipeline_for(model_dir, schedule: str, cls=None):
    pipe = (cls or diffusers.StableDiffusionPipeline).from_pretrained(model_dir)
    pipe.scheduler = getattr(diffusers, CLASSES[schedule]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("schedule", list(CLASSES))
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_text_to_image_matches_the_diffusers_pipeline(sd_dir, schedule, guidance, monkeypatch):
    engine = load_engine(sd_dir, device="cpu")
    steps, seed = 6, 11
    shape = (4, 8, 8)
    got = run(engine, {"r": ImageRequest(PROMPT, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                         scheduler=schedule)})["r"]
    pipe = pipeline_for(sd_dir, schedule)
    module = __import__(type(pipe.scheduler).__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", our_step_noise(seed, shape), raising=False)
    want = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                latents=initial_noise(seed, shape)[None]).images
    assert got.shape == want.shape == (1, 16, 16, 3)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=2e-4, rtol=2e-4)


def test_unconditional_matches_the_diffusers_pipeline(ddpm_dir, monkeypatch):
    engine = load_engine(ddpm_dir, device="cpu")
    steps, seed, shape = 5, 3, (3, 16, 16)
    got = run(engine, {"r": ImageRequest(num_inference_steps=steps, seed=seed)})["r"]
    pipe = diffusers.DDPMPipeline.from_pretrained(ddpm_dir)
    pipe.set_progress_bar_config(disable=True)
    import diffusers.pipelines.ddpm.pipeline_ddpm as pipeline_module
    import diffusers.schedulers.scheduling_ddpm as schedule_module
    monkeypatch.setattr(pipeline_module, "randn_tensor", lambda *a, **k: initial_noise(seed, shape)[None])
    monkeypatch.setattr(schedule_module, "randn_tensor", our_step_noise(seed, shape))
    want = pipe(num_inference_steps=steps, output_type="np").images
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("schedule", list(CLASSES))
def test_img2img_matches_the_diffusers_pipeline(sd_dir, schedule, monkeypatch):
    engine = load_engine(sd_dir, device="cpu")
    steps, seed, strength, shape = 8, 5, 0.6, (4, 8, 8)
    init = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = run(engine, {"r": ImageRequest(PROMPT, num_inference_steps=steps, guidance_scale=4.0, seed=seed,
                                         scheduler=schedule, init_image=init, strength=strength)})["r"]
    clean = engine.model.encode_image(init[None])
    pipe = pipeline_for(sd_dir, schedule, diffusers.StableDiffusionImg2ImgPipeline)
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as pipeline_module
    monkeypatch.setattr(pipeline_module, "randn_tensor", lambda *a, **k: initial_noise(seed, shape)[None])
    schedule_module = __import__(type(pipe.scheduler).__module__, fromlist=["randn_tensor"])
    begin = steps - int(steps * strength)  # the loop's first step: its noise has that step index
    monkeypatch.setattr(schedule_module, "randn_tensor", our_step_noise(seed, shape, begin), raising=False)
    want = pipe(PROMPT, image=clean, strength=strength, num_inference_steps=steps, guidance_scale=4.0,
                output_type="np").images
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=2e-4, rtol=2e-4)


def test_seeded_images_do_not_depend_on_the_batch_or_when_they_joined(sd_dir):
    requests = {
        "a": ImageRequest(PROMPT, num_inference_steps=7, guidance_scale=5.0, seed=1, scheduler="euler_a"),
        "b": ImageRequest("a blue bird", num_inference_steps=4, guidance_scale=1.0, seed=2, scheduler="ddim",
                          height=24, width=16),
        "c": ImageRequest("", num_inference_steps=5, guidance_scale=3.0, seed=3, scheduler="dpmpp_2m", n=2),
        "d": ImageRequest(PROMPT, num_inference_steps=6, guidance_scale=7.5, seed=4, scheduler="ddpm"),
    }
    engine = load_engine(sd_dir, device="cpu")
    alone = {rid: run(engine, {rid: req})[rid] for rid, req in requests.items()}
    together = run(engine, requests, join_at={"c": 2, "d": 3})
    for rid in requests:
        np.testing.assert_array_equal(together[rid], alone[rid], err_msg=f"request {rid}")
    assert together["b"].shape == (1, 24, 16, 3) and together["c"].shape == (2, 16, 16, 3)
    assert (together["c"][0] != together["c"][1]).any()  # n images of one request differ (seeds differ)
    assert row_seed(3, 0) != row_seed(3, 1)


def test_a_seeded_image_is_bit_identical_in_any_mix_of_requests(sd_dir):
    """Many random mixes: other sizes, guidance, n and arrival steps around one seeded image."""
    engine = load_engine(sd_dir, device="cpu", max_batch_size=6)
    target = ImageRequest(PROMPT, num_inference_steps=5, guidance_scale=4.0, seed=11, scheduler="euler_a")
    alone = run(engine, {"target": target})["target"]
    pick = random.Random(0)
    for trial in range(6):
        others = {f"o{i}": ImageRequest(pick.choice(["", "a blue bird", PROMPT]), n=pick.randint(1, 3),
                                        num_inference_steps=pick.randint(2, 6),
                                        guidance_scale=pick.choice([1.0, 3.0, 7.5]), seed=pick.randrange(1000),
                                        height=pick.choice([16, 24]), width=16)
                  for i in range(pick.randint(1, 4))}
        join_at = {rid: pick.randint(0, 3) for rid in [*others, "target"] if pick.random() < 0.5}
        got = run(engine, {**others, "target": target}, join_at=join_at)["target"]
        np.testing.assert_array_equal(got, alone, err_msg=f"trial {trial}")


def test_a_small_request_beside_a_large_one_runs_between_its_calls(sd_dir):
    """The fair share: a 4-step request that joins a large one's loop runs all its steps before
    the large request's next model call, which takes as long as the whole small request. Time is
    a clock that each denoiser call advances by its latent positions, so the test does not
    depend on this machine's speed."""
    now = [0.0]
    engine = load_engine(sd_dir, device="cpu", max_image_cost=10**8, clock=lambda: now[0])
    denoise = engine.model.denoise

    def timed(latents, timesteps, conditioning):
        now[0] += latents.shape[0] * latents.shape[-1] * latents.shape[-2]
        return denoise(latents, timesteps, conditioning)
    engine.model.denoise = timed
    engine.add("large", ImageRequest(PROMPT, num_inference_steps=30, height=128, width=128, seed=1))
    for _ in range(5):
        engine.step()
    engine.add("small", ImageRequest(PROMPT, num_inference_steps=4, seed=2))  # one 8x8 latent, guided
    calls_before = now[0]
    while "small" in engine.requests:
        engine.step()
    large_calls = (now[0] - calls_before - 4 * 16 * 64) / (64 * 64)
    assert large_calls == 0
    assert engine.requests["large"].progress >= 2  # and the large one goes on


def test_bad_requests_name_the_field(sd_dir, ddpm_dir):
    from pyserve.errors import InvalidParameter
    engine = load_engine(sd_dir, device="cpu")
    cases = [(dict(height=20), "height"), (dict(width=4096), "width"), (dict(num_inference_steps=0), "num_inference_steps"),
             (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(scheduler="lms"), "scheduler"),
             (dict(n=0), "n"), (dict(seed=2**70), "seed"), (dict(init_image=torch.rand(3, 16, 16), strength=0.01),
                                                             "strength")]
    for fields, name in cases:
        with pytest.raises(InvalidParameter, match=name):
            engine.add("x", ImageRequest(PROMPT, **fields))
    with pytest.raises(InvalidParameter, match="prompt"):
        load_engine(ddpm_dir, device="cpu").add("x", ImageRequest("a prompt"))
    assert not engine.has_unfinished()


def test_abort_frees_the_slot_at_once(sd_dir):
    engine = load_engine(sd_dir, device="cpu", max_batch_size=1)
    engine.add("long", ImageRequest(PROMPT, num_inference_steps=50, seed=1))
    engine.add("next", ImageRequest(PROMPT, num_inference_steps=2, seed=2))
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    engine.abort("long")
    outs = [o for _ in range(3) for o in engine.step()]
    assert [o.request_id for o in outs if o.finished] == ["next"]
    assert not engine.has_unfinished()


def test_an_init_image_of_any_size_defaults_to_the_nearest_size_below(sd_dir):
    engine = load_engine(sd_dir, device="cpu")
    init = torch.rand(3, 20, 29)
    out = run(engine, {"r": ImageRequest(PROMPT, num_inference_steps=2, seed=1, init_image=init, strength=1.0)})["r"]
    assert out.shape == (1, 16, 24, 3)


def test_the_denoiser_runs_traced_per_latent_size_and_a_bad_trace_stays_eager(sd_dir, caplog):
    import plugins.diffusion.traced as traced

    engine = load_engine(sd_dir, device="cpu")
    model = engine.model
    cond = torch.randn(3, 32, model.text_encoder.config.hidden_size)
    t = torch.tensor([900.0, 500.0, 20.0])
    for size in ((8, 8), (12, 8)):
        x = torch.randn(3, 4, *size)
        with torch.inference_mode():
            want = model.unet(x, t, encoder_hidden_states=cond).sample
            first, again = model.denoise(x, t, cond), model.denoise(x[:2], t[:2], cond[:2])
        torch.testing.assert_close(first, want)
        torch.testing.assert_close(again, want[:2], atol=1e-5, rtol=1e-5)  # the trace, at another batch size
    assert len(model.traced.traces) == 2 and all(model.traced.traces.values())

    model.traced = traced.TracedDenoiser(model.unet)
    caplog.set_level("WARNING", logger="pyserve.diffusion")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(traced, "TOLERANCE", -1.0)  # no trace can pass the check
        with torch.inference_mode():
            got = model.denoise(x, t, cond), model.denoise(x, t, cond)
    assert list(model.traced.traces.values()) == [None]
    assert "stays eager" in caplog.text and caplog.text.count("\n") == 1
    torch.testing.assert_close(got[1], want)
