"""The C++ CPU back-end (`pyserve._C`): fp32 compute; other dtypes are converted at the edges.

The x86 kernels pick their instruction set at run time. `PYSERVE_CPU_ISA` (avx2, scalar) caps it,
so that an AVX-512 machine runs the paths that AVX2-only machines take; `set_isa_limit` does the
same from code (tests).

Batch invariance: BLAS sums a product's rows in an order that depends on how many rows there
are, so a sequence's logits move in the last bits with what shares its step. With
`PYSERVE_BATCH_INVARIANT=1` (or `set_batch_invariant(True)`) every fp32 product, however many rows,
runs the C++ row kernel, whose per-row sums do not depend on the row count: a seeded sampled
completion is then bit-identical alone and in any batch, at the cost of BLAS's speed on long
prompts.
"""

import os

import torch

from . import reference
from .checks import check
from .quantize import FORMAT_CODES, QuantizedWeight, input_rows, quantize_rows, unpacked_linear
from .types import DecodeOutput, DecoderModelWeights, DecoderStackWeights, SampleResult, SamplingTensors

try:
    from pyserve import _C
    AVAILABLE = True
except ImportError:  # the extension was not built
    _C = None
    AVAILABLE = False


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.float32)


def _i32(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.int32)


def _i64(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.int64)


def _opt(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# The KV cache dtypes the C++ attention reads in place (values are fp32 in its arithmetic).
CACHE_DTYPES = (torch.float32, torch.bfloat16)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k_cache.dtype not in CACHE_DTYPES or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the cpu back-end needs contiguous float32 or bfloat16 KV caches")
    slots = _i64(slot_mapping)
    k, v = _f32(k), _f32(v)
    _C.write_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                k.shape[0], k.shape[1], k_cache.shape[2], k.shape[2], k_cache.dtype == torch.bfloat16)


# Beyond MAX_LINEAR_ROWS rows the fp32 kernel makes passes of eight over cached weight rows; that
# beats torch's GEMM here (up to 1.6x on a 32000x512 head at 32 rows) while eight input rows of K
# floats stay in L1, and loses once they do not (0.65x at K = 1536): measured on this project's
# 2-core AVX-512 machine.
PASSES_MAX_ROWS, PASSES_MAX_K = 32, 1024


_batch_invariant = False


def set_batch_invariant(on: bool) -> None:
    """Batch-invariant kernels (True: every fp32 product on the row kernel, attention's rows one at
    a time, no split decode) or the fastest (False); for the next call on any thread."""
    global _batch_invariant
    _batch_invariant = bool(on)
    _C.set_batch_invariant(_batch_invariant)


def batch_invariant() -> bool:
    return _batch_invariant


def linear(x, weight, bias=None):
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    rows = input_rows(x)
    decode_sized = (_batch_invariant or rows <= _C.MAX_LINEAR_ROWS
                    or (rows <= PASSES_MAX_ROWS and x.shape[-1] <= PASSES_MAX_K))
    fits = (0 < rows and decode_sized and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and (bias is None or bias.dtype == torch.float32))
    if not fits:
        return torch.nn.functional.linear(x, weight, bias)
    xf = x.contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    _C.linear(xf.data_ptr(), weight.data_ptr(), _opt(None if bias is None else bias.contiguous()), out.data_ptr(),
              rows, weight.shape[0], weight.shape[1])
    return out


ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}  # csrc/cpu/quantized_linear.h Isa


def best_isa() -> str:
    """The widest instruction set the packed-weight kernels use on this CPU, within the limit."""
    return {v: k for k, v in ISAS.items()}[_C.best_isa()]


def set_isa_limit(isa: str) -> None:
    """Cap the instruction set every CPU kernel may use ("auto": none); returns nothing, takes effect
    for the next call on any thread."""
    if isa not in ISAS:
        raise ValueError(f"PYSERVE_CPU_ISA: {isa!r} is not one of {sorted(ISAS)}")
    _C.set_isa_limit(ISAS[isa])


