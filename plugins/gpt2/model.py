"""GPT-2 over pyserve's paged KV cache: learned positions, LayerNorm, GELU (tanh), Conv1D weights.

Parameter names follow the Hugging Face checkpoint; Conv1D keeps its [in, out] weight layout.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pyserve import kernels
from pyserve.lora import LoraAdapter, adapter_layers
from pyserve.nn import LoraTarget, release
from pyserve.tasks import AttentionMetadata, KVCache
from pyserve.text_model import TextModule


class Conv1D(LoraTarget, nn.Module):
    """y = x @ weight + bias, with weight [in, out] as GPT-2 checkpoints store it."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    packed: kernels.QuantizedWeight | None = None

    def pack(self, format: str) -> int:
        self.packed = kernels.quantize(self.weight.t(), format)
        return release(self, "weight")

    def forward(self, x, adapters=None):
        y = kernels.linear(x, self.packed, self.bias) if self.packed is not None else torch.addmm(self.bias, x, self.weight)
        return self.add_adapters(y, x, adapters)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.heads = cfg["n_head"]
        self.head_dim = cfg["n_embd"] // self.heads
        self.c_attn = Conv1D(cfg["n_embd"], 3 * cfg["n_embd"])
        self.c_proj = Conv1D(cfg["n_embd"], cfg["n_embd"])

    def forward(self, x, meta: AttentionMetadata, k_cache, v_cache, adapters=None):
        t = x.shape[0]
        q, k, v = self.c_attn(x, adapters).view(t, 3, self.heads, self.head_dim).unbind(1)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)
        return self.c_proj(out.reshape(t, -1), adapters)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        inner = cfg.get("n_inner") or 4 * cfg["n_embd"]
        self.c_fc = Conv1D(cfg["n_embd"], inner)
        self.c_proj = Conv1D(inner, cfg["n_embd"])

    def forward(self, x, adapters=None):
        return self.c_proj(F.gelu(self.c_fc(x, adapters), approximate="tanh"), adapters)


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(cfg["n_embd"], eps=eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg["n_embd"], eps=eps)
        self.mlp = MLP(cfg)

    def forward(self, x, meta, k_cache, v_cache, adapters=None):
        x = x + self.attn(self.ln_1(x), meta, k_cache, v_cache, adapters)
        return x + self.mlp(self.ln_2(x), adapters)


class Transformer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg.get("layer_norm_epsilon", 1e-5))


class GPT2LMHeadModel(TextModule):
    def __init__(self, cfg: dict):
        super().__init__()
        self.transformer = Transformer(cfg)
        self.head: kernels.QuantizedWeight | None = None  # a packed copy of the tied head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, images=None, adapters: torch.Tensor | None = None) -> torch.Tensor:
        """`adapters` [T] picks each row's LoRA adapter slot (-1: none); GPT-2 reads no images."""
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, k_cache, v_cache in zip(self.transformer.h, cache.keys, cache.values):
            x = block(x, meta, k_cache, v_cache, adapters)
        return self.transformer.ln_f(x)

    def adapter_layers(self, adapter: LoraAdapter) -> list:
        """PEFT adapters on c_attn (q/k/v already fused in GPT-2's checkpoints), c_proj and c_fc."""
        return adapter_layers(adapter, [(m, [name], [m.out_features]) for name, m in self.named_modules()
                                        if isinstance(m, Conv1D)])

    def pack(self, format: str) -> int:
        """The head is tied to wte, which lookups still need: it reads a packed copy."""
        self.head = kernels.quantize(self.transformer.wte.weight, format)
        return self.transformer.wte.weight.numel() * self.transformer.wte.weight.element_size()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return kernels.linear(hidden, self.head).float()
        return F.linear(hidden, self.transformer.wte.weight).float()  # the head is tied to wte
