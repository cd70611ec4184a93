"""pyserve plugin for LLaVA-style vision-language checkpoints in Hugging Face format
(`LlavaForConditionalGeneration`: CLIP vision tower, projector, Llama-family language model).

Images are prepared as the checkpoint's `preprocessor_config.json` says (CLIP's processor:
resize the short side, centre-crop, rescale, normalise) with Pillow; a prompt holds one
`<image>` token per image, which the server expands to the image's feature count."""

import json
from pathlib import Path

import numpy as np
import torch

from pyserve.plugin import TEXT_GENERATION, Plugin
from pyserve.tasks import VisionSpec
from pyserve.text_model import TextModel
from pyserve.tokenizer import Tokenizer
from pyserve.weights import load_weights
from pyserve_plugins.llama import head_dim, num_kv_heads

# transformers' defaults, for fields a saved config leaves out
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "multimodal_projector_bias": True}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Checkpoint names -> this model's (newer transformers nest the parts under "model.").
RENAMES = [("model.vision_tower.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."),
           ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]


def read_config(model_dir: Path) -> dict:
    cfg = {**LLAVA_DEFAULTS, **json.loads((model_dir / "config.json").read_text())}
    cfg["vision_config"] = {**VISION_DEFAULTS, **cfg.get("vision_config", {})}
    cfg["text_config"] = {**TEXT_DEFAULTS, **cfg.get("text_config", {})}
    if not isinstance(cfg["vision_feature_layer"], int):
        raise ValueError(f"{model_dir}: vision_feature_layer {cfg['vision_feature_layer']!r}: only one layer is supported")
    return cfg


class ImageProcessor:
    """CLIP's image preprocessing from a `preprocessor_config.json` (transformers'
    CLIPImageProcessor fields), on Pillow images."""

    def __init__(self, config: dict, image_size: int):
        self.do_convert_rgb = config.get("do_convert_rgb", True)
        self.resize_to = config.get("size", {}).get("shortest_edge", image_size) if config.get("do_resize", True) else None
        self.resample = config.get("resample", 3)  # bicubic
        crop = config.get("crop_size", {"height": image_size, "width": image_size})
        self.crop = (crop["height"], crop["width"]) if config.get("do_center_crop", True) else None
        self.scale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        self.mean = np.array(config.get("image_mean", CLIP_MEAN) if normalize else [0.0] * 3, dtype=np.float32)
        self.std = np.array(config.get("image_std", CLIP_STD) if normalize else [1.0] * 3, dtype=np.float32)

    def __call__(self, image) -> torch.Tensor:
        if self.do_convert_rgb:
            image = image.convert("RGB")
        if self.resize_to is not None:  # the short side to resize_to, the long side in proportion
            w, h = image.size
            short, long = min(w, h), max(w, h)
            new_long = int(self.resize_to * long / short)
            image = image.resize((self.resize_to, new_long) if w <= h else (new_long, self.resize_to),
                                 resample=self.resample)
        if self.crop is not None:
            (ch, cw), (w, h) = self.crop, image.size
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        pixels = (np.asarray(image, dtype=np.float32) * self.scale - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class LlavaPlugin(Plugin):
    name = "llava"
    task = TEXT_GENERATION
    architectures = ("LlavaForConditionalGeneration",)

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .model import LlavaForConditionalGeneration
        model_dir = Path(model_dir)
        cfg = read_config(model_dir)
        text_cfg = cfg["text_config"]

        def rename(name: str, tensor: torch.Tensor):
            for old, new in RENAMES:
                if name.startswith(old):
                    return new + name[len(old):], tensor
            return name, tensor

        def fill(module, buffers):
            load_weights(module, model_dir, transform=rename, optional=buffers, packed=module.packed_modules_mapping)

        model = TextModel.assemble(text_cfg, lambda text: LlavaForConditionalGeneration(cfg, text), fill,
                                   Tokenizer.from_dir(model_dir), device=device, dtype=dtype,
                                   num_kv_heads=num_kv_heads, head_dim=head_dim)
        vision = cfg["vision_config"]
        processor_path = model_dir / "preprocessor_config.json"
        processor = json.loads(processor_path.read_text()) if processor_path.exists() else {}
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        model.vision = VisionSpec(cfg["image_token_index"],
                                  patches + (cfg["vision_feature_select_strategy"] == "full"),
                                  ImageProcessor(processor, vision["image_size"]))
        return model


plugin = LlavaPlugin()