if AVAILABLE:
    set_isa_limit(os.environ.get("PYSERVE_CPU_ISA", "auto").lower() or "auto")
    set_batch_invariant(os.environ.get("PYSERVE_BATCH_INVARIANT", "0") not in ("", "0"))


def rms_norm(x, weight, eps, residual=None):
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps, residual)
    xf, w = _f32(x), _f32(weight)
    rf = None if residual is None else _f32(residual)
    out = torch.empty_like(xf)
    h = xf if rf is None else torch.empty_like(xf)
    _C.rms_norm(xf.data_ptr(), _opt(rf), w.data_ptr(), out.data_ptr(), 0 if rf is None else h.data_ptr(),
                xf.numel() // xf.shape[-1] if xf.numel() else 0, xf.shape[-1], float(eps))
    return out, h


def rotary(x, cos, sin, rotated_heads):
    if x.dtype != torch.float32 or x.stride(-1) != 1 or cos.dtype != torch.float32:
        return reference.rotary(x, cos, sin, rotated_heads)
    c, s = _f32(cos), _f32(sin)
    _C.rotary(x.data_ptr(), c.data_ptr(), s.data_ptr(), x.shape[0], x.stride(0), rotated_heads, 2 * c.shape[1])


def silu_mul(x):
    if x.dtype != torch.float32:
        return reference.silu_mul(x)
    xf = _f32(x)
    out = torch.empty(*xf.shape[:-1], xf.shape[-1] // 2, dtype=torch.float32)
    _C.silu_mul(xf.data_ptr(), out.data_ptr(), xf.numel() // xf.shape[-1] if xf.numel() else 0, xf.shape[-1] // 2)
    return out


def _product_fields(weight, bias=None) -> list[int]:
    """A product's address fields in the C++ stack's table (see csrc/cpu/decoder.h)."""
    if isinstance(weight, QuantizedWeight):
        return [weight.data.data_ptr(), _opt(weight.scales), _opt(bias), *weight.shape, FORMAT_CODES[weight.format],
                int(weight.int8_activations)]
    return [weight.data_ptr(), 0, _opt(bias), *weight.shape, 0, 0]


def _stack_table(w: DecoderStackWeights, k_caches, v_caches) -> torch.Tensor:
    """The C++ stack's per-layer addresses (see csrc/bindings_cpu.cpp), built once per KV cache.
    A cache is known by its lists of tensors (an engine's never changes) and its first tensor: a
    decode step reads this, and twenty data_ptr() calls on cold caches cost it ~0.1 ms. The key
    holds the lists, so the addresses stay valid; a dropped engine's cache lives until the model's
    next engine makes its first step."""
    known = w.table_key
    if (w.table is not None and known[0] is k_caches and known[1] is v_caches
            and known[2:] == (len(k_caches), k_caches[0].data_ptr())):
        return w.table
    cache = k_caches[0]
    w.table_cache_fits = all(c.dtype == cache.dtype and c.shape == cache.shape for c in (*k_caches, *v_caches)) \
        and cache.dtype in CACHE_DTYPES and cache.shape[2] <= _C.MAX_BLOCK_SIZE
    fields = []
    for layer, k_cache, v_cache in zip(w.layers, k_caches, v_caches):
        fields += [layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), *_product_fields(layer.qkv, layer.qkv_bias),
                   *_product_fields(layer.o), *_product_fields(layer.gate_up), *_product_fields(layer.down),
                   k_cache.data_ptr(), v_cache.data_ptr()]
    w.table = torch.tensor(fields, dtype=torch.int64)
    w.table_key = (k_caches, v_caches, len(k_caches), k_caches[0].data_ptr())
    return w.table


def _readable(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def stack_fits(w: DecoderStackWeights, rows: int, dtype: torch.dtype, k_caches, v_caches) -> bool:
    """Whether the C++ stack takes `rows` rows of `dtype` over these caches: decode-sized fp32 rows
    (up to MAX_STACK_ROWS, or MAX_PACKED_STACK_ROWS where every product is packed), weights and
    caches it can read in place (checked once per weights object and cache: decode steps call this
    every time)."""
    if not (dtype == torch.float32 and 0 < rows <= _C.MAX_PACKED_STACK_ROWS):
        return False
    _stack_table(w, k_caches, v_caches)
    if not w.table_cache_fits:
        return False
    if w.cpu_readable is None:
        tensors = [w.final_norm] + [t for layer in w.layers for t in (layer.input_norm, layer.post_norm,
                                                                       layer.qkv_bias) if t is not None]
        products = [p for layer in w.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        fp32 = [p for p in products if not isinstance(p, QuantizedWeight)]
        w.cpu_readable = (all(map(_readable, tensors + fp32)) and w.head_dim <= _C.MAX_HEAD_DIM
                          and w.heads // w.kv_heads <= _C.MAX_GROUP)
        w.cpu_max_rows = _C.MAX_STACK_ROWS if fp32 else _C.MAX_PACKED_STACK_ROWS
    return w.cpu_readable and rows <= w.cpu_max_rows


def decoder_stack(x, cos, sin, w: DecoderStackWeights, k_caches, v_caches, slot_mapping, block_tables, seq_lens,
                  query_start_loc, scale, sliding_window=0):
    if not stack_fits(w, x.shape[0], x.dtype, k_caches, v_caches):
        return None  # the caller runs the layers op by op
    table = w.table
    out = x.contiguous().clone()
    c, s = _f32(cos), _f32(sin)
    slots, bt, sl, qs = _i64(slot_mapping), _i32(block_tables), _i32(seq_lens), _i32(query_start_loc)
    _C.decoder_stack(out.data_ptr(), out.shape[0], out.shape[1], w.heads, w.kv_heads, w.head_dim, float(w.eps),
                     c.data_ptr(), s.data_ptr(), table.data_ptr(), len(w.layers), w.final_norm.data_ptr(),
                     slots.data_ptr(), bt.data_ptr(), sl.data_ptr(), qs.data_ptr(), sl.shape[0], bt.shape[1],
                     k_caches[0].shape[2], int(sliding_window), float(scale), k_caches[0].dtype == torch.bfloat16)
    return out


def decode_step(token_ids, positions, slots, block_tables, w: DecoderModelWeights, k_caches, v_caches, scale,
                sliding_window=0):
    s = w.stack
    if not stack_fits(s, len(token_ids), w.embedding.dtype, k_caches, v_caches):
        return None
    if w.cpu_readable is None:
        packed_head = isinstance(w.head, QuantizedWeight)
        w.cpu_readable = _readable(w.embedding) and _readable(w.inv_freq) and (packed_head or _readable(w.head))
        w.cpu_max_rows = s.cpu_max_rows if packed_head else _C.MAX_STACK_ROWS
        w.head_fields = _product_fields(w.head)
    if not (w.cpu_readable and len(token_ids) <= w.cpu_max_rows):
        return None
    table = s.table
    logits = torch.empty(len(token_ids), w.head_fields[3], dtype=torch.float32)  # the head's rows
    greedy = _C.decode_step(logits.data_ptr(), token_ids, positions, slots, block_tables, w.embedding.data_ptr(),
                            w.inv_freq.data_ptr(), w.head_fields, w.embedding.shape[1], s.heads, s.kv_heads,
                            s.head_dim, float(s.eps), table.data_ptr(), len(s.layers), s.final_norm.data_ptr(),
                            k_caches[0].shape[2], int(sliding_window), float(scale),
                            k_caches[0].dtype == torch.bfloat16)
    return DecodeOutput(logits, greedy)


def lora(y, x, a, b, index, rank, scale):
    if y.dtype != torch.float32 or not y.is_contiguous():
        return reference.lora(y, x, a, b, index, rank, scale)
    xf, af, bf = _f32(x), _f32(a), _f32(b)
    idx, ranks, scales = _i32(index), _i32(rank), _f32(scale)
    _C.lora(y.data_ptr(), xf.data_ptr(), af.data_ptr(), bf.data_ptr(), idx.data_ptr(), ranks.data_ptr(),
            scales.data_ptr(), y.shape[0], y.shape[1], x.shape[1], a.shape[1])


def quantized_linear(x, weight: QuantizedWeight, bias=None, isa: str = "auto"):
    """Decode-sized batches (up to 64 rows) read the packed weights in C++; larger ones (prefill)
    take torch's GEMM on the weight unpacked a block of rows at a time (`unpacked_linear`). w8a8
    and w4a8 keep their integer kernels for any batch on a CPU with AVX2: there they outpace that
    GEMM (a Llama layer's products at 2,048 rows on 2 AVX2 cores: w4a8 1.34x, w8a8 1.0x to 1.1x)."""
    rows = input_rows(x)
    # (the instruction set is asked only for a prompt: decode steps call this dozens of times)
    integer_prompt = (rows > _C.MAX_PACKED_ROWS and weight.int8_activations and isa != "scalar"
                      and _C.best_isa() >= ISAS["avx2"])
    if not (0 < rows <= _C.MAX_PACKED_ROWS or integer_prompt):
        if weight.int8_activations:  # the same meaning without the integer kernels
            x = quantize_rows(x).to(x.dtype)
        return unpacked_linear(x, weight, bias)
    n, k = weight.shape
    xf = _f32(x)
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    _C.quantized_linear(xf.data_ptr(), weight.data.data_ptr(), _opt(weight.scales),
                        _opt(None if bias is None else _f32(bias)), out.data_ptr(), rows, n, k,
                        FORMAT_CODES[weight.format], weight.int8_activations, ISAS[isa])
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _check_limits(head_dim: int, group: int, block_size: int = 0) -> None:
    check(head_dim <= _C.MAX_HEAD_DIM, f"the cpu back-end supports head_dim <= {_C.MAX_HEAD_DIM}, got {head_dim}")
    check(group <= _C.MAX_GROUP, f"the cpu back-end supports <= {_C.MAX_GROUP} query heads per KV head")
    check(block_size <= _C.MAX_BLOCK_SIZE, f"the cpu back-end supports block_size <= {_C.MAX_BLOCK_SIZE}")


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window=0,
                    max_query_len=0, max_seq_len=0):
    _check_limits(q.shape[2], q.shape[1] // k_cache.shape[1], k_cache.shape[2])
    qf = _f32(q)
    kc, vc = (k_cache, v_cache) if k_cache.dtype in CACHE_DTYPES else (_f32(k_cache), _f32(v_cache))
    bt, sl, qs = _i32(block_tables), _i32(seq_lens), _i32(query_start_loc)
    out = torch.empty_like(qf)
    _C.paged_attention(qf.data_ptr(), kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), sl.data_ptr(), qs.data_ptr(),
                       out.data_ptr(), sl.shape[0], q.shape[1], k_cache.shape[1], q.shape[2], k_cache.shape[2],
                       bt.shape[1], float(scale), int(sliding_window), kc.dtype == torch.bfloat16)
    return out.to(q.dtype)


def _strided_f32(t: torch.Tensor) -> torch.Tensor:
    """t as fp32 with a unit stride along the last dimension; other strides are kept (no copy of
    the transposed views attention layers pass)."""
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.to(torch.float32).contiguous()


def dense_attention(q, k, v, scale, causal=False):
    _check_limits(q.shape[3], q.shape[1] // k.shape[1])
    qf, kf, vf = _strided_f32(q), _strided_f32(k), _strided_f32(v)
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=torch.float32)
    _C.dense_attention(qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), out.data_ptr(), b, h, k.shape[1], lq, k.shape[2],
                       d, float(scale), bool(causal), qf.stride()[:3], kf.stride()[:3], vf.stride()[:3])
    return out.to(q.dtype)


def varlen_attention(q, k, v, cu_seqlens, scale, causal=False, max_seqlen=0):
    _check_limits(q.shape[2], q.shape[1] // k.shape[1])
    qf, kf, vf = (_f32(x).contiguous() for x in (q, k, v))
    cu = _i32(cu_seqlens)
    out = torch.empty(qf.shape, dtype=torch.float32)
    _C.varlen_attention(qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), out.data_ptr(), cu.data_ptr(), cu.numel() - 1,
                        q.shape[1], k.shape[1], q.shape[2], float(scale), bool(causal))
    return out.to(q.dtype)


def _logit_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the C++ samplers read them: fp32 rows with unit stride, rows any stride apart."""
    return logits if logits.dtype == torch.float32 and logits.stride(-1) == 1 else _f32(logits)


def sample(logits: torch.Tensor, p: SamplingTensors, num_logprobs: int = 0) -> SampleResult:
    x = _logit_rows(logits)
    batch, vocab = x.shape
    f = {name: _f32(getattr(p, name)) for name in
         ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "bias_values")}
    i = {name: _i32(getattr(p, name)) for name in
         ("top_k", "prompt_tokens", "prompt_offsets", "output_tokens", "output_offsets", "bias_tokens",
          "bias_offsets")}
    seed, step = _i64(p.seed), _i64(p.step)
    allowed_bits = None if p.allowed_bits is None else _i32(p.allowed_bits)  # kept alive through the call
    allowed_row = None if p.allowed_row is None else _i32(p.allowed_row)
    tokens = torch.empty(batch, dtype=torch.int64)
    logprobs = torch.empty(batch, dtype=torch.float32)
    top_tokens = torch.empty(batch, num_logprobs, dtype=torch.int64)
    top_logprobs = torch.empty(batch, num_logprobs, dtype=torch.float32)
    why = _C.sample(x.data_ptr(), batch, vocab, x.stride(0), f["temperature"].data_ptr(), f["top_p"].data_ptr(),
                    f["min_p"].data_ptr(), f["repetition_penalty"].data_ptr(), f["presence_penalty"].data_ptr(),
                    f["frequency_penalty"].data_ptr(), i["top_k"].data_ptr(), seed.data_ptr(), step.data_ptr(),
                    i["prompt_tokens"].data_ptr(), i["prompt_offsets"].data_ptr(), i["prompt_tokens"].numel(),
                    i["output_tokens"].data_ptr(), i["output_offsets"].data_ptr(), i["output_tokens"].numel(),
                    i["bias_tokens"].data_ptr(), i["bias_offsets"].data_ptr(), f["bias_values"].data_ptr(),
                    i["bias_tokens"].numel(), _opt(allowed_bits), _opt(allowed_row),
                    0 if allowed_bits is None else allowed_bits.shape[0], num_logprobs, tokens.data_ptr(),
                    logprobs.data_ptr(), top_tokens.data_ptr(), top_logprobs.data_ptr())
    check(not why, why)
    return SampleResult(tokens, logprobs, top_tokens, top_logprobs)


def greedy(logits):
    x = _logit_rows(logits)
    tokens = torch.empty(x.shape[0], dtype=torch.int64)
    _C.greedy(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), tokens.data_ptr())
    return tokens


def denoise_step(x, cond, uncond, prev_x0, coef, seed, step):
    batch = x.shape[0]
    xf, cf = _f32(x), _f32(cond)
    uf = None if uncond is None else _f32(uncond)
    pf = None if prev_x0 is None else _f32(prev_x0)
    coef, seed, step = _f32(coef), _i64(seed), _i64(step)
    x_next, x0 = torch.empty_like(xf), torch.empty_like(xf)
    _C.denoise_step(xf.data_ptr(), cf.data_ptr(), _opt(uf), _opt(pf), coef.data_ptr(), seed.data_ptr(),
                    step.data_ptr(), x_next.data_ptr(), x0.data_ptr(), batch, xf.numel() // batch if batch else 0)
    if x.dtype != torch.float32:
        return x_next.to(x.dtype), x0.to(x.dtype)
    return x_next, x0
