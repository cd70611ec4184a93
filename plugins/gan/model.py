"""A DCGAN generator (Radford et al.): a latent (plus a class embedding) projected to a 4x4 map,
then transposed convolutions that double the size until the image size, then tanh."""

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pyserve.errors import InvalidParameter
from pyserve.kernels import rng
from pyserve.tasks import DEFAULT_OPERATION, TensorModel, TensorSpec


class DCGANGenerator(nn.Module):
    def __init__(self, latent_dim: int, image_size: int, channels: int, base_channels: int, num_classes: int = 0):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        ups = int(math.log2(image_size)) - 2
        width = base_channels * 2 ** (ups - 1)
        self.project = nn.Sequential(nn.Linear(latent_dim, width * 16), nn.BatchNorm1d(width * 16), nn.ReLU())
        blocks = []
        for i in range(ups):
            last = i == ups - 1
            out = channels if last else width // 2
            blocks.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1, bias=last))
            blocks += [nn.Tanh()] if last else [nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = z + self.embed(labels)
        x = self.project(z)
        return self.blocks(x.view(x.shape[0], -1, 4, 4))  # [B, C, H, W] in [-1, 1]


def latents(seeds: torch.Tensor, dim: int) -> torch.Tensor:
    """One standard-normal latent per seed, from the seed alone."""
    return rng.seeded_normal(seeds, dim, rng.GAN_LATENT_STREAM)


class GeneratorModel(TensorModel):
    """The `tensor` task protocol over a DCGANGenerator."""

    def __init__(self, module: DCGANGenerator, config: dict, device: str):
        self.module, self.device = module.eval(), device
        size, channels = config["image_size"], config["channels"]
        self.inputs = [TensorSpec("seed", "int64", ())]
        if module.num_classes:
            self.inputs.append(TensorSpec("class_label", "int64", ()))
        self.outputs = [TensorSpec("images", "uint8", (size, size, channels))]
        self.batching = config.get("batching", {})
        self.max_batch_size = self.batching.get("max_batch_size", 64)
        self.class_names = tuple(config.get("class_names", ()))

    @classmethod
    def load(cls, model_dir: Path, config: dict, device: str = "cpu") -> "GeneratorModel":
        module = DCGANGenerator(config["latent_dim"], config["image_size"], config["channels"],
                                config["base_channels"], config.get("num_classes", 0))
        module.load_state_dict(load_file(model_dir / "model.safetensors"))
        return cls(module.to(device), config, device)

    def check(self, inputs: dict[str, np.ndarray], operation: str = DEFAULT_OPERATION) -> None:
        labels = inputs.get("class_label")
        if labels is not None and ((labels < 0) | (labels >= self.module.num_classes)).any():
            raise InvalidParameter("class_label", f"must be in [0, {self.module.num_classes})")

    def run(self, batch: dict[str, torch.Tensor], operation: str = DEFAULT_OPERATION) -> dict[str, torch.Tensor]:
        seeds = batch["seed"].to(self.device)
        labels = batch["class_label"].to(self.device) if "class_label" in batch else None
        images = self.module(latents(seeds, self.module.latent_dim), labels)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return {"images": pixels.permute(0, 2, 3, 1)}
