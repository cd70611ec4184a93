"""Llama-family decoder (Llama, Mistral, Qwen2) over pyserve's paged KV cache, in one file.

Module and parameter names follow the Hugging Face checkpoints, so weights load by name.
"""

import math

import torch
from torch import nn

from pyserve import kernels
from pyserve.lora import LoraAdapter, adapter_layers
from pyserve.nn import FusedLinear, Linear
from pyserve.parallel import head_rows, kv_heads_of_rank, sliced_linear
from pyserve.tasks import AttentionMetadata, DecodeBatch, KVCache, StepImages
from pyserve.text_model import TextModule


def rope_inv_freq(cfg: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies with `rope_theta` and `rope_scaling` (linear, llama3) applied.

    Older configs keep both at the top level; newer ones nest them in `rope_parameters`.
    """
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3)")
    return inv_freq.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised x + residual, x + residual): the sum is the residual stream onward."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, cfg: dict, head_dim: int, sliding_window: int):
        super().__init__()
        hidden = cfg["hidden_size"]
        # Qwen2 has q/k/v biases and says so only by its architecture
        qkv_bias = cfg.get("attention_bias", False) or "Qwen2ForCausalLM" in cfg.get("architectures", ())
        self.heads, self.kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        self.head_dim, self.sliding_window = head_dim, sliding_window
        # one projection for q, k and v: one larger matrix-vector product per decode step
        self.qkv_proj = FusedLinear(hidden, (self.heads * head_dim, self.kv_heads * head_dim, self.kv_heads * head_dim),
                                    bias=qkv_bias)
        self.o_proj = Linear(self.heads * head_dim, hidden, bias=cfg.get("attention_bias", False))

    group = None  # a pyserve.parallel.Group once sharded: the output product ends in an all-reduce

    def shard(self, group) -> None:
        """Keep this rank's heads: its q and k/v heads of the fused projection (column-parallel)
        and the matching input columns of the output projection (row-parallel). With fewer KV
        heads than ranks, the ranks of a KV head's query group each keep a copy of it."""
        r, n, d = group.rank, group.size, self.head_dim
        hq = self.heads // n
        first_kv, hkv = kv_heads_of_rank(self.kv_heads, r, n)
        q, kv = self.heads * d, self.kv_heads * d
        rows = torch.cat([head_rows(r * hq, hq, d), head_rows(first_kv, hkv, d, q), head_rows(first_kv, hkv, d, q + kv)])
        self.qkv_proj = sliced_linear(self.qkv_proj, rows=rows)
        self.o_proj = sliced_linear(self.o_proj, cols=head_rows(r * hq, hq, d), keep_bias=r == 0)
        self.heads, self.kv_heads, self.group = hq, hkv, group

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache, adapters=None):
        t = x.shape[0]
        qkv = self.qkv_proj(x, adapters)
        kernels.rotary(qkv, cos, sin, self.heads + self.kv_heads)  # q and k heads lead each row
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q, k = q.view(t, self.heads, self.head_dim), k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      sliding_window=self.sliding_window, max_query_len=meta.max_query_len,
                                      max_seq_len=meta.max_seq_len)
        out = self.o_proj(out.reshape(t, self.heads * self.head_dim), adapters)
        if self.group is not None:
            self.group.all_reduce(out)
        return out


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, (intermediate, intermediate), bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    group = None  # a pyserve.parallel.Group once sharded

    def shard(self, group) -> None:
        """Keep this rank's intermediate columns: its share of gate and of up (column-parallel)
        and the matching inputs of down (row-parallel)."""
        part = self.down_proj.in_features // group.size
        mine = torch.arange(group.rank * part, (group.rank + 1) * part)
        self.gate_up_proj = sliced_linear(self.gate_up_proj, rows=torch.cat([mine, self.down_proj.in_features + mine]))
        self.down_proj = sliced_linear(self.down_proj, cols=mine, keep_bias=group.rank == 0)
        self.group = group

    def forward(self, x, adapters=None):
        out = self.down_proj(kernels.silu_mul(self.gate_up_proj(x, adapters)), adapters)
        if self.group is not None:
            self.group.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, head_dim: int, sliding_window: int):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg, head_dim, sliding_window)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache, adapters=None):
        """(this layer's output, the residual stream before it): the next norm adds them.
        `adapters` [T] picks each row's LoRA adapter (-1: none)."""
        h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(h, cos, sin, meta, k_cache, v_cache, adapters)
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(h, adapters), residual


