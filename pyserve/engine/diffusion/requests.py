"""What a client asks of an image model, checked against the model and the engine's limits, and
what the engine answers: progress after each step, then the images."""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import InvalidParameter
from ...kernels.rng import SEED_RANGE
from ...tasks import ImageModelSpec
from ..base import RequestTimes
from .noise_schedules import NOISE_SCHEDULES

MAX_IMAGES = 16  # per request
MAX_PARTIAL_IMAGES = 3  # previews streamed during the loop, as OpenAI's image streaming allows
MAX_STEPS = 500
MAX_GUIDANCE = 100.0


COST_STEPS = 50  # the steps the cost limit is counted at: limit / COST_STEPS bounds one image's pixels


def default_cost(spec: ImageModelSpec) -> int:
    """The largest request a model takes by default: four times its native pixels at 50 steps, one
    image (a request past it would hold the step batch for minutes)."""
    return 4 * spec.default_size ** 2 * COST_STEPS


@dataclass
class ImageRequest:
    """A text-to-image (or unconditional, or img2img) request. Sizes are in pixels; None takes the
    model's default. `init_image` [3, H, W] in [0, 1] starts the loop part-way, by `strength`."""

    prompt: str = ""
    negative_prompt: str = ""
    n: int = 1
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str | None = None  # a noise-schedule name; None: the model's own
    seed: int | None = None
    init_image: torch.Tensor | None = None
    strength: float = 0.8
    partial_images: int = 0  # previews (the current clean estimate, decoded) sent during the loop

    def checked(self, spec: ImageModelSpec, max_size: int, max_cost: int | None = None) -> "ImageRequest":
        """This request with defaults filled in; InvalidParameter names the first bad field.
        `max_cost` bounds width x height x steps x n (default: `default_cost(spec)`)."""
        multiple = max(8, spec.vae_scale_factor)

        def default(side: int) -> int:  # an init image's side, down to the nearest size the model takes
            return max(multiple, side // multiple * multiple) if self.init_image is not None else spec.default_size
        # None picks the size; a size given, 0 included, must be one the model takes
        height = default(self.init_image.shape[1] if self.init_image is not None else 0) if self.height is None \
            else self.height
        width = default(self.init_image.shape[2] if self.init_image is not None else 0) if self.width is None \
            else self.width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or not multiple <= value <= max_size or value % multiple:
                raise InvalidParameter(name, f"must be a multiple of {multiple} from {multiple} to {max_size}, "
                                             f"got {value}")
        checks = [
            ("n", isinstance(self.n, int) and 1 <= self.n <= MAX_IMAGES, f"must be in [1, {MAX_IMAGES}]"),
            ("num_inference_steps", isinstance(self.num_inference_steps, int)
             and 1 <= self.num_inference_steps <= MAX_STEPS, f"must be in [1, {MAX_STEPS}]"),
            ("guidance_scale", isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
             and 0 <= self.guidance_scale <= MAX_GUIDANCE, f"must be a finite number in [0, {MAX_GUIDANCE}]"),
            ("scheduler", self.scheduler is None or self.scheduler in NOISE_SCHEDULES,
             f"must be one of {', '.join(NOISE_SCHEDULES)}"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed < SEED_RANGE[1], "must fit in 64 bits"),
            ("strength", isinstance(self.strength, (int, float)) and 0 < self.strength <= 1, "must be in (0, 1]"),
            ("partial_images", isinstance(self.partial_images, int) and 0 <= self.partial_images <= MAX_PARTIAL_IMAGES,
             f"must be in [0, {MAX_PARTIAL_IMAGES}]"),
            ("prompt", spec.conditional or not (self.prompt or self.negative_prompt),
             "this model is unconditional: it takes no prompt"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParameter(name, message)
        cost, limit = width * height * self.num_inference_steps * self.n, max_cost or default_cost(spec)
        # One image's pixels are bounded too: a model call is indivisible and costs more than its
        # pixels (attention is quadratic), so a huge image at few steps would hold every other
        # request for the length of one call.
        if width * height > limit // COST_STEPS:
            raise InvalidParameter("width", f"width x height is {width * height} pixels, over this model's limit of "
                                            f"{limit // COST_STEPS} an image (--max-image-cost / {COST_STEPS})")
        if cost > limit:
            raise InvalidParameter("num_inference_steps", f"width x height x num_inference_steps x n is {cost}, over "
                                   f"this model's limit of {limit} (--max-image-cost): fewer steps, fewer images "
                                   "or a smaller size")
        if self.init_image is not None:
            image = self.init_image
            if image.dim() != 3 or image.shape[0] != 3:
                raise InvalidParameter("image", f"must be [3, H, W], got {tuple(image.shape)}")
            if int(self.num_inference_steps * self.strength) < 1:
                raise InvalidParameter("strength", "strength x num_inference_steps leaves no step to run")
        return ImageRequest(self.prompt, self.negative_prompt, self.n, height, width, self.num_inference_steps,
                            float(self.guidance_scale), self.scheduler or spec.default_schedule, self.seed,
                            self.init_image, float(self.strength), self.partial_images)


@dataclass
class ImageOutput:
    """After each step: progress of the request's slowest image; once finished, the images
    [n, H, W, 3] as float32 in [0, 1] (the PNG encoder rounds them to 8 bits). Before that,
    `images` with `partial_index` set is a preview (the decoded clean estimate of the step)."""

    request_id: str
    step: int
    total_steps: int
    finished: bool = False
    images: np.ndarray | None = None
    error: str | None = None
    seeds: list[int] = field(default_factory=list)
    partial_index: int | None = None
    times: RequestTimes | None = None  # on the last output
