"""Helpers for text-generation plugins: `TextModule`, the base of a plugin's torch module, and
`TextModel`, which wraps one with the spec and tokenizer the engine needs, loading weights and
tokenizer from a model directory."""

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Callable

import torch

from .errors import InvalidParameter
from .tasks import TextModelSpec
from .tokenizer import Tokenizer
from .weights import load_weights


class TextModule(torch.nn.Module):
    """The torch module of a text-generation plugin, as `TextModel` drives it.

    Must: `forward(input_ids, positions, meta, cache, images=None, adapters=None)` -> hidden
    states [T, hidden] (writing the step's keys and values to the cache), and
    `compute_logits(hidden)` -> fp32 logits.
    May (the defaults here decline): `packed_modules_mapping` (checkpoint modules that load into
    parts of a `pyserve.nn.FusedLinear` built in `__init__`), `reset_buffers` (buffers computed
    from the config), `fused_decode` and `decode` (a decode step in one call), `adapter_layers`
    (LoRA), `encode_images` (vision models), `shard` (tensor parallelism).
    """

    # checkpoint module name -> (the fused module it loads into, its part): q_proj -> (qkv_proj, 0)
    packed_modules_mapping: Mapping[str, tuple[str, int]] = MappingProxyType({})
    fused_decode = False  # whether `decode` may answer (the engine builds its batch only then)

    def reset_buffers(self) -> None:
        """Recompute buffers that are derived from the config, not loaded (after `to_empty`)."""

    def decode(self, batch, cache):
        """A decode step (pyserve.tasks.DecodeBatch) to logits in one call, or None to decline."""
        return None

    def adapter_layers(self, adapter) -> list:
        """A pyserve.lora.LoraAdapter as (layer, A, B) in the model's layout."""
        raise InvalidParameter("lora", "this model does not serve LoRA adapters")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise InvalidParameter("messages", "this model does not read images")

    def shard(self, group) -> None:
        """Keep this rank's share of the weights (pyserve.parallel)."""
        raise ValueError(f"{type(self).__name__} does not support tensor parallelism")


class TextModel:
    """Satisfies `pyserve.tasks.TextGenerationModel` for a `TextModule`."""

    def __init__(self, module: TextModule, spec: TextModelSpec, tokenizer: Tokenizer | None):
        self.module, self.spec, self.tokenizer = module, spec, tokenizer
        self.fused_decode = module.fused_decode

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
        return self.module.adapter_layers(adapter)

    def compute_logits(self, hidden):
        return self.module.compute_logits(hidden)

    def decode(self, batch, cache):
        return self.module.decode(batch, cache)

    @classmethod
    def load(cls, model_dir: str | Path, build: Callable[[dict], TextModule], *, device: str = "cpu",
             dtype: torch.dtype | None = None, num_kv_heads: Callable[[dict], int], head_dim: Callable[[dict], int],
             transform=None, optional: tuple[str, ...] = (), ignore_prefixes: tuple[str, ...] = (),
             ignore_suffixes: tuple[str, ...] = ()) -> "TextModel":
        """A Hugging Face directory: config.json, safetensors, tokenizer.json."""
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None

        def fill(module: TextModule, buffers: tuple[str, ...]) -> None:
            load_weights(module, model_dir, transform=transform, ignore_prefixes=ignore_prefixes,
                         ignore_suffixes=ignore_suffixes, optional=optional + buffers,
                         packed=module.packed_modules_mapping)
        return cls.assemble(cfg, build, fill, tokenizer, device=device, dtype=dtype, num_kv_heads=num_kv_heads,
                            head_dim=head_dim)

    @classmethod
    def assemble(cls, cfg: dict, build: Callable[[dict], TextModule], fill: Callable, tokenizer: Tokenizer | None,
                 *, device: str, dtype: torch.dtype | None, num_kv_heads: Callable[[dict], int],
                 head_dim: Callable[[dict], int]) -> "TextModel":
        """Build the module from its config on the meta device, `fill(module, buffer_names)` its
        weights in place, and wrap it with its spec and tokenizer."""
        dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
        with torch.device("meta"):
            module = build(cfg)
        module = module.to_empty(device=device).to(dtype)
        module.reset_buffers()
        fill(module, tuple(n for n, _ in module.named_buffers()))
        module.eval().requires_grad_(False)
        max_len = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
        spec = TextModelSpec(num_layers=cfg.get("num_hidden_layers") or cfg["n_layer"], num_kv_heads=num_kv_heads(cfg),
                             head_dim=head_dim(cfg), vocab_size=cfg["vocab_size"], max_model_len=max_len,
                             dtype=dtype, device=torch.device(device))
        return cls(module, spec, tokenizer)
