"""Task protocols: what an engine needs from a model that a plugin loads.

text-generation: the engine owns the paged KV cache and builds each step's flat batch; the model
runs its layers over it with `pyserve.kernels` and returns hidden states, then logits for the rows
that sample.
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """One step's flat batch, as every attention layer sees it (see kernels.paged_attention)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: tokens in each sequence after this step
    query_start_loc: torch.Tensor  # [S + 1] int32


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


@dataclass
class Tokenizing:
    """Tokenizer-side facts of a model: special ids, chat template, generation defaults."""

    eos_token_ids: list[int] = field(default_factory=list)
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    generation_defaults: dict = field(default_factory=dict)


class TextGenerationModel(Protocol):
    spec: TextModelSpec
    tokenizer: "object"  # a pyserve.tokenizer.Tokenizer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache) -> torch.Tensor:
        """Hidden states [T, hidden] for the step's tokens; writes their keys/values to the cache."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the given hidden rows."""
