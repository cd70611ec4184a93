"""Pure-torch kernels: the readable ground truth every other back-end is tested against.

These favour clarity over speed (plain loops over sequences and rows, fp32 math).
"""

import torch

from . import rng
from .checks import check
from .quantize import QuantizedWeight, quantize_rows
from .types import Coef, DecodeOutput, DecoderModelWeights, DecoderStackWeights, SampleResult, SamplingTensors

# ---------------------------------------------------------------------------------------------
# Attention


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store token i's key/value at cache slot `slot_mapping[i]` (block * block_size + offset); -1 skips."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[2]
    k_cache[slots // block_size, :, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, :, slots % block_size] = v[keep].to(v_cache.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D], allowed [Lq, Lk] -> [Lq, H, D] in fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key attends to nothing
    return torch.einsum("hqk,khd->qhd", probs, v)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, sliding_window: int) -> torch.Tensor:
    allowed = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    dist = q_pos[:, None] - k_pos[None, :]
    if causal:
        allowed &= dist >= 0
    if sliding_window > 0:
        allowed &= dist < sliding_window
    return allowed


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int = 0, max_query_len: int = 0, max_seq_len: int = 0) -> torch.Tensor:
    """Causal attention of a mixed prefill/decode batch against a paged KV cache.

    q [T, H, D] holds the new tokens of every sequence back to back; sequence s owns rows
    query_start_loc[s]:query_start_loc[s+1], which are the last tokens of its seq_lens[s] tokens.
    k_cache/v_cache [num_blocks, Hkv, block_size, D]; block_tables [S, max_blocks].
    A query at position p sees keys at positions j with j <= p and p - j < sliding_window (if > 0).
    """
    out = torch.empty(q.shape, dtype=torch.float32)
    block_size = k_cache.shape[2]
    for s in range(len(seq_lens)):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        ctx = int(seq_lens[s])
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[s, :n_blocks].long()
        k = k_cache[blocks].transpose(1, 2).flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        v = v_cache[blocks].transpose(1, 2).flatten(0, 1)[:ctx]
        q_pos = torch.arange(ctx - (end - start), ctx)
        allowed = _allowed(q_pos, torch.arange(ctx), True, sliding_window)
        out[start:end] = _attend(q[start:end], k, v, allowed, scale)
    return out.to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D]. Causal masks align the last query with the last key."""
    batch, _, lq, _ = q.shape
    lk = k.shape[2]
    allowed = _allowed(torch.arange(lk - lq, lk), torch.arange(lk), causal, 0)
    out = torch.stack([_attend(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), allowed, scale)
                       for b in range(batch)])
    return out.transpose(1, 2).to(q.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                     causal: bool = False) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] packed: sequence s is rows cu_seqlens[s]..cu_seqlens[s+1]-1
    and attends within itself."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            allowed = _allowed(torch.arange(end - start), torch.arange(end - start), causal, 0)
            out[start:end] = _attend(q[start:end], k[start:end], v[start:end], allowed, scale)
    return out.to(q.dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, QuantizedWeight):  # the packed formats mean their dequantized values
        if weight.int8_activations:
            x = quantize_rows(x).to(x.dtype)
        weight = weight.dequantize(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# Per-layer steps of a decoder


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight, h


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int) -> None:
    t, half = cos.shape
    heads = x[:, :rotated_heads * 2 * half].view(t, rotated_heads, 2 * half)
    x1, x2 = heads.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    heads.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
         rank: torch.Tensor, scale: torch.Tensor) -> None:
    for t, i in enumerate(index.tolist()):
        if i >= 0:
            r = int(rank[i])
            shrunk = a[i, :r].float() @ x[t].float()
            y[t] += (float(scale[i]) * (b[i, :, :r].float() @ shrunk)).to(y.dtype)


def decoder_stack(x, cos, sin, w: DecoderStackWeights, k_caches, v_caches, slot_mapping, block_tables, seq_lens,
                  query_start_loc, scale, sliding_window=0) -> torch.Tensor:
    """The meaning of the fused stack: its steps, one reference op after another."""
    t, residual = x.shape[0], None
    for layer, k_cache, v_cache in zip(w.layers, k_caches, v_caches):
        h, residual = rms_norm(x, layer.input_norm, w.eps, residual)
        qkv = linear(h, layer.qkv, layer.qkv_bias)
        rotary(qkv, cos, sin, w.heads + w.kv_heads)
        q, k, v = qkv.split([w.heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim], dim=-1)
        k, v = k.reshape(t, w.kv_heads, w.head_dim), v.reshape(t, w.kv_heads, w.head_dim)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        attn = paged_attention(q.reshape(t, w.heads, w.head_dim), k_cache, v_cache, block_tables, seq_lens,
                               query_start_loc, scale, sliding_window)
        h, residual = rms_norm(linear(attn.reshape(t, -1), layer.o), layer.post_norm, w.eps, residual)
        x = linear(silu_mul(linear(h, layer.gate_up)), layer.down)
    return rms_norm(x, w.final_norm, w.eps, residual)[0]


def decode_step(token_ids, positions, slots, block_tables, w: DecoderModelWeights, k_caches, v_caches, scale,
                sliding_window=0) -> DecodeOutput:
    """The meaning of the fused decode step: its metadata as tensors, then embedding, rotary
    angles, the stack and the head."""
    dev, batch = w.embedding.device, len(token_ids)
    width = max(len(table) for table in block_tables)
    tables = torch.tensor([table + [0] * (width - len(table)) for table in block_tables], dtype=torch.int32,
                          device=dev)
    angles = torch.tensor(positions, dtype=torch.float32, device=dev)[:, None] * w.inv_freq[None, :].float()
    x = w.embedding[torch.tensor(token_ids, device=dev)]
    hidden = decoder_stack(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype), w.stack, k_caches, v_caches,
                           torch.tensor(slots, dtype=torch.int64, device=dev), tables,
                           torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev),
                           torch.arange(batch + 1, dtype=torch.int32, device=dev), scale, sliding_window)
    logits = linear(hidden, w.head).float()
    return DecodeOutput(logits, greedy(logits).tolist())


# ---------------------------------------------------------------------------------------------
# Sampling


def _row_slice(values: torch.Tensor, offsets: torch.Tensor, row: int) -> torch.Tensor:
    return values[int(offsets[row]):int(offsets[row + 1])].long()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().masked_fill(logits.isnan(), float("-inf")).argmax(-1)


def unpack_bits(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of packed int32 words (bit i % 32 of word i // 32) as bools."""
    shifts = torch.arange(32, dtype=torch.int64)
    return ((words.long()[:, None] >> shifts) & 1).bool().reshape(-1)[:count]


