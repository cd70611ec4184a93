"""The diffusion engine: step-level batching of denoising loops over an image model."""

from .engine import DiffusionEngine, initial_noise
from .requests import ImageOutput, ImageRequest

__all__ = ["DiffusionEngine", "ImageOutput", "ImageRequest", "initial_noise"]
