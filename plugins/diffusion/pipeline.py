"""A diffusers-format directory as the pieces pyserve's diffusion engine calls: prompt encoding,
one denoiser call over a batch of latents at per-row timesteps, VAE decode and encode.

No diffusers pipeline object and no diffusers scheduler runs here: the engine owns the loop and
the noise schedules (read from `scheduler/scheduler_config.json`)."""

import json
from pathlib import Path

import torch

from pyserve.engine.diffusion.noise_schedules import DIFFUSERS_NAMES
from pyserve.tasks import ImageModelSpec

from .attention import use_kernel_attention
from .traced import TracedDenoiser


class DiffusionPipelineModel:
    def __init__(self, spec: ImageModelSpec, unet, vae=None, text_encoder=None, tokenizer=None):
        self.spec = spec
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # On CPUs the network's Python is a sixth of each call; GPUs run it eagerly (kernel
        # launches, not Python, bound them there: CUDA graphs would be the tool).
        self.traced = TracedDenoiser(unet) if spec.device.type == "cpu" else None

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
        import diffusers
        import transformers

        model_dir = Path(model_dir)
        index = json.loads((model_dir / "model_index.json").read_text())
        dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)

        def component(name: str, library):
            _, class_name = index[name]
            # Said outright, diffusers does not print its advice to install accelerate on every load.
            extra = {"low_cpu_mem_usage": False} if library is diffusers else {}
            return getattr(library, class_name).from_pretrained(model_dir / name, torch_dtype=dtype,
                                                                **extra).to(device).eval()

        unet = component("unet", diffusers)

        use_kernel_attention(unet)
        vae = text_encoder = tokenizer = None
        if index.get("vae", [None, None])[1]:
            vae = component("vae", diffusers)
            use_kernel_attention(vae)
        if index.get("text_encoder", [None, None])[1]:
            text_encoder = component("text_encoder", transformers)
            tokenizer = getattr(transformers, index["tokenizer"][1]).from_pretrained(model_dir / "tokenizer")
        schedule_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        schedule = DIFFUSERS_NAMES.get(schedule_config.get("_class_name"))
        if schedule is None:
            raise ValueError(f"{model_dir}: scheduler {schedule_config.get('_class_name')!r} is not supported "
                             f"({', '.join(DIFFUSERS_NAMES)})")
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        sample_size = unet.config.sample_size
        spec = ImageModelSpec(
            latent_channels=unet.config.in_channels, vae_scale_factor=scale,
            default_size=(sample_size if isinstance(sample_size, int) else sample_size[0]) * scale,
            conditional=text_encoder is not None, schedule_config=schedule_config, default_schedule=schedule,
            device=torch.device(device), dtype=dtype)
        return cls(spec, unet, vae, text_encoder, tokenizer)

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.spec.device)
        return self.text_encoder(ids)[0].float()

    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None) -> torch.Tensor:
        dtype = self.spec.dtype
        latents, conditioning = latents.to(dtype), None if conditioning is None else conditioning.to(dtype)
        if self.traced is not None:
            return self.traced(latents, timesteps, conditioning).float()
        kwargs = {} if conditioning is None else {"encoder_hidden_states": conditioning}
        return self.unet(latents, timesteps, **kwargs).sample.float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # the denoiser works on pixels in [-1, 1]
            return latents / 2 + 0.5
        images = self.vae.decode(latents.to(self.spec.dtype) / self.vae.config.scaling_factor).sample
        return images.float() / 2 + 0.5

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.spec.device, self.spec.dtype) * 2 - 1
        if self.vae is None:
            return pixels.float()
        # The posterior's mean: deterministic, so a seeded img2img request is reproducible.
        return self.vae.encode(pixels).latent_dist.mode().float() * self.vae.config.scaling_factor