def processed_logits(logits: torch.Tensor, p: SamplingTensors, row: int) -> torch.Tensor:
    """Row `row` of the logits after penalties, logit bias and its allowed-token mask (fp32)."""
    x = logits[row].float().clone()
    vocab = x.shape[0]
    prompt = _row_slice(p.prompt_tokens, p.prompt_offsets, row)
    output = _row_slice(p.output_tokens, p.output_offsets, row)
    rep = float(p.repetition_penalty[row])
    if rep != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.cat([prompt, output])] = True
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    counts = torch.bincount(output, minlength=vocab).float()
    x = x - float(p.frequency_penalty[row]) * counts - float(p.presence_penalty[row]) * (counts > 0).float()
    bias_tok = _row_slice(p.bias_tokens, p.bias_offsets, row)
    bias_val = p.bias_values[int(p.bias_offsets[row]):int(p.bias_offsets[row + 1])]
    x.index_add_(0, bias_tok, bias_val.float())
    if p.allowed_row is not None and int(p.allowed_row[row]) >= 0:
        x = x.masked_fill(~unpack_bits(p.allowed_bits[int(p.allowed_row[row])], vocab), float("-inf"))
    return torch.where(torch.isnan(x), float("-inf"), x)  # a NaN is never chosen


def candidate_mask(x: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens a non-greedy draw may pick, from processed logits x.

    top-k keeps values >= the k-th largest; top-p then keeps values >= the largest threshold whose
    upper set holds at least top_p of the top-k mass; min-p keeps p >= min_p * p_max. Ties stay in.
    """
    x = x / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[0]:
        keep &= x >= torch.topk(x, top_k).values[-1]
    if top_p < 1.0:
        probs = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=0)
        sorted_probs, _ = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
        last = int((mass_before < top_p).sum()) - 1
        keep &= probs >= sorted_probs[max(last, 0)]
    if min_p > 0.0:
        keep &= torch.exp(x - x.max()) >= min_p
    return keep


def draw(x: torch.Tensor, keep: torch.Tensor, temperature: float, u: float) -> int:
    """Inverse-CDF draw over the kept tokens in ascending token order."""
    weights = torch.exp((x - x.max()) / temperature) * keep
    cdf = torch.cumsum(weights, 0)
    hit = torch.nonzero(cdf > u * cdf[-1])
    return int(hit[0]) if len(hit) else int(torch.nonzero(keep)[-1])


def _check_sample_values(p: SamplingTensors, vocab: int) -> None:
    """The C++ sampler's checks (csrc/cpu/sampling.cpp check_sample_args), in torch."""
    for name in ("prompt", "output", "bias"):
        ids, off = getattr(p, f"{name}_tokens"), getattr(p, f"{name}_offsets")
        check(int(off[0]) == 0 and int(off[-1]) == ids.numel() and bool((off[1:] >= off[:-1]).all()),
              f"params.{name}_offsets must rise from 0 to the length of params.{name}_tokens")
        check(ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab),
              f"params.{name}_tokens holds token ids outside [0, {vocab})")
    check(bool(((p.top_p > 0) & (p.top_p <= 1)).all()), "params.top_p must be in (0, 1]")
    check(bool((p.temperature >= 0).all()), "params.temperature must be >= 0")
    check(bool((p.repetition_penalty > 0).all()), "params.repetition_penalty must be > 0")
    if p.allowed_row is not None:
        masks = p.allowed_bits.shape[0]
        check(bool(((p.allowed_row >= -1) & (p.allowed_row < masks)).all()),
              f"params.allowed_row must be in [-1, {masks})")


