"""Task names and protocols: what an engine needs from a model that a plugin loads.

Every task a plugin may declare is named here, and `pyserve.engine.build_engine` picks the engine
for it:
- text-generation: the engine owns the paged KV cache and builds each step's flat batch; the model
  runs its layers over it with `pyserve.kernels` and returns hidden states, then logits for the
  rows that sample.
- image-generation: prompt encoding, a denoiser called once per step over every active request's
  latents, and a latent decoder (engine: step-level batching of denoising loops).
- tensor: one-shot models with a declared signature of named inputs and outputs (engine: dynamic
  batching).
- embedding: encoders (BERT family, sentence-transformers, cross-encoders) over sequences packed
  without padding; a vector or a relevance score per input (engine: batches by a token budget).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch

from .kernels.types import DecodeOutput

TEXT_GENERATION = "text-generation"
IMAGE_GENERATION = "image-generation"
TENSOR = "tensor"
EMBEDDING = "embedding"
TASKS = (TEXT_GENERATION, IMAGE_GENERATION, TENSOR, EMBEDDING)


@dataclass
class AttentionMetadata:
    """One step's flat batch, as every attention layer sees it (see kernels.paged_attention)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: tokens in each sequence after this step
    query_start_loc: torch.Tensor  # [S + 1] int32
    # The longest query and sequence of the step, from the host's lists: kernels size their
    # launches with them instead of reading the tensors back from the device.
    max_query_len: int = 0
    max_seq_len: int = 0


@dataclass
class DecodeBatch:
    """A decode step as host lists: one new token for each of B sequences (see
    `TextGenerationModel.decode`). Sequence b's token sits at positions[b], its keys and
    values go to cache slot slots[b], and block_tables[b] lists the sequence's blocks."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]


@dataclass
class KVCache:
    """Per layer key and value caches, [num_blocks, num_kv_heads, block_size, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])


@dataclass
class TextModelSpec:
    """What the engine must know to size the cache and check requests."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


# What --kv-cache-dtype takes: "auto" keeps the model's dtype.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


def kv_cache_dtype_for(spec: TextModelSpec, asked: str | None) -> torch.dtype:
    """The KV cache's dtype: the model's, or the one asked for. On a CPU an fp32 model may keep bf16
    keys and values (half the bytes a long context's decode reads, rounded to nearest even when
    written); the GPU kernels read a cache in the activations' dtype only."""
    if asked in (None, "auto"):
        return spec.dtype
    if asked not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {asked!r}")
    dtype = getattr(torch, asked)
    if dtype != spec.dtype and spec.device.type != "cpu":
        model = str(spec.dtype).removeprefix("torch.")
        raise ValueError(f"kv_cache_dtype {asked} differs from the model's {model}: only the CPU back-end reads a "
                         f"KV cache in another dtype (on {spec.device.type}, set --dtype)")
    return dtype


@dataclass
class ImageInput:
    """One image of a prompt, prepared by its model's `VisionSpec.preprocess`."""

    pixels: torch.Tensor  # [3, H, W] float32
    digest: str  # of the image's content: prefix-cache blocks holding its tokens are keyed by it


@dataclass
class StepImages:
    """Image features for the rows of a step's flat batch that hold image placeholder tokens."""

    rows: torch.Tensor  # [R] int64 indices into the step's tokens
    embeds: torch.Tensor  # [R, hidden]


@dataclass(frozen=True)
class VisionSpec:
    """What the engine and the front-ends must know of a model that reads images (LLaVA-style):
    a prompt holds `tokens_per_image` copies of `image_token_id` for each image, in order."""

    image_token_id: int
    tokens_per_image: int
    preprocess: "object"  # PIL.Image -> pixels [3, H, W] float32, as the model's processor config says


class TextGenerationModel(Protocol):
    """What the LLM engine calls; `pyserve.text_model.TextModel` provides it over a plugin's
    `TextModule`."""

    spec: TextModelSpec
    tokenizer: "object"  # a pyserve.tokenizer.Tokenizer
    vision: VisionSpec | None  # None: text only
    fused_decode: bool  # whether `decode` may answer; False: the engine never builds its batch

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, images: StepImages | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] for the step's tokens; writes their keys/values to the cache.
        With `images`, those rows take the given embeddings instead of their tokens' (vision models)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision models only: pixels [N, 3, H, W] -> embeddings [N, tokens_per_image, hidden]."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the given hidden rows."""

    def decode(self, batch: DecodeBatch, cache: KVCache) -> DecodeOutput | None:
        """A decode step's logits (and greedy tokens) in one call, writing its keys and
        values to the cache as `forward` does; None declines, and the engine runs `forward` and
        `compute_logits` instead. Engines call it only for steps without images or adapters."""