class Backbone(nn.Module):
    def __init__(self, cfg: dict, head_dim: int, sliding_window: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, head_dim, sliding_window)
                                    for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(TextModule):
    # the checkpoint's separate projections load into the fused ones built above
    packed_modules_mapping = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    fused_decode = True

    def __init__(self, cfg: dict):
        super().__init__()
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        window = cfg.get("sliding_window") or 0
        if cfg.get("use_sliding_window") is False:  # Qwen2 keeps the field but may switch it off
            window = 0
        self.model = Backbone(cfg, self.head_dim, window)
        self.sliding_window = window
        self.tied = cfg.get("tie_word_embeddings", False)
        self.head: kernels.QuantizedWeight | None = None  # a packed copy of a tied head
        if not self.tied:
            self.lm_head = Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.cfg = cfg
        # Set by shard(); a plain attribute, since decode steps read it and reaching into the layers'
        # modules costs a decode step ~0.1 ms on caches the weight stream has just flushed.
        self.sharded = False
        self.register_buffer("inv_freq", rope_inv_freq(cfg, self.head_dim), persistent=False)
        self._weights: kernels.DecoderModelWeights | None = None  # for kernels.decoder_stack and decode_step

    def reset_buffers(self) -> None:
        self.inv_freq.copy_(rope_inv_freq(self.cfg, self.head_dim))

    def shard(self, group) -> None:
        """Tensor parallelism (pyserve.parallel): this rank keeps its share of every layer's heads
        and MLP columns; the embedding and the output layer stay whole."""
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        for what, count in (("attention heads", attn.heads), ("intermediate size", mlp.down_proj.in_features)):
            if count % group.size:
                raise ValueError(f"the model's {what} ({count}) do not split over {group.size} ranks")
        kv_heads_of_rank(attn.kv_heads, group.rank, group.size)  # raises where they cannot be split or copied
        for layer in self.model.layers:
            layer.self_attn.shard(group)
            layer.mlp.shard(group)
        self.sharded = True
        self._weights = None

    def model_weights(self) -> kernels.DecoderModelWeights:
        if self._weights is None:
            attn = self.model.layers[0].self_attn
            stack = kernels.DecoderStackWeights(
                [kernels.DecoderLayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                             layer.self_attn.qkv_proj.matrix, layer.self_attn.o_proj.matrix,
                                             layer.mlp.gate_up_proj.matrix, layer.mlp.down_proj.matrix,
                                             layer.self_attn.qkv_proj.bias)
                 for layer in self.model.layers],
                self.model.norm.weight, attn.heads, attn.kv_heads, self.head_dim, self.model.norm.eps)
            embedding = self.model.embed_tokens.weight
            head = (self.head if self.head is not None else embedding) if self.tied else self.lm_head.matrix
            self._weights = kernels.DecoderModelWeights(stack, embedding, self.inv_freq, head)
        return self._weights

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, images: StepImages | None = None,
                adapters: torch.Tensor | None = None) -> torch.Tensor:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        x, residual = self.model.embed_tokens(input_ids), None
        if images is not None:  # image placeholder rows take the vision features (LLaVA-style models)
            x = x.index_copy(0, images.rows, images.embeds.to(x.dtype))
        # Decode steps run the whole stack in one kernel call where the back-end has one (not with
        # LoRA adapters, nor sharded: they run op by op).
        if adapters is None and not self.sharded:
            fused = kernels.decoder_stack(x, cos, sin, self.model_weights().stack, cache.keys, cache.values,
                                          meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                          scale=self.head_dim**-0.5, sliding_window=self.sliding_window)
            if fused is not None:
                return fused
        for layer, k_cache, v_cache in zip(self.model.layers, cache.keys, cache.values):
            x, residual = layer(x, residual, cos, sin, meta, k_cache, v_cache, adapters)
        return self.model.norm(x, residual)[0]

    def decode(self, batch: DecodeBatch, cache: KVCache) -> kernels.DecodeOutput | None:
        """A decode step in one kernel call where the back-end has one (not sharded: the ranks'
        steps go through `forward`)."""
        if self.sharded:
            return None
        return kernels.decode_step(batch.token_ids, batch.positions, batch.slots, batch.block_tables,
                                   self.model_weights(), cache.keys, cache.values, scale=self.head_dim**-0.5,
                                   sliding_window=self.sliding_window)

    def adapter_layers(self, adapter: LoraAdapter) -> list[tuple[Linear, torch.Tensor, torch.Tensor]]:
        """The adapter as (projection, A, B) for every projection (rank 0 where it has none): q/k/v
        and gate/up pieces go onto the fused projections, ranks stacked."""
        hidden = self.cfg["hidden_size"]
        targets = {}  # -> (Linear, its parts' checkpoint names, their output sizes)
        for i, layer in enumerate(self.model.layers):
            attn, mlp, at = layer.self_attn, layer.mlp, f"model.layers.{i}."
            q, kv = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
            targets[at + "qkv"] = (attn.qkv_proj, [at + f"self_attn.{p}_proj" for p in "qkv"], [q, kv, kv])
            targets[at + "o"] = (attn.o_proj, [at + "self_attn.o_proj"], [hidden])
            targets[at + "gate_up"] = (mlp.gate_up_proj, [at + "mlp.gate_proj", at + "mlp.up_proj"],
                                       [mlp.down_proj.in_features] * 2)
            targets[at + "down"] = (mlp.down_proj, [at + "mlp.down_proj"], [hidden])
        return adapter_layers(adapter, list(targets.values()))

    def pack(self, format: str) -> int:
        """A tied head's weight is the embedding table, which lookups still need in full: the head
        reads a packed copy of it (an untied lm_head packs itself, as every Linear does)."""
        self._weights = None  # the layers' weights are being repacked
        if not self.tied:
            return 0
        weight = self.model.embed_tokens.weight
        self.head = kernels.quantize(weight, format)
        return weight.numel() * weight.element_size()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.tied:
            return self.lm_head(hidden).float()
        return kernels.linear(hidden, self.head if self.head is not None else self.model.embed_tokens.weight).float()
