"""Fused denoising steps on every back-end against diffusers' own schedulers' `step()`."""

import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pyserve import kernels  # noqa: E402
from pyserve.engine.diffusion import noise_schedules as schedules  # noqa: E402
from pyserve.kernels import reference, rng  # noqa: E402

from conftest import backend_params  # noqa: E402

BACKENDS = backend_params()

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False, steps_offset=1, set_alpha_to_one=False)
DEFAULT = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True)

CASES = [  # (ours, diffusers class, config, extra step kwargs)
    ("ddpm", "DDPMScheduler", DEFAULT, {}),
    ("ddpm", "DDPMScheduler", {**SD, "prediction_type": "v_prediction"}, {}),
    ("ddim", "DDIMScheduler", SD, {}),
    ("ddim", "DDIMScheduler", {**DEFAULT, "prediction_type": "v_prediction"}, {"eta": 0.7}),
    ("euler", "EulerDiscreteScheduler", {**SD, "timestep_spacing": "linspace"}, {}),
    ("euler", "EulerDiscreteScheduler", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "linspace"}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**SD, "timestep_spacing": "linspace"}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**SD, "prediction_type": "v_prediction",
                                                  "timestep_spacing": "leading"}, {}),
]
SHAPE = (2, 4, 8, 8)
SEEDS = torch.tensor([11, 12])


def ours_for(name, config, steps, eta):
    cls = schedules.NOISE_SCHEDULES[name]
    return cls(config, steps, eta=eta) if name == "ddim" else cls(config, steps)


def our_noise(step):
    offsets = torch.arange(SHAPE[1] * SHAPE[2] * SHAPE[3])[None, :]
    z = rng.normal(SEEDS[:, None], torch.full((2, 1), step), offsets, rng.NOISE_STREAM)
    return z.reshape(SHAPE)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2].get('prediction_type', 'epsilon')}")
def test_steps_match_diffusers(backend, device, case, monkeypatch):
    name, cls_name, config, step_kwargs = case
    steps = 8
    theirs = getattr(diffusers, cls_name).from_config(config)
    theirs.set_timesteps(steps)
    ours = ours_for(name, config, steps, step_kwargs.get("eta", 0.0))
    torch.testing.assert_close(torch.as_tensor(ours.timesteps).to(theirs.timesteps.dtype), theirs.timesteps)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * (float(theirs.init_noise_sigma))
    prev_x0 = None
    for i, t in enumerate(theirs.timesteps):
        out = torch.randn(SHAPE, generator=g)
        z = our_noise(i)
        module = __import__(type(theirs).__module__, fromlist=["randn_tensor"])
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: z.clone(), raising=False)
        kwargs = dict(step_kwargs)
        if name == "ddim" and "eta" in kwargs:
            kwargs["variance_noise"] = z
        want = theirs.step(out, t, x, **kwargs).prev_sample

        coef = torch.tensor([ours.coefficients(i)] * 2)
        step = torch.full((2,), i)
        got, x0 = kernels.denoise_step(x.to(device), out.to(device), coef.to(device), SEEDS.to(device),
                                       step.to(device), prev_x0=None if prev_x0 is None else prev_x0.to(device),
                                       backend=backend)
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4, msg=f"step {i}")
        x, prev_x0 = want, x0.cpu()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_guidance_and_mixed_rows_in_one_launch(backend, device):
    """Rows at different timesteps, with different schedulers and guidance, in one call."""
    cfg = dict(SD, timestep_spacing="linspace")
    rows = [("ddim", 0, 7.5), ("euler_a", 3, 1.0), ("ddpm", 5, 3.0), ("dpmpp_2m", 6, 5.0)]
    g = torch.Generator().manual_seed(1)
    batch = len(rows)
    x, cond, uncond, prev = (torch.randn(batch, 4, 6, 6, generator=g) for _ in range(4))
    coef = torch.tensor([ours_for(n, cfg, 10, 0.0).coefficients(i, guidance=w) for n, i, w in rows])
    seed, step = torch.arange(batch) + 5, torch.tensor([i for _, i, _ in rows])
    got = kernels.denoise_step(*(t.to(device) for t in (x, cond, coef, seed, step)), uncond=uncond.to(device),
                               prev_x0=prev.to(device), backend=backend)
    for r in range(batch):
        one = reference.denoise_step(x[r:r + 1], cond[r:r + 1], uncond[r:r + 1], prev[r:r + 1], coef[r:r + 1],
                                     seed[r:r + 1], step[r:r + 1])
        torch.testing.assert_close(got[0][r:r + 1].cpu(), one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1][r:r + 1].cpu(), one[1], atol=1e-5, rtol=1e-5)
    # Guidance itself: the guided output equals the step on uncond + w * (cond - uncond).
    guided = uncond + 7.5 * (cond - uncond)
    plain = reference.denoise_step(x[:1], guided[:1], None, prev[:1], coef[:1], seed[:1], step[:1])
    torch.testing.assert_close(got[0][:1].cpu(), plain[0], atol=1e-4, rtol=1e-4)