@dataclass(frozen=True)
class ImageModelSpec:
    """What the diffusion engine needs to know of an image model."""

    latent_channels: int
    vae_scale_factor: int  # image pixels per latent cell along a side (1: the denoiser works on pixels)
    default_size: int  # image side in pixels when a request names none
    conditional: bool  # takes text prompts (and so classifier-free guidance)
    schedule_config: dict  # the model's scheduler_config.json
    default_schedule: str  # a name in pyserve.engine.diffusion.noise_schedules.NOISE_SCHEDULES
    device: torch.device
    dtype: torch.dtype


class ImageGenerationModel(Protocol):
    """A diffusion pipeline split into the pieces a step-batching engine calls; tensors in and out
    are fp32 on `spec.device`."""

    spec: ImageModelSpec

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning [B, ...] for a batch of prompts ("" for the unconditional branch)."""

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None) -> torch.Tensor:
        """The model output (epsilon, v or x0, as the schedule says) for each latent row."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from final latents."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents from images [B, 3, H, W] in [0, 1] (img2img's starting point)."""


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a one-shot model: the dtype and shape of one item (the batch
    dimension, which stacks items, is not part of it); -1 in the shape is any size."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", "bytes", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Operation:
    """One thing a one-shot model does, with its named inputs and outputs. Most models do one
    thing; a VAE encodes, decodes and samples."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


DEFAULT_OPERATION = "infer"


class TensorModel:
    """A one-shot model: a declared signature and a batched `run`. Plugins subclass it and set what
    they need; the batch engine reads exactly these attributes and calls exactly these methods.

    Must: `run`, and either `inputs` and `outputs` (one thing the model does, the operation
    "infer") or `operations` (several: a VAE encodes, decodes and samples).
    May: `max_batch_size` and `batching` (a BatchPolicy's fields, usually from the model
    directory's config), `class_names` (what a class-conditional model's labels stand for), and
    `check` (value checks beyond the names, dtypes and shapes the engine checks)."""

    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    operations: tuple[Operation, ...] = ()
    max_batch_size: int = 8
    batching: Mapping[str, Any] = MappingProxyType({})
    class_names: tuple[str, ...] = ()

    def run(self, batch: dict[str, torch.Tensor], operation: str = DEFAULT_OPERATION) -> dict[str, torch.Tensor]:
        """Outputs for a batch whose first dimension stacks items (of one or many requests); item i
        of each output must depend on item i of the inputs alone."""
        raise NotImplementedError

    def check(self, inputs: dict[str, np.ndarray], operation: str = DEFAULT_OPERATION) -> None:
        """Raise InvalidParameter naming the input for a bad value (a class label out of range)."""


def operations_of(model: TensorModel) -> tuple[Operation, ...]:
    """A model's operations: those it declares, or its one signature as the default operation."""
    if model.operations:
        return tuple(model.operations)
    return (Operation(DEFAULT_OPERATION, tuple(model.inputs), tuple(model.outputs)),)


EMBED, SCORE = "embed", "score"


@dataclass(frozen=True)
class EncoderSpec:
    """What the encoder engine and the front-ends must know of an encoder."""

    kind: str  # EMBED: a vector per input; SCORE: relevance logits per (query, document) pair
    dimensions: int  # the vector's size, or the number of labels of a scorer
    max_model_len: int  # tokens of one input, special tokens included
    normalized: bool  # vectors come out unit-length (a sentence-transformers Normalize module)
    device: torch.device
    dtype: torch.dtype
    # sentence-transformers prompt names -> the text put before an input, and the one used unasked
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


class EmbeddingModel(Protocol):
    """An encoder over packed sequences: input i is the tokens cu_seqlens[i] .. cu_seqlens[i+1]-1."""

    spec: EncoderSpec
    tokenizer: "object"  # a pyserve.tokenizer.Tokenizer

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        """[S, dimensions] fp32: each input's vector (pooled, through any Dense and Normalize
        modules) or a scorer's logits. `token_type_ids` [T] marks a pair's second text (None: 0)."""
