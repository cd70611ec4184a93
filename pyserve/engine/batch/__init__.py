"""The batch engine: dynamic batching of one-shot models (VAE, GAN, forecaster), as NVIDIA
Triton's dynamic batcher does it."""

from .engine import BatchEngine, BatchPolicy, TensorOutput, TensorRequest

__all__ = ["BatchEngine", "BatchPolicy", "TensorOutput", "TensorRequest"]