def test_noise_is_standard_normal():
    z = rng.normal(torch.tensor(3), torch.tensor(0), torch.arange(200_000), rng.NOISE_STREAM)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    from scipy import stats
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_denoise_rejects_bad_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(kernels.KernelInputError, match="coef"):
        kernels.denoise_step(x, x, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(kernels.KernelInputError, match="uncond"):
        kernels.denoise_step(x, x, torch.zeros(2, kernels.Coef.COUNT), torch.zeros(2, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long), uncond=torch.randn(3, 4))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_channels_last_latents_match_the_reference(backend, device):
    g = torch.Generator().manual_seed(4)
    x, cond, uncond = (torch.randn(2, 4, 6, 6, generator=g).to(memory_format=torch.channels_last) for _ in range(3))
    assert not x.is_contiguous()
    coef = torch.rand(2, kernels.Coef.COUNT, generator=g)
    coef[:, kernels.Coef.CLIP] = 0.0
    seed, step = torch.tensor([1, 2]), torch.tensor([0, 3])
    want = reference.denoise_step(x.contiguous(), cond.contiguous(), uncond.contiguous(), None, coef, seed, step)
    got = kernels.denoise_step(*(t.to(device) for t in (x, cond, coef, seed, step)), uncond=uncond.to(device),
                               backend=backend)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_.cpu().contiguous(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noise_has_no_nan_near_u1_equal_one(backend, device):
    """Many draws (2^22 per call here; 1e8 in the GPU suite) and not one NaN: the Box-Muller radius
    is clamped, since a fast-math log can come out just above 0 when u1 is 1."""
    numel = 2**22 if device == "cpu" and backend == "cpu" else 2**18
    x = torch.zeros(1, numel)
    coef = torch.zeros(1, kernels.Coef.COUNT)
    coef[0, kernels.Coef.NOISE] = 1.0
    z, _ = kernels.denoise_step(*(t.to(device) for t in (x, x, coef, torch.tensor([7]), torch.tensor([1]))),
                                backend=backend)
    assert not torch.isnan(z).any() and torch.isfinite(z).all()
    assert abs(float(z.std()) - 1) < 0.01


def test_every_back_end_reads_the_coefficient_columns_python_defines():
    """pyserve.kernels.types.Coef is the one definition; the C++ and CUDA kernels share
    csrc/denoise_coef.h, which each extension exports: a column moved on one side fails here."""
    from pyserve.kernels.types import Coef
    assert len(Coef.layout()) == Coef.COUNT + 1 and sorted(Coef.layout().values()) == list(range(Coef.COUNT + 1))
    extensions = []
    for name in ("_C", "_C_cuda"):
        try:
            extensions.append(importlib.import_module(f"pyserve.{name}"))
        except ImportError:
            continue  # not built here (CUDA needs nvcc)
    assert extensions, "the CPU extension is always built"
    for extension in extensions:
        assert extension.DENOISE_COEF == Coef.layout(), extension.__name__
