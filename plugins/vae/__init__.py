"""pyserve plugin for variational autoencoders in diffusers format: a directory with `config.json`
(`"_class_name": "AutoencoderKL"`) and `diffusion_pytorch_model.safetensors`, such as the `vae/`
folder of a Stable Diffusion pipeline. Needs the `pyserve[diffusion]` extra.

Three operations, chosen by the inputs a request sends (or the `operation` parameter):
- encode: `images` (uint8 [H, W, 3]) -> `latents` and `latent_std` (float32 [C, H/f, W/f]): the
  posterior's mean and standard deviation, unscaled (as diffusers' `latent_dist` gives them);
- decode: `latents` (float32 [C, h, w]) -> `images` (uint8 [h*f, w*f, 3]);
- sample: `seed` (int64) -> `images` (uint8 [S, S, 3], S the config's `sample_size`): the decoding
  of z ~ N(0, I) drawn from the seed alone.
f is the downsampling factor (2 per encoder block after the first)."""

from pyserve.plugin import TENSOR, Plugin


class VAEPlugin(Plugin):
    name = "vae"
    task = TENSOR
    architectures = ("AutoencoderKL",)

    def matches(self, model_dir, config: dict) -> bool:
        return config.get("_class_name") in self.architectures or super().matches(model_dir, config)

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .model import VAEModel  # diffusers is imported only when a model loads
        return VAEModel.load(model_dir, device=device)


plugin = VAEPlugin()
