"""The diffusion engine: step-level batching of denoising loops.

Every image of every request is a row with its own latents, noise schedule, step index, seed and
previous x0. Running rows are grouped by latent shape; each engine step advances the group that
the fair share picks (`batching`): the denoiser over its rows (unconditional rows of guided
images alongside) in calls of a size fixed by the shape, then one fused `denoise_step` with each
row's coefficients. New requests join at the next step and finished images leave at once,
decoded together. All randomness is Philox keyed by the image's seed (initial noise on its own
stream, step noise by step index), and every model call has the same rows whatever the load, so
an image is bit-identical alone, in any batch, and whenever it joined.

Example:
    engine = DiffusionEngine(model)
    engine.add("r1", ImageRequest("a red fox", num_inference_steps=20, seed=7))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                images = out.images  # [1, H, W, 3] float32 in [0, 1]
"""

import logging
import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ... import kernels
from ...errors import EngineUnavailable, InvalidParameter
from ...kernels import rng
from ...tasks import IMAGE_GENERATION, ImageGenerationModel
from ..base import EngineInfo, EngineStats, RequestTimes
from .batching import chunks, rows_per_call, run_in_chunks
from .noise_schedules import NOISE_SCHEDULES, NoiseSchedule
from .requests import ImageOutput, ImageRequest

log = logging.getLogger("pyserve.engine")

