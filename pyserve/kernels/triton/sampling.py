"""Triton fused sampler (see pyserve.kernels.sample for the contract).

One program per row. Top-k and top-p thresholds are found by bisection over the order-preserving
integer keys of the float logits, so the vocabulary is never sorted and ties stay in, as in the
reference. Penalties and logit bias are scattered into per-row buffers by a first kernel.
"""

import torch
import triton
import triton.language as tl

from ..types import SampleResult, SamplingTensors
from .rng import uniform

_SAMPLE_STREAM = 0


@triton.jit
def _scatter_kernel(tok_ptr, off_ptr, val_ptr, dst_ptr, vocab, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0: dst[row, tok] = 1 (seen); 1: dst[row, tok] += 1 (count); 2: dst[row, tok] += val (bias)."""
    row = tl.program_id(0)
    start, end = tl.load(off_ptr + row), tl.load(off_ptr + row + 1)
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        ok = idx < end
        dst = dst_ptr + row.to(tl.int64) * vocab + tl.load(tok_ptr + idx, mask=ok, other=0)
        if MODE == 0:
            tl.store(dst, tl.full((BLOCK,), 1.0, tl.float32), mask=ok)
        elif MODE == 1:
            tl.atomic_add(dst, tl.full((BLOCK,), 1.0, tl.float32), mask=ok)
        else:
            tl.atomic_add(dst, tl.load(val_ptr + idx, mask=ok, other=0.0), mask=ok)


@triton.jit
def _order_key(x):
    """A signed integer that orders like the float x."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _sample_kernel(logits_ptr, x_ptr, seen_ptr, count_ptr, bias_ptr, bits_ptr, mask_row_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   rep_ptr, pres_ptr, freq_ptr, seed_ptr, step_ptr, tokens_ptr, logprob_ptr, top_tok_ptr, top_lp_ptr,
                   vocab, row_stride, NUM_LOGPROBS: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    src = logits_ptr + row.to(tl.int64) * row_stride
    base = row.to(tl.int64) * vocab
    rep, pres, freq = tl.load(rep_ptr + row), tl.load(pres_ptr + row), tl.load(freq_ptr + row)
    lanes = tl.arange(0, BLOCK)
    mask_row = tl.load(mask_row_ptr + row) if MASKED else -1
    words = (vocab + 31) // 32

    # Pass 1: processed logits into x; raw and processed maxima.
    raw_max = tl.full((), float("-inf"), tl.float32)
    x_max = tl.full((), float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + lanes
        ok = idx < vocab
        raw = tl.load(src + idx, mask=ok, other=float("-inf")).to(tl.float32)
        seen = tl.load(seen_ptr + base + idx, mask=ok, other=0.0)
        count = tl.load(count_ptr + base + idx, mask=ok, other=0.0)
        x = tl.where(seen > 0, tl.where(raw > 0, raw / rep, raw * rep), raw)
        x = x - freq * count - pres * (count > 0).to(tl.float32) + tl.load(bias_ptr + base + idx, mask=ok, other=0.0)
        if MASKED:
            word = tl.load(bits_ptr + mask_row.to(tl.int64) * words + idx // 32, mask=ok & (mask_row >= 0), other=-1)
            x = tl.where(((word >> (idx % 32)) & 1) != 0, x, float("-inf"))
        x = tl.where(ok & (x == x), x, float("-inf"))  # NaN is never chosen
        tl.store(x_ptr + base + idx, x, mask=ok)
        raw_max = tl.maximum(raw_max, tl.max(raw, 0))
        x_max = tl.maximum(x_max, tl.max(x, 0))
    raw_sum = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + lanes
        raw = tl.load(src + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        raw_sum += tl.sum(tl.exp(raw - raw_max), 0)
    raw_lse = raw_max + tl.log(raw_sum)

    temp = tl.load(temp_ptr + row)
    token = tl.zeros((), tl.int32)
    if temp <= 0.0:
        best = tl.full((), vocab, tl.int32)
        for start in range(0, vocab, BLOCK):
            idx = start + lanes
            x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
            best = tl.minimum(best, tl.min(tl.where(x == x_max, idx, vocab), 0))
        token = best
    else:
        inv_t = 1.0 / temp
        thr = tl.full((), -(2**31), tl.int64)  # keep keys >= thr
        k = tl.load(top_k_ptr + row)
        if (k > 0) & (k < vocab):
            # Largest key K with count(x >= K) >= k: the k-th largest value.
            lo = _order_key(tl.full((), -3.4e38, tl.float32))
            hi = _order_key(x_max) + 1
            for _ in range(33):
                mid = lo + (hi - lo) // 2
                cnt = tl.zeros((), tl.int32)
                for start in range(0, vocab, BLOCK):
                    idx = start + lanes
                    x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
                    cnt += tl.sum((_order_key(x) >= mid).to(tl.int32), 0)
                lo = tl.where(cnt >= k, mid, lo)
                hi = tl.where(cnt >= k, hi, mid)
            thr = lo
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            total = tl.zeros((), tl.float32)
            for start in range(0, vocab, BLOCK):
                idx = start + lanes
                x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
                w = tl.where(_order_key(x) >= thr, tl.exp((x - x_max) * inv_t), 0.0)
                total += tl.sum(w, 0)
            # Smallest key K with mass(x > K) < top_p * total; keys >= K form the nucleus.
            lo = tl.maximum(thr - 1, _order_key(tl.full((), -3.4e38, tl.float32)) - 1)
            hi = _order_key(x_max)
            for _ in range(33):
                mid = lo + (hi - lo) // 2
                mass = tl.zeros((), tl.float32)
                for start in range(0, vocab, BLOCK):
                    idx = start + lanes
                    x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
                    key = _order_key(x)
                    w = tl.where((key > mid) & (key >= thr), tl.exp((x - x_max) * inv_t), 0.0)
                    mass += tl.sum(w, 0)
                below = mass < top_p * total
                hi = tl.where(below, mid, hi)
                lo = tl.where(below, lo, mid)
            thr = tl.maximum(thr, hi)
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0.0:
            thr = tl.maximum(thr, _order_key(x_max + tl.log(min_p) / inv_t))
        total = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK):
            idx = start + lanes
            x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
            total += tl.sum(tl.where(_order_key(x) >= thr, tl.exp((x - x_max) * inv_t), 0.0), 0)
        target = uniform(tl.load(seed_ptr + row), tl.load(step_ptr + row), tl.zeros((), tl.int32),
                         _SAMPLE_STREAM) * total
        # Inverse CDF in token order: the first token whose running mass passes the target.
        cdf = tl.zeros((), tl.float32)
        found = tl.full((), vocab, tl.int32)
        last_kept = tl.zeros((), tl.int32)
        for start in range(0, vocab, BLOCK):
            idx = start + lanes
            x = tl.load(x_ptr + base + idx, mask=idx < vocab, other=float("-inf"))
            kept = (_order_key(x) >= thr) & (idx < vocab)
            w = tl.where(kept, tl.exp((x - x_max) * inv_t), 0.0)
            run = cdf + tl.cumsum(w, 0)
            hit = kept & (run > target)
            found = tl.minimum(found, tl.min(tl.where(hit, idx, vocab), 0))
            last_kept = tl.maximum(last_kept, tl.max(tl.where(kept, idx, 0), 0))
            cdf += tl.sum(w, 0)
        token = tl.where(found < vocab, found, last_kept)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, tl.load(src + token).to(tl.float32) - raw_lse)

    # Top-n raw logprobs: repeatedly the best entry ordered strictly after the previous one.
    prev_val = tl.full((), float("inf"), tl.float32)
    prev_idx = tl.full((), -1, tl.int32)
    for n in range(NUM_LOGPROBS):
        best_val = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), vocab, tl.int32)
        for start in range(0, vocab, BLOCK):
            idx = start + lanes
            raw = tl.load(src + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            after = ((raw < prev_val) | ((raw == prev_val) & (idx > prev_idx))) & (idx < vocab)
            raw = tl.where(after, raw, float("-inf"))
            chunk_max = tl.max(raw, 0)
            chunk_idx = tl.min(tl.where(after & (raw == chunk_max), idx, vocab), 0)
            better = (chunk_max > best_val) | ((chunk_max == best_val) & (chunk_idx < best_idx))
            best_val = tl.where(better, chunk_max, best_val)
            best_idx = tl.where(better, chunk_idx, best_idx)
        tl.store(top_tok_ptr + row * NUM_LOGPROBS + n, best_idx.to(tl.int64))
        tl.store(top_lp_ptr + row * NUM_LOGPROBS + n, best_val - raw_lse)
        prev_val, prev_idx = best_val, best_idx


def sample(logits: torch.Tensor, p: SamplingTensors, num_logprobs: int = 0) -> SampleResult:
    batch, vocab = logits.shape
    dev = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    x = torch.empty(batch, vocab, dtype=torch.float32, device=dev)
    seen = torch.zeros(batch, vocab, dtype=torch.float32, device=dev)
    counts = torch.zeros_like(seen)
    bias = torch.zeros_like(seen)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    if batch:
        for toks, offs, dst, mode in ((p.prompt_tokens, p.prompt_offsets, seen, 0),
                                      (p.output_tokens, p.output_offsets, seen, 0),
                                      (p.output_tokens, p.output_offsets, counts, 1),
                                      (p.bias_tokens, p.bias_offsets, bias, 2)):
            if toks.numel():
                _scatter_kernel[(batch,)](i32(toks), i32(offs), p.bias_values.float().contiguous(), dst, vocab,
                                          MODE=mode, BLOCK=128)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.empty(batch, dtype=torch.float32, device=dev)
    top_tokens = torch.empty(batch, num_logprobs, dtype=torch.int64, device=dev)
    top_logprobs = torch.empty(batch, num_logprobs, dtype=torch.float32, device=dev)
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    masked = p.allowed_row is not None
    bits, mask_row = (i32(p.allowed_bits), i32(p.allowed_row)) if masked else (tokens, tokens)  # unread if unmasked
    if batch:
        _sample_kernel[(batch,)](
            logits, x, seen, counts, bias, bits, mask_row, f32(p.temperature), i32(p.top_k), f32(p.top_p), f32(p.min_p),
            f32(p.repetition_penalty), f32(p.presence_penalty), f32(p.frequency_penalty), p.seed.long().contiguous(),
            p.step.long().contiguous(), tokens, logprobs, top_tokens, top_logprobs, vocab, logits.stride(0),
            NUM_LOGPROBS=num_logprobs, MASKED=masked, BLOCK=min(1024, triton.next_power_of_2(vocab)))
    return SampleResult(tokens, logprobs, top_tokens, top_logprobs)
