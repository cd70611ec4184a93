"""A helper for text-generation plugins: wrap a torch module that follows the task protocol with
the spec and tokenizer the engine needs, loading weights and tokenizer from a model directory."""

import json
from pathlib import Path
from typing import Callable

import torch

from .errors import InvalidParameter
from .tasks import TextModelSpec
from .tokenizer import Tokenizer
from .weights import load_weights


class TextModel:
    """Satisfies `pyserve.tasks.TextGenerationModel` for a module with forward/compute_logits."""

    def __init__(self, module: torch.nn.Module, spec: TextModelSpec, tokenizer: Tokenizer | None):
        self.module, self.spec, self.tokenizer = module, spec, tokenizer

    vision = None  # a VisionSpec for models that read images

    def forward(self, input_ids, positions, meta, cache, images=None, adapters=None):
        if images is None and adapters is None:
            return self.module(input_ids, positions, meta, cache)
        if adapters is None:
            return self.module(input_ids, positions, meta, cache, images)
        return self.module(input_ids, positions, meta, cache, images, adapters)

    def encode_images(self, pixels):
        return self.module.encode_images(pixels)

    def adapter_layers(self, adapter) -> list:
        """A pyserve.lora.LoraAdapter as (layer, A, B) in the model's layout; InvalidParameter if it
        does not fit."""
        if not hasattr(self.module, "adapter_layers"):
            raise InvalidParameter("lora", "this model does not serve LoRA adapters")
        return self.module.adapter_layers(adapter)

    def compute_logits(self, hidden):
        return self.module.compute_logits(hidden)

    def decode(self, batch, cache):
        decode = getattr(self.module, "decode", None)
        return None if decode is None else decode(batch, cache)

    @classmethod
    def load(cls, model_dir: str | Path, build: Callable[[dict], torch.nn.Module], *, device: str = "cpu",
             dtype: torch.dtype | None = None, num_kv_heads: Callable[[dict], int], head_dim: Callable[[dict], int],
             transform=None, optional: tuple[str, ...] = (), ignore_prefixes: tuple[str, ...] = (),
             ignore_suffixes: tuple[str, ...] = ()) -> "TextModel":
        """A Hugging Face directory: config.json, safetensors, tokenizer.json."""
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None

        def fill(module, buffers: tuple[str, ...]) -> None:
            load_weights(module, model_dir, transform=transform, ignore_prefixes=ignore_prefixes,
                         ignore_suffixes=ignore_suffixes, optional=optional + buffers)
        return cls.assemble(cfg, build, fill, tokenizer, device=device, dtype=dtype, num_kv_heads=num_kv_heads,
                            head_dim=head_dim)

    @classmethod
    def assemble(cls, cfg: dict, build: Callable[[dict], torch.nn.Module], fill: Callable, tokenizer: Tokenizer | None,
                 *, device: str, dtype: torch.dtype | None, num_kv_heads: Callable[[dict], int],
                 head_dim: Callable[[dict], int]) -> "TextModel":
        """Build the module from its config on the meta device, `fill(module, buffer_names)` its
        weights in place, and wrap it with its spec and tokenizer."""
        dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
        with torch.device("meta"):
            module = build(cfg)
        module = module.to_empty(device=device).to(dtype)
        if hasattr(module, "reset_buffers"):  # buffers computed from the config, not loaded
            module.reset_buffers()
        fill(module, tuple(n for n, _ in module.named_buffers()))
        if hasattr(module, "post_load"):  # e.g. fusing projections once weights are in place
            module.post_load()
        module.eval().requires_grad_(False)
        max_len = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
        spec = TextModelSpec(num_layers=cfg.get("num_hidden_layers") or cfg["n_layer"], num_kv_heads=num_kv_heads(cfg),
                             head_dim=head_dim(cfg), vocab_size=cfg["vocab_size"], max_model_len=max_len,
                             dtype=dtype, device=torch.device(device))
        return cls(module, spec, tokenizer)
