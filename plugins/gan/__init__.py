"""pyserve plugin for DCGAN-style image generators, optionally class-conditional.

Directory format (documented in the README so others can publish their own):
    config.json        {"architectures": ["DCGANGenerator"], "latent_dim": 64, "image_size": 32,
                        "channels": 3, "base_channels": 64, "num_classes": 0 (unconditional) or N,
                        "class_names": ["cat", ...] (optional: lets an images-API prompt name a class),
                        "batching": {"max_batch_size": 64, "max_queue_delay_s": 0.005} (optional)}
    model.safetensors  the generator's weights (names as in plugins/gan/model.py)

Inputs per item: `seed` (int64) and, when conditional, `class_label` (int64 in [0, N)); output:
`images` (uint8, [image_size, image_size, channels]). The latent of an item is Philox noise from
its seed alone, so an image never depends on its batch."""

from pathlib import Path

from pyserve.plugin import TENSOR, Plugin, read_model_config


class GANPlugin(Plugin):
    name = "gan"
    task = TENSOR
    architectures = ("DCGANGenerator",)

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .model import GeneratorModel
        return GeneratorModel.load(Path(model_dir), read_model_config(Path(model_dir)), device=device)


plugin = GANPlugin()
