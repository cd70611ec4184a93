"""A text-generation model serving embeddings (`--task embed`): each input's vector is the final
hidden state of its last token, normalised, as decoder embedders (last-token pooling) are used.

The decoder's own forward runs over the packed inputs as one causal prefill step: a scratch KV
cache just large enough for the step (its blocks numbered in order), thrown away afterwards.

Example:
    engine = EncoderEngine(DecoderEmbedder(plugin.load(model_dir)))
"""

import torch
import torch.nn.functional as F

from ...tasks import EMBED, AttentionMetadata, EncoderSpec, KVCache, TextGenerationModel

BLOCK_SIZE = 16


class DecoderEmbedder:
    def __init__(self, model: TextGenerationModel):
        self.model, self.tokenizer = model, model.tokenizer
        spec = model.spec
        probe = self._hidden(torch.zeros(1, dtype=torch.long, device=spec.device),
                             torch.tensor([0, 1], dtype=torch.int32, device=spec.device), 1)
        self.spec = EncoderSpec(EMBED, probe.shape[1], spec.max_model_len, True, spec.device, spec.dtype)

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        hidden = self._hidden(input_ids, cu_seqlens, max_seqlen)
        return F.normalize(hidden[cu_seqlens[1:].long() - 1].float(), dim=-1)

    def _hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        spec, device = self.model.spec, input_ids.device
        bounds = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        blocks = [-(-n // BLOCK_SIZE) for n in lengths]
        first = [sum(blocks[:i]) for i in range(len(blocks))]
        tables = torch.tensor([[f + b for b in range(max(blocks))] for f in first], dtype=torch.int32, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        slots = (tables[owner, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE)
        meta = AttentionMetadata(slots, tables, torch.tensor(lengths, dtype=torch.int32, device=device),
                                 cu_seqlens.to(torch.int32), max_query_len=max_seqlen, max_seq_len=max_seqlen)
        cache = KVCache.allocate(spec.num_layers, sum(blocks), spec.num_kv_heads, BLOCK_SIZE, spec.head_dim, spec.dtype,
                                 device)
        return self.model.forward(input_ids, positions, meta, cache)
