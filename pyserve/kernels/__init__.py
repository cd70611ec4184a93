"""The kernel core: one entry point per op, argument checks, and dispatch to a back-end.

Back-ends: `reference` (pure torch, the ground truth), `cpu` (C++), `cuda` (CUDA C++) and `triton`.
Each op picks one from its tensors' device (see `dispatch`); `backend=` or the environment
variable PYSERVE_KERNEL_BACKEND forces one.

Example:
    >>> import torch
    >>> from pyserve import kernels
    >>> q, k, v = (torch.randn(1, 4, 16, 64) for _ in range(3))
    >>> kernels.dense_attention(q, k, v).shape
    torch.Size([1, 4, 16, 64])
"""

import contextlib

import torch

from . import checks
from .checks import FLOAT_DTYPES, INDEX_DTYPES, KernelInputError
from .dispatch import BACKENDS, BackendUnavailable, available, backend_for
from .quantize import FORMATS as WEIGHT_FORMATS
from .quantize import QuantizedWeight, quantize
from .types import (Coef, DecodeOutput, DecoderLayerWeights, DecoderModelWeights, DecoderStackWeights,
                    SampleResult, SamplingRow, SamplingTensors)

__all__ = [
    "BACKENDS", "BackendUnavailable", "Coef", "DecodeOutput", "DecoderLayerWeights", "DecoderModelWeights",
    "DecoderStackWeights", "KernelInputError", "QuantizedWeight", "SampleResult", "SamplingRow", "SamplingTensors",
    "WEIGHT_FORMATS", "available", "batch_invariant", "decode_step", "decoder_stack", "dense_attention",
    "denoise_step", "greedy", "linear", "lora", "paged_attention", "quantize", "rms_norm", "rotary", "sample",
    "set_batch_invariant", "silu_mul", "varlen_attention", "write_kv",
]


def set_batch_invariant(on: bool) -> None:
    """Batch-invariant CPU kernels (see `cpu`: a sequence's numbers do not depend on what shares
    its step or how its prompt was chunked) or the fastest ones; PYSERVE_BATCH_INVARIANT=1 sets it
    at import."""
    from . import cpu
    if cpu.AVAILABLE:
        cpu.set_batch_invariant(on)


def batch_invariant() -> bool:
    from . import cpu
    return cpu.AVAILABLE and cpu.batch_invariant()


def _on(device: torch.device):
    """Launch on the tensors' own GPU (its current stream), whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS normalisation of x [..., H] scaled by weight [H], after adding `residual` when given.

    Returns (normalised, h) where h = x + residual (or x): a decoder's residual stream, carried
    to the next layer's norm so the addition costs no separate pass.
    """
    checks.check(x.shape[-1] == weight.shape[-1], f"weight has {weight.shape[-1]} entries, x has {x.shape[-1]} features")
    if residual is not None:
        checks.tensor(residual, "residual", device=x.device, shape=tuple(x.shape))
    return backend_for(x.device, backend).rms_norm(x, weight, eps, residual)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int, *,
           backend: str | None = None) -> None:
    """Rotary position embedding, in place, of the first `rotated_heads` heads of each row of
    x [T, >= rotated_heads * D] (e.g. the q and k heads of a fused qkv projection), half-split
    layout, by the row's angles: cos, sin [T, D / 2]."""
    checks.tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES)
    checks.tensor(cos, "cos", ndim=2, device=x.device, shape=(x.shape[0], None))
    checks.tensor(sin, "sin", device=x.device, shape=tuple(cos.shape))
    checks.check(rotated_heads * 2 * cos.shape[1] <= x.shape[1],
                 f"{rotated_heads} heads of {2 * cos.shape[1]} do not fit rows of {x.shape[1]}")
    backend_for(x.device, backend).rotary(x, cos, sin, rotated_heads)


