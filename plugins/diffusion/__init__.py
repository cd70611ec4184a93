"""pyserve plugin for diffusers-format pipelines (`model_index.json`): Stable-Diffusion-style
text-to-image (CLIP text encoder, conditional UNet, KL autoencoder) and unconditional UNet
pipelines (DDPM-style). Needs the `pyserve[diffusion]` extra (diffusers and transformers build the
networks; attention and every scheduler step run on pyserve's kernels)."""

from pyserve.plugin import IMAGE_GENERATION, Plugin

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "DDPMPipeline", "DDIMPipeline")


class DiffusionPlugin(Plugin):
    name = "diffusion"
    task = IMAGE_GENERATION
    architectures = PIPELINES

    def matches(self, model_dir, config: dict) -> bool:
        return config.get("_class_name") in PIPELINES or super().matches(model_dir, config)

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .pipeline import DiffusionPipelineModel  # diffusers is imported only when a model loads
        return DiffusionPipelineModel.load(model_dir, device=device, dtype=dtype)


plugin = DiffusionPlugin()