def initial_noise(seed: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit Gaussian latents of one image, from its seed alone."""
    seeds = torch.tensor([seed], device=device)
    return rng.seeded_normal(seeds, int(torch.Size(shape).numel()), rng.DIFFUSION_LATENT_STREAM).reshape(shape)


@dataclass
class _Image:
    """One image's denoising loop."""

    request_id: str
    index: int
    seed: int
    schedule: NoiseSchedule
    latents: torch.Tensor  # [C, h, w] fp32
    guidance: float
    step: int  # the next step to run
    prev_x0: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps

    @property
    def work(self) -> int:
        """Its share of a call, for the fair share: latent positions, twice when guided."""
        return self.latents.shape[-1] * self.latents.shape[-2] * (2 if self.guidance > 1.0 else 1)


@dataclass
class _Request:
    request_id: str
    request: ImageRequest
    images: list[_Image]
    conditioning: torch.Tensor | None  # [2, ...]: (negative, positive); None for unconditional models
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    preview_at: list[int] = field(default_factory=list)  # progress values after which a preview goes out
    previews_sent: int = 0
    served: float = 0.0  # seconds of model calls it has had, for the fair share

    @property
    def total(self) -> int:
        return self.images[0].schedule.steps - self.images[0].schedule.begin

    @property
    def progress(self) -> int:
        return min(im.step - im.schedule.begin for im in self.images)


@dataclass
class _GroupStep:
    """One denoising step of images that share a latent shape, made one model call at a time."""

    images: list[_Image]
    calls: Iterator[None] | None = None  # DiffusionEngine._denoise; None until the step is picked

    @property
    def shape(self) -> tuple:
        return tuple(self.images[0].latents.shape)


class DiffusionEngine:
    """Step-level batching of image requests over one `ImageGenerationModel`."""

    def __init__(self, model: ImageGenerationModel, *, max_batch_size: int = 16, max_queued: int = 256,
                 max_image_size: int = 1024, max_image_cost: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if min(max_batch_size, max_queued, max_image_size) < 1:
            raise ValueError("max_batch_size, max_queued and max_image_size must be >= 1")
        self.model = model
        self.spec = model.spec
        self.info = EngineInfo(IMAGE_GENERATION, max_model_len=0)
        self.max_batch_size, self.max_queued, self.max_image_size = max_batch_size, max_queued, max_image_size
        self.max_image_cost = max_image_cost  # width x height x steps x n; None: requests.default_cost
        self.requests: dict[str, _Request] = {}
        self.waiting: deque[_Image] = deque()
        self.running: list[_Image] = []
        self.stepping: list[_GroupStep] = []  # steps under way, between two model calls
        self.call_seconds: dict[tuple, float] = {}  # a model call's running time, by latent shape
        self.clock = clock  # times the calls for the fair share
        self._rng = random.Random()
        # (rows, work items) of every step, here (images, images): an LLM's are (sequences, tokens)
        self.step_observers: list[Callable[[int, int], None]] = []

    # -- requests ------------------------------------------------------------------------------

    def prepare(self, request):
        return request  # nothing slow to do before `add`

    def add(self, request_id: str, request: ImageRequest) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already in flight")
        request = request.checked(self.spec, self.max_image_size, self.max_image_cost)
        if len(self.waiting) + request.n > self.max_queued:
            raise EngineUnavailable(f"the image queue is full ({self.max_queued} images waiting); retry later")
        seed = self._rng.getrandbits(63) if request.seed is None else request.seed
        conditioning = None
        if self.spec.conditional:
            conditioning = self.model.encode_prompt([request.negative_prompt, request.prompt])
        clean = None
        if request.init_image is not None:
            pixels = request.init_image.to(self.spec.device, torch.float32)[None]
            pixels = torch.nn.functional.interpolate(pixels, (request.height, request.width), mode="bilinear") \
                if pixels.shape[-2:] != (request.height, request.width) else pixels
            clean = self.model.encode_image(pixels)[0]
        shape = (self.spec.latent_channels, request.height // self.spec.vae_scale_factor,
                 request.width // self.spec.vae_scale_factor)
        images = []
        for i in range(request.n):
            schedule = NOISE_SCHEDULES[request.scheduler](self.spec.schedule_config, request.num_inference_steps)
            s = rng.row_seed(seed, i)
            noise = initial_noise(s, shape, self.spec.device)
            if clean is None:
                latents = noise * schedule.init_noise_sigma
            else:  # img2img: start part-way, from the clean latents noised to that step's level
                schedule.begin = schedule.steps - int(schedule.steps * request.strength)
                a, b = schedule.noised(schedule.begin)
                latents = a * clean + b * noise
            images.append(_Image(request_id, i, s, schedule, latents, request.guidance_scale, schedule.begin))
        # It starts level with the least-served request there, so it neither starves them nor waits
        state = _Request(request_id, request, images, conditioning,
                         served=min((r.served for r in self.requests.values()), default=0.0))
        state.preview_at = sorted({round(k * state.total / (request.partial_images + 1))
                                   for k in range(1, request.partial_images + 1)} - {0, state.total})
        self.requests[request_id] = state
        self.waiting.extend(images)
        log.info("image request %s added: %d x %dx%d, %d steps (%s), guidance %.1f", request_id, request.n,
                 request.width, request.height, request.num_inference_steps, request.scheduler,
                 request.guidance_scale)

    def abort(self, request_id: str) -> ImageOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._drop(request_id)
        log.info("image request %s aborted", request_id)
        return ImageOutput(request_id, 0, request.request.num_inference_steps, finished=True, error="aborted")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=len(self.waiting),
                           cache_usage=len(self.running) / self.max_batch_size)

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> list[ImageOutput]:
        """One model call: the next of the denoising step that the fair share picks (after
        admitting waiting images). When that call ends a step, the outputs: progress for each
        request that moved, previews, and images for those that finished."""
        while self.waiting and len(self.running) < self.max_batch_size:
            self.running.append(self.waiting.popleft())
        if not self.running:
            return []
        start = time.monotonic()
        group = self._fair_group()
        failed: dict[str, str] = {}
        began = self.clock()
        try:
            next(group.calls)
            ended = False
        except StopIteration:
            ended = True
        except Exception as exc:  # noqa: BLE001 - this group's requests fail; the engine goes on
            log.exception("denoising step failed for %d image(s)", len(group.images))
            failed, ended = {im.request_id: f"{type(exc).__name__}: {exc}" for im in group.images
                             if im.request_id in self.requests}, True
        self._charge(group, self.clock() - began)
        if not ended:
            return []
        self.stepping.remove(group)
        for observe in self.step_observers:
            observe(len(group.images), len(group.images))
        moved = {im.request_id for im in group.images if im.request_id in self.requests} - set(failed)
        outputs = [self._fail(request_id, error) for request_id, error in failed.items()]
        self.running = [im for im in self.running if not im.done]
        now = time.monotonic()
        finished = []
        for request_id in moved:
            request = self.requests[request_id]
            request.times.first_scheduled = request.times.first_scheduled or start
            request.times.first_token = request.times.first_token or now
            if all(im.done for im in request.images):
                finished.append(request)
            elif request.preview_at and request.progress == request.preview_at[0]:
                request.preview_at.pop(0)
                outputs.append(self._preview(request))
            else:
                outputs.append(ImageOutput(request_id, request.progress, request.total))
        return outputs + self._finish(finished) if finished else outputs

    def _fair_group(self) -> _GroupStep:
        """The step, under way or new, whose next call leaves some request with the least time
        served (see `batching`). Running images that no step holds form new ones, by shape."""
        stepping = {id(im) for g in self.stepping for im in g.images}
        fresh: dict[tuple, list[_Image]] = defaultdict(list)
        for im in self.running:
            if id(im) not in stepping:
                fresh[tuple(im.latents.shape)].append(im)
        candidates = self.stepping + [_GroupStep(images) for images in fresh.values()]

        def after_next_call(group: _GroupStep) -> float:
            served = min(self.requests[im.request_id].served for im in group.images if im.request_id in self.requests)
            return served + self.call_seconds.get(group.shape, 0.0)
        # on a tie, the shorter call: the request it serves is then done sooner
        group = min(candidates, key=lambda g: (after_next_call(g), self.call_seconds.get(g.shape, 0.0)))
        if group.calls is None:
            group.calls = self._denoise(group.images)
            self.stepping.append(group)
        return group

    def _charge(self, group: _GroupStep, seconds: float) -> None:
        """A call's seconds to the requests of its rows, and to the shape's running estimate."""
        previous = self.call_seconds.get(group.shape)
        self.call_seconds[group.shape] = seconds if previous is None else (previous + seconds) / 2
        work = sum(im.work for im in group.images)
        for im in group.images:
            if im.request_id in self.requests:
                self.requests[im.request_id].served += seconds * im.work / work

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in calls of the shape's fixed size: an image decodes the same in any company."""
        return run_in_chunks(self.model.decode, rows_per_call(tuple(latents.shape[1:]), self.spec.device), latents)

    def _preview(self, request: _Request) -> ImageOutput:
        """The request's current clean estimates (x0), decoded: what its images are becoming."""
        try:
            decoded = self._decode(torch.stack([im.prev_x0 for im in request.images]))
        except Exception:  # noqa: BLE001 - a preview is a courtesy: the loop goes on without it
            log.exception("preview of image request %s failed", request.request_id)
            return ImageOutput(request.request_id, request.progress, request.total)
        pixels = decoded.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        request.previews_sent += 1
        return ImageOutput(request.request_id, request.progress, request.total, images=pixels,
                           partial_index=request.previews_sent - 1)

    def _denoise(self, group: list[_Image]) -> Iterator[None]:
        """One denoising step of images whose latents share a shape, as a generator: each
        `next` makes one denoiser call of the shape's fixed size; the last one also applies the
        fused scheduler step to every image."""
        dev = self.spec.device
        x = torch.stack([im.latents for im in group])
        scales = torch.tensor([im.schedule.model_input_scale(im.step) for im in group], device=dev)
        timesteps = torch.tensor([float(im.schedule.timesteps[im.step]) for im in group], device=dev)
        model_in = x * scales[:, None, None, None]
        guided = [r for r, im in enumerate(group) if self.spec.conditional and im.guidance > 1.0]
        conditioning = None
        if self.spec.conditional:
            conds = [self.requests[im.request_id].conditioning for im in group]
            conditioning = torch.cat([torch.stack([c[1] for c in conds]), torch.stack([conds[r][0] for r in guided])]) \
                if guided else torch.stack([c[1] for c in conds])
            model_in = torch.cat([model_in, model_in[guided]]) if guided else model_in
            timesteps = torch.cat([timesteps, timesteps[guided]]) if guided else timesteps
        outs, total = [], model_in.shape[0]
        for i, index in enumerate(chunks(total, rows_per_call(tuple(x.shape[1:]), dev), dev)):
            if i:
                yield  # between two calls, another group's call may run
            outs.append(self.model.denoise(model_in[index], timesteps[index],
                                           None if conditioning is None else conditioning[index]))
        out = torch.cat(outs)[:total]
        cond_out = out[:len(group)]
        uncond_out = cond_out.clone()
        if guided:
            uncond_out[guided] = out[len(group):]
        coef = torch.tensor([im.schedule.coefficients(im.step, im.guidance if r in guided else 1.0)
                             for r, im in enumerate(group)], device=dev)
        seeds = torch.tensor([im.seed for im in group], device=dev)
        steps = torch.tensor([im.step for im in group], device=dev)
        prev = torch.stack([im.prev_x0 if im.prev_x0 is not None else torch.zeros_like(im.latents) for im in group])
        x_next, x0 = kernels.denoise_step(x, cond_out, coef, seeds, steps, uncond=uncond_out, prev_x0=prev)
        for r, im in enumerate(group):
            im.latents, im.prev_x0 = x_next[r], x0[r]
            im.step += 1

    def _finish(self, requests: list[_Request]) -> list[ImageOutput]:
        """Decode the final latents of finished requests, one VAE call per latent shape."""
        pixels: dict[tuple[str, int], torch.Tensor] = {}
        by_shape: dict[tuple, list[_Image]] = defaultdict(list)
        for request in requests:
            del self.requests[request.request_id]
            for im in request.images:
                by_shape[tuple(im.latents.shape)].append(im)
        try:
            for group in by_shape.values():
                decoded = self._decode(torch.stack([im.latents for im in group]))
                for im, image in zip(group, decoded.clamp(0, 1).permute(0, 2, 3, 1).float().cpu()):
                    pixels[im.request_id, im.index] = image
        except Exception as exc:  # noqa: BLE001 - these requests fail; the engine goes on
            log.exception("decoding %d finished image request(s) failed", len(requests))
            return [ImageOutput(r.request_id, 0, r.total, finished=True, error=f"{type(exc).__name__}: {exc}")
                    for r in requests]
        outputs = []
        for request in requests:
            total = request.total
            images = torch.stack([pixels[request.request_id, im.index] for im in request.images]).numpy()
            request.times.finished = time.monotonic()
            outputs.append(ImageOutput(request.request_id, total, total, finished=True, images=images,
                                       seeds=[im.seed for im in request.images], times=request.times))
            log.info("image request %s finished: %d image(s) in %.2fs", request.request_id, len(request.images),
                     request.times.finished - request.times.arrival)
        return outputs

    def _fail(self, request_id: str, error: str) -> ImageOutput:
        request = self.requests.pop(request_id)
        self._drop(request_id)
        return ImageOutput(request_id, 0, request.request.num_inference_steps, finished=True, error=error)

    def _drop(self, request_id: str) -> None:
        """Forget the images of a request that has left `requests`, and steps that hold no other."""
        self.waiting = deque(im for im in self.waiting if im.request_id != request_id)
        self.running = [im for im in self.running if im.request_id != request_id]
        self.stepping = [g for g in self.stepping if any(im.request_id in self.requests for im in g.images)]