def silu_mul(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up for x [..., 2n] = [gate | up] (a fused gate/up projection's output)."""
    checks.check(x.shape[-1] % 2 == 0, f"x must have an even last dimension, got {x.shape[-1]}")
    return backend_for(x.device, backend).silu_mul(x)


def decoder_stack(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: DecoderStackWeights,
                  k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *,
                  scale: float, sliding_window: int = 0, backend: str | None = None) -> torch.Tensor | None:
    """A whole Llama-style decoder stack (pre-norm, rotary, grouped-query paged attention, SwiGLU,
    final norm) over x [T, hidden] in one call: decode steps then pay one call, not a dozen per
    layer. Meaning: `reference.decoder_stack`, the per-layer ops in order.

    Returns None when the back-end has no fused path for this call (the CPU's takes up to
    `_C.MAX_STACK_ROWS` fp32 rows, or `_C.MAX_PACKED_STACK_ROWS` where every product is packed;
    the GPU back-ends have none yet): run the layers op by op.
    """
    checks.tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES)
    checks.check(len(k_caches) == len(v_caches) == len(weights.layers),
                 f"{len(weights.layers)} layers need as many k and v caches")
    half = weights.head_dim // 2
    checks.tensor(cos, "cos", device=x.device, shape=(x.shape[0], half))
    checks.tensor(sin, "sin", device=x.device, shape=(x.shape[0], half))
    checks.tensor(slot_mapping, "slot_mapping", device=x.device, shape=(x.shape[0],))
    return backend_for(x.device, backend).decoder_stack(x, cos, sin, weights, k_caches, v_caches, slot_mapping,
                                                       block_tables, seq_lens, query_start_loc, scale, sliding_window)


def decode_step(token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
                weights: DecoderModelWeights, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], *,
                scale: float, sliding_window: int = 0, backend: str | None = None) -> DecodeOutput | None:
    """A decode step, one new token a sequence, from token ids to logits [B, vocab] (fp32) in one
    call: embedding rows, rotary angles (position x inv_freq), `decoder_stack`, the output product,
    and each row's greedy token (`greedy`). Sequence b's token is at positions[b], its keys and
    values go to cache slot slots[b], and block_tables[b] lists its blocks. The metadata stay host
    lists: at batch 1, building their tensors costs more than the call's own glue. Meaning:
    `reference.decode_step`.

    Returns None when the back-end has no such path (the CPU's takes what `decoder_stack` takes,
    counting the head among the products; the GPU back-ends have none yet): run `decoder_stack`
    and the head instead.
    """
    batch, vocab = len(token_ids), weights.embedding.shape[0]
    checks.check(batch > 0 and len(positions) == len(slots) == len(block_tables) == batch,
                 f"token_ids, positions, slots and block_tables need one entry a sequence, got "
                 f"{batch}, {len(positions)}, {len(slots)} and {len(block_tables)}")
    checks.check(all(0 <= t < vocab for t in token_ids), f"token ids must be in [0, {vocab})")
    checks.check(len(k_caches) == len(v_caches) == len(weights.stack.layers),
                 f"{len(weights.stack.layers)} layers need as many k and v caches")
    if not weights.checked:
        stack, hidden = weights.stack, weights.stack.final_norm.shape[0]
        checks.check(weights.embedding.ndim == 2 and weights.embedding.shape[1] == hidden,
                     f"the embedding must be [vocab, {hidden}], got {tuple(weights.embedding.shape)}")
        checks.check(len(weights.head.shape) == 2 and weights.head.shape[1] == hidden,
                     f"the head must be [vocab, {hidden}], got {tuple(weights.head.shape)}")
        checks.check(tuple(weights.inv_freq.shape) == (stack.head_dim // 2,),
                     f"inv_freq must be [{stack.head_dim // 2}], got {tuple(weights.inv_freq.shape)}")
        weights.checked = True
    return backend_for(weights.embedding.device, backend).decode_step(
        token_ids, positions, slots, block_tables, weights, k_caches, v_caches, scale, sliding_window)


def lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
         rank: torch.Tensor, scale: torch.Tensor, *, backend: str | None = None) -> None:
    """Adds each row's LoRA delta to y [T, N] in place: a batch that mixes adapters (Punica's BGMV).

    Row t uses adapter i = index[t] (-1: none): y[t] += scale[i] * b[i][:, :rank[i]] @ (a[i][:rank[i]] @ x[t]).
    a [L, R, K] and b [L, N, R] hold the loaded adapters padded to the largest rank R; rank [L] int32
    and scale [L] (alpha / r, or alpha / sqrt(r) for rsLoRA) per adapter. A fused projection's
    adapters stack their ranks: q, k and v adapters of rank r are one of rank 3r whose b is block
    diagonal.
    """
    checks.tensor(y, "y", ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    checks.tensor(x, "x", ndim=2, device=y.device, shape=(y.shape[0], None))
    checks.tensor(a, "a", ndim=3, device=y.device, shape=(None, None, x.shape[1]))
    checks.tensor(b, "b", ndim=3, device=y.device, shape=(a.shape[0], y.shape[1], a.shape[1]))
    checks.tensor(index, "index", dtypes=INDEX_DTYPES, device=y.device, shape=(y.shape[0],))
    checks.tensor(rank, "rank", dtypes=INDEX_DTYPES, device=y.device, shape=(a.shape[0],))
    checks.tensor(scale, "scale", device=y.device, shape=(a.shape[0],))
    if y.device.type == "cpu":
        checks.check(index.numel() == 0 or (int(index.min()) >= -1 and int(index.max()) < a.shape[0]),
                     f"index must be in [-1, {a.shape[0]})")
        checks.check(rank.numel() == 0 or (int(rank.min()) >= 0 and int(rank.max()) <= a.shape[1]),
                     f"rank must be in [0, {a.shape[1]}]")
    with _on(y.device):
        backend_for(y.device, backend).lora(y, x, a, b, index, rank, scale)


def linear(x: torch.Tensor, weight: "torch.Tensor | QuantizedWeight", bias: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] (transposed) plus bias [N], as torch.nn.functional.linear.
    `weight` may be packed (`kernels.quantize(weight, "bf16" | "int8" | "int4")`): the result is
    that of its dequantized values.

    On the CPU, decode-sized batches (up to 8 rows, fp32) run the C++ matrix-vector kernels, which
    stream the weights (fp32, or packed) faster than BLAS GEMV; everything else goes to torch.
    """
    if isinstance(weight, QuantizedWeight):
        checks.check(x.shape[-1] == weight.shape[1], f"x has {x.shape[-1]} features, the weight takes {weight.shape[1]}")
        checks.check(x.device == weight.device, f"x is on {x.device}, the weight on {weight.device}")
    return backend_for(x.device, backend).linear(x, weight, bias)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Store new keys/values [T, Hkv, D] into the caches [num_blocks, Hkv, block_size, D] in place,
    converted to the caches' dtype (rounded to nearest even: fp32 keys into a bf16 cache).

    Token i goes to slot `slot_mapping[i]` = block * block_size + offset; a slot of -1 is skipped.
    """
    dev = k.device
    checks.tensor(k, "k", ndim=3, dtypes=FLOAT_DTYPES)
    checks.tensor(v, "v", dtypes=FLOAT_DTYPES, device=dev, shape=tuple(k.shape))
    checks.tensor(k_cache, "k_cache", ndim=4, dtypes=FLOAT_DTYPES, device=dev,
                  shape=(None, k.shape[1], None, k.shape[2]), contiguous=True)
    checks.tensor(v_cache, "v_cache", dtypes=(k_cache.dtype,), device=dev, shape=tuple(k_cache.shape), contiguous=True)
    checks.tensor(slot_mapping, "slot_mapping", dtypes=INDEX_DTYPES, device=dev, shape=(k.shape[0],))
    with _on(dev):
        backend_for(dev, backend).write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *, scale: float | None = None,
                    sliding_window: int = 0, max_query_len: int | None = None, max_seq_len: int | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Causal attention for a mixed batch of prefill chunks and decode steps over a paged KV cache.

    q [T, H, D]: the new tokens of all sequences back to back; sequence s owns rows
    query_start_loc[s]:query_start_loc[s+1] and they are the last of its seq_lens[s] tokens (whose
    keys/values must already be in the cache). k_cache/v_cache [num_blocks, Hkv, block_size, D], so
    one block of one KV head is contiguous; H is a multiple of Hkv (GQA/MQA); block_tables
    [S, max_blocks]. `sliding_window` > 0 lets a query
    at position p see keys at p - window + 1 .. p. Returns [T, H, D] in q's dtype. The caches may
    hold another dtype than q (the CPU back-end reads fp32 or bf16 caches in place).

    `max_query_len` and `max_seq_len` (the step's longest query and sequence, known on the host)
    size the launch; without them they are read from the tensors, which on a GPU waits for it.
    """
    dev = q.device
    checks.tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    t, h, d = q.shape
    checks.tensor(k_cache, "k_cache", ndim=4, dtypes=FLOAT_DTYPES, device=dev, shape=(None, None, None, d),
                  contiguous=True)
    checks.tensor(v_cache, "v_cache", dtypes=(k_cache.dtype,), device=dev, shape=tuple(k_cache.shape), contiguous=True)
    hkv = k_cache.shape[1]
    checks.check(h % hkv == 0, f"q has {h} heads, which is not a multiple of the cache's {hkv} KV heads")
    checks.tensor(block_tables, "block_tables", ndim=2, dtypes=INDEX_DTYPES, device=dev)
    s = block_tables.shape[0]
    checks.tensor(seq_lens, "seq_lens", dtypes=INDEX_DTYPES, device=dev, shape=(s,))
    checks.tensor(query_start_loc, "query_start_loc", dtypes=INDEX_DTYPES, device=dev, shape=(s + 1,))
    checks.check(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")
    if dev.type == "cpu" and s > 0:  # cheap on the CPU; on a GPU it would force a sync
        # as lists: a step's few sequences check in a few us, where each tensor op costs ~10
        starts, lens = query_start_loc.tolist(), seq_lens.tolist()
        checks.check(starts[-1] == t, f"query_start_loc[-1] must equal q.shape[0] = {t}")
        checks.check(all(0 <= end - start <= n for start, end, n in zip(starts, starts[1:], lens)),
                     "each sequence's query length must be between 0 and its seq_len")
        checks.check(max(lens) <= block_tables.shape[1] * k_cache.shape[2],
                     "a seq_len exceeds what its block table can address")
    scale = d**-0.5 if scale is None else float(scale)
    if s > 0 and max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if s > 0 and max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    with _on(dev):
        return backend_for(dev, backend).paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                         scale, int(sliding_window), max_query_len or 0,
                                                         max_seq_len or 0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    causal: bool = False, backend: str | None = None) -> torch.Tensor:
    """Attention over q [B, H, Lq, D] and k/v [B, Hkv, Lk, D]; causal masks align the last query
    with the last key. Returns [B, H, Lq, D]."""
    dev = q.device
    checks.tensor(q, "q", ndim=4, dtypes=FLOAT_DTYPES)
    b, h, _, d = q.shape
    checks.tensor(k, "k", ndim=4, dtypes=(q.dtype,), device=dev, shape=(b, None, None, d))
    checks.tensor(v, "v", dtypes=(q.dtype,), device=dev, shape=tuple(k.shape))
    checks.check(h % k.shape[1] == 0, f"q has {h} heads, which is not a multiple of k's {k.shape[1]} heads")
    scale = d**-0.5 if scale is None else float(scale)
    with _on(dev):
        return backend_for(dev, backend).dense_attention(q, k, v, scale, causal)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     max_seqlen: int | None = None, scale: float | None = None, causal: bool = False,
                     backend: str | None = None) -> torch.Tensor:
    """Self-attention of sequences packed without padding (encoders: embeddings, rerankers):
    q [T, H, D] and k/v [T, Hkv, D], sequence s the rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1
    (int32 [S + 1], from 0 to T), each attending within itself, causally or not. `max_seqlen`
    (the longest sequence, from the host's lengths) sizes GPU launches without reading
    cu_seqlens back. Returns [T, H, D]."""
    dev = q.device
    checks.tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    t, h, d = q.shape
    checks.tensor(k, "k", ndim=3, dtypes=(q.dtype,), device=dev, shape=(t, None, d))
    checks.tensor(v, "v", dtypes=(q.dtype,), device=dev, shape=tuple(k.shape))
    checks.tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    checks.check(h % k.shape[1] == 0, f"q has {h} heads, which is not a multiple of k's {k.shape[1]} heads")
    checks.check(cu_seqlens.numel() >= 1, "cu_seqlens needs at least one entry (0)")
    scale = d**-0.5 if scale is None else float(scale)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    with _on(dev):
        return backend_for(dev, backend).varlen_attention(q, k, v, cu_seqlens, scale, causal, max_seqlen)


def sample(logits: torch.Tensor, params: SamplingTensors, *, num_logprobs: int = 0,
           backend: str | None = None) -> SampleResult:
    """Choose one token per row of logits [B, V] with that row's parameters.

    Per row: repetition penalty (divides positive, multiplies negative logits of prompt and output
    tokens), presence and frequency penalties (over output counts), logit bias; then greedy when
    temperature is 0, else temperature, top-k, top-p, min-p and a draw from the counter-based
    generator keyed by (seed, step), so a seeded row's token does not depend on its batch.
    A row with an allowed-token mask (`params.allowed_row` >= 0) draws only tokens its mask allows.
    Log-probabilities (of the chosen token and the top `num_logprobs`) are of the raw logits.
    A NaN logit counts as -inf, so it is never chosen (a row of NaNs yields token 0).
    """
    dev = logits.device
    checks.tensor(logits, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    batch, vocab = logits.shape
    checks.check(params.batch_size == batch, f"params has {params.batch_size} rows, logits has {batch}")
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "step"):
        checks.tensor(getattr(params, name), f"params.{name}", device=dev, shape=(batch,))
    for name in ("prompt_offsets", "output_offsets", "bias_offsets"):
        checks.tensor(getattr(params, name), f"params.{name}", device=dev, shape=(batch + 1,))
    for name in ("prompt_tokens", "output_tokens", "bias_tokens"):
        checks.tensor(getattr(params, name), f"params.{name}", device=dev, ndim=1)
    checks.tensor(params.bias_values, "params.bias_values", device=dev, shape=tuple(params.bias_tokens.shape))
    checks.check(0 <= num_logprobs <= vocab, f"num_logprobs must be in [0, {vocab}], got {num_logprobs}")
    checks.check((params.allowed_bits is None) == (params.allowed_row is None),
                 "params.allowed_bits and params.allowed_row come together")
    if params.allowed_bits is not None:
        checks.tensor(params.allowed_bits, "params.allowed_bits", ndim=2, dtypes=(torch.int32,), device=dev,
                      shape=(None, (vocab + 31) // 32))
        checks.tensor(params.allowed_row, "params.allowed_row", dtypes=(torch.int32,), device=dev, shape=(batch,))
    # On the CPU the values (ranges, token ids, offsets) are checked by the back-end that reads
    # them: the C++ sampler in one pass over the rows, the reference one in torch. Every decode
    # step comes through here, and a dozen tensor ops on tiny tensors cost about what a draw does.
    # The GPU back-ends take them as given: a check there would wait for the device.
    with _on(dev):
        return backend_for(dev, backend).sample(logits, params, num_logprobs)


def greedy(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Each row's first maximum [B] (int64), a NaN logit counting as -inf: the token `sample`
    draws at temperature 0 for a row without penalties, bias or mask, without `sample`'s other
    passes over the row (its log-probabilities)."""
    checks.tensor(logits, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    with _on(logits.device):
        return backend_for(logits.device, backend).greedy(logits)


def denoise_step(x: torch.Tensor, cond: torch.Tensor, coef: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, *,
                 uncond: torch.Tensor | None = None, prev_x0: torch.Tensor | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused scheduler step for every row of latents x [B, ...].

    cond (and uncond, for classifier-free guidance) are the denoiser's outputs for x; coef
    [B, Coef.COUNT] holds each row's coefficients (see `Coef` and
    `pyserve.engine.diffusion.noise_schedules`); prev_x0 is the
    previous step's x0 for multistep solvers; noise is drawn per row from (seed, step).
    Returns (x_next, x0).
    """
    dev = x.device
    checks.tensor(x, "x", dtypes=FLOAT_DTYPES)
    checks.check(x.dim() >= 2, f"x must be [batch, ...], got shape {tuple(x.shape)}")
    batch = x.shape[0]
    checks.tensor(cond, "cond", device=dev, shape=tuple(x.shape))
    if uncond is not None:
        checks.tensor(uncond, "uncond", device=dev, shape=tuple(x.shape))
    if prev_x0 is not None:
        checks.tensor(prev_x0, "prev_x0", device=dev, shape=tuple(x.shape))
    checks.tensor(coef, "coef", dtypes=FLOAT_DTYPES, device=dev, shape=(batch, Coef.COUNT))
    checks.tensor(seed, "seed", dtypes=INDEX_DTYPES, device=dev, shape=(batch,))
    checks.tensor(step, "step", dtypes=INDEX_DTYPES, device=dev, shape=(batch,))
    with _on(dev):
        return backend_for(dev, backend).denoise_step(x, cond, uncond, prev_x0, coef, seed, step)
