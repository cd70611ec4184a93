"""A diffusers AutoencoderKL as a one-shot model with three operations: encode, decode, sample."""

from pathlib import Path

import numpy as np
import torch

from pyserve.errors import InvalidParameter
from pyserve.kernels import rng
from pyserve.tasks import Operation, TensorModel, TensorSpec

from ..diffusion.attention import use_kernel_attention

MAX_SIDE = 1024  # pixels, for encode inputs and decode outputs


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class VAEModel(TensorModel):
    """The `tensor` task protocol over an AutoencoderKL."""

    def __init__(self, vae, device: str, batching: dict | None = None):
        self.vae, self.device = vae.eval(), device
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels, self.size = cfg.latent_channels, cfg.sample_size
        latent = TensorSpec("latents", "float32", (self.channels, -1, -1))
        images = TensorSpec("images", "uint8", (-1, -1, 3))
        self.operations = (
            Operation("encode", (images,), (latent, TensorSpec("latent_std", "float32", (self.channels, -1, -1)))),
            Operation("decode", (latent,), (images,)),
            Operation("sample", (TensorSpec("seed", "int64", ()),), (TensorSpec("images", "uint8", (self.size, self.size, 3)),)),
        )
        self.batching = batching or {}
        self.max_batch_size = self.batching.get("max_batch_size", 16)

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu") -> "VAEModel":
        import diffusers

        vae = diffusers.AutoencoderKL.from_pretrained(model_dir, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        vae = vae.to(device)
        use_kernel_attention(vae)
        return cls(vae, device)

    def check(self, inputs: dict[str, np.ndarray], operation: str) -> None:
        if operation == "encode":
            h, w = inputs["images"].shape[1:3]
            if h % self.factor or w % self.factor or not (h and w) or max(h, w) > MAX_SIDE:
                raise InvalidParameter("images", f"height and width must be multiples of {self.factor} "
                                                 f"in [{self.factor}, {MAX_SIDE}], got {h}x{w}")
        elif operation == "decode":
            latents = inputs["latents"]
            h, w = latents.shape[2:4]
            if not (h and w) or max(h, w) * self.factor > MAX_SIDE:
                raise InvalidParameter("latents", f"latent sides must be in [1, {MAX_SIDE // self.factor}], got {h}x{w}")
            if not np.isfinite(latents).all():
                raise InvalidParameter("latents", "must be finite")

    def run(self, batch: dict[str, torch.Tensor], operation: str) -> dict[str, torch.Tensor]:
        if operation == "encode":
            pixels = batch["images"].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            posterior = self.vae.encode(pixels).latent_dist
            return {"latents": posterior.mean, "latent_std": posterior.std}
        if operation == "decode":
            return {"images": to_pixels(self.vae.decode(batch["latents"].to(self.device)).sample)}
        return {"images": to_pixels(self.vae.decode(self.prior(batch["seed"])).sample)}

    def prior(self, seeds: torch.Tensor) -> torch.Tensor:
        """z ~ N(0, I) for each seed, [B, C, S/f, S/f]."""
        side = self.size // self.factor
        z = rng.seeded_normal(seeds.to(self.device), self.channels * side * side, rng.VAE_LATENT_STREAM)
        return z.view(-1, self.channels, side, side)