def sample(logits: torch.Tensor, p: SamplingTensors, num_logprobs: int = 0) -> SampleResult:
    """Pick one token per row of logits [B, V]; see `pyserve.kernels.sample` for the contract."""
    batch = logits.shape[0]
    _check_sample_values(p, logits.shape[1])
    raw = torch.log_softmax(logits.float(), dim=-1)
    u = rng.uniform(p.seed, p.step, torch.zeros_like(p.seed), rng.SAMPLE_STREAM)
    tokens = torch.empty(batch, dtype=torch.int64)
    for r in range(batch):
        x = processed_logits(logits, p, r)
        temp = float(p.temperature[r])
        if temp <= 0.0:
            tokens[r] = int(torch.argmax(x))
            continue
        keep = candidate_mask(x, temp, int(p.top_k[r]), float(p.top_p[r]), float(p.min_p[r]))
        tokens[r] = draw(x, keep, temp, float(u[r]))
    top = torch.topk(raw, num_logprobs, dim=-1)
    return SampleResult(tokens, raw.gather(1, tokens[:, None])[:, 0], top.indices, top.values)


# ---------------------------------------------------------------------------------------------
# Denoising


def denoise_step(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, prev_x0: torch.Tensor | None,
                 coef: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scheduler step for each row of x [B, ...]; coefficients per row in `coef` [B, Coef.COUNT]."""
    batch = x.shape[0]
    shape = x.shape
    xf, outf = x.reshape(batch, -1).float(), cond.reshape(batch, -1).float()
    c = coef.float().T[:, :, None]  # columns as [B, 1] rows
    if uncond is not None:
        u = uncond.reshape(batch, -1).float()
        outf = u + c[Coef.GUIDANCE] * (outf - u)
    x0 = c[Coef.X0_X] * xf + c[Coef.X0_OUT] * outf
    clip = c[Coef.CLIP]
    x0 = torch.where(clip > 0, torch.maximum(torch.minimum(x0, clip), -clip), x0)
    eps = c[Coef.EPS_X] * xf + c[Coef.EPS_OUT] * outf
    nxt = c[Coef.NEXT_X] * xf + c[Coef.NEXT_X0] * x0 + c[Coef.NEXT_EPS] * eps
    if prev_x0 is not None:
        nxt = nxt + c[Coef.NEXT_PREV_X0] * prev_x0.reshape(batch, -1).float()
    offsets = torch.arange(xf.shape[1])[None, :]
    z = rng.normal(seed[:, None], step[:, None], offsets, rng.NOISE_STREAM)
    nxt = nxt + c[Coef.NOISE] * z
    return nxt.reshape(shape).to(x.dtype), x0.reshape(shape).to(x.dtype)
