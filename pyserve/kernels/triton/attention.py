"""Triton attention: paged (mixed prefill/decode, split-KV for long contexts), KV writes, dense.

GPU constraints shape the launches: fp32 products run in IEEE precision (NVIDIA's default for
fp32 `tl.dot` is TF32, ~1e-3 off); `tl.dot` needs tiles of at least 16, so KV blocks must hold a
power of two >= 16 tokens; head dims that are not powers of two are padded to the next one and
masked; grid axes 1 and 2 stay under 65,536 (the long axis is axis 0).
"""

import torch
import triton
import triton.language as tl

from ..checks import MAX_GRID_YZ, check

_SPLIT_KEYS = 512  # keys per split when a long context is divided among programs


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _check_block_size(block_size: int) -> None:
    check(block_size >= 16 and block_size & (block_size - 1) == 0,
          f"the triton back-end needs a KV block size that is a power of two >= 16, got {block_size}")


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     D: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < HKV * D) & (slot >= 0)
    src = i.to(tl.int64) * HKV * D + offs
    dst = (((slot // BLOCK_SIZE) * HKV + offs // D) * BLOCK_SIZE + slot % BLOCK_SIZE) * D + offs % D
    tl.store(kc_ptr + dst, tl.load(k_ptr + src, mask=mask).to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, tl.load(v_ptr + src, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    if k.shape[0]:
        _write_kv_kernel[(k.shape[0],)](k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping.contiguous(),
                                        HKV=k.shape[1], BLOCK_SIZE=k_cache.shape[2], D=k.shape[2],
                                        BLOCK=triton.next_power_of_2(k.shape[1] * k.shape[2]))


@triton.jit
def _softmax_step(s, ok, v, m, l, acc, PRECISION: tl.constexpr):
    """One key tile of the online softmax: scores s where ok, values v; returns the new (m, l, acc)."""
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l, acc


@triton.jit
def _paged_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, m_ptr, l_ptr,
                  scale, window, max_blocks, num_tokens, num_tiles,
                  H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_BLOCKS: tl.constexpr,
                  PARTIAL: tl.constexpr, PRECISION: tl.constexpr):
    # Axis 0 is (split, query tile): it may be long; sequences and heads stay on the short axes.
    tile, split = tl.program_id(0) % num_tiles, tl.program_id(0) // num_tiles
    seq, head = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    if tile * BLOCK_M < q_len:
        kv_head = head // (H // HKV)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        pos = ctx - q_len + rows
        dims = tl.arange(0, D_PAD)
        dim_ok = dims < D
        tok = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + (tok[:, None] * H + head) * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)

        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        max_pos = ctx - q_len + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1
        first_blk = tl.where(window > 0, tl.maximum(ctx - q_len + tile * BLOCK_M - window + 1, 0) // BLOCK_SIZE, 0)
        end_blk = max_pos // BLOCK_SIZE + 1
        if PARTIAL:
            first_blk = tl.maximum(first_blk, split * SPLIT_BLOCKS)
            end_blk = tl.minimum(end_blk, split * SPLIT_BLOCKS + SPLIT_BLOCKS)
        keys = tl.arange(0, BLOCK_SIZE)
        for blk in range(first_blk, end_blk):
            phys = tl.load(bt_ptr + seq * max_blocks + blk).to(tl.int64)
            key_pos = blk * BLOCK_SIZE + keys
            kv_off = ((phys * HKV + kv_head) * BLOCK_SIZE + keys[:, None]) * D + dims[None, :]
            # Slots past the context may hold anything (a reused block's stale Inf/NaN): 0 x NaN
            # would poison the sum, so they are never read.
            kv_ok = (key_pos < ctx)[:, None] & dim_ok[None, :]
            k = tl.load(kc_ptr + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(vc_ptr + kv_off, mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            dist = pos[:, None] - key_pos[None, :]
            ok = (dist >= 0) & (key_pos[None, :] < ctx) & row_ok[:, None]
            if window > 0:
                ok = ok & (dist < window)
            m, l, acc = _softmax_step(s, ok, v, m, l, acc, PRECISION)
        out_ok = row_ok[:, None] & dim_ok[None, :]
        if PARTIAL:
            part = (split * num_tokens + tok) * H + head
            tl.store(out_ptr + part[:, None] * D + dims[None, :], acc, mask=out_ok)
            tl.store(m_ptr + part, m, mask=row_ok)
            tl.store(l_ptr + part, l, mask=row_ok)
        else:
            out = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptr + (tok[:, None] * H + head) * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=out_ok)


@triton.jit
def _merge_kernel(part_ptr, m_ptr, l_ptr, out_ptr, num_tokens, num_splits, H: tl.constexpr, D: tl.constexpr,
                  D_PAD: tl.constexpr):
    tok, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    m_all = tl.full((), float("-inf"), tl.float32)
    for sp in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (sp * num_tokens + tok) * H + head))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((D_PAD,), tl.float32)
    for sp in range(0, num_splits):
        idx = (sp * num_tokens + tok) * H + head
        f = tl.exp(tl.load(m_ptr + idx) - m_safe)
        total += tl.load(l_ptr + idx) * f
        acc += tl.load(part_ptr + idx * D + dims, mask=dim_ok, other=0.0) * f
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (tok * H + head) * D + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window=0,
                    max_query_len=0, max_seq_len=0):
    t, h, d = q.shape
    num_seqs = seq_lens.shape[0]
    q = q.contiguous()  # before the output is shaped after it: a permuted q must not permute out
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if t == 0 or num_seqs == 0:
        return out
    block_size = k_cache.shape[2]
    _check_block_size(block_size)
    check(num_seqs <= MAX_GRID_YZ and h <= MAX_GRID_YZ,
          f"the triton back-end takes at most {MAX_GRID_YZ} sequences and heads per call, got {num_seqs} and {h}")
    d_pad = triton.next_power_of_2(d)
    # Query tiles of up to 64 rows, 32 when a row is wide, so tiles stay in registers.
    block_m = max(16, min(64 if d_pad * q.element_size() <= 256 else 32, triton.next_power_of_2(max_query_len)))
    split_blocks = max(1, _SPLIT_KEYS // block_size)
    # Split the keys among programs only for decode-only batches with long contexts.
    num_splits = triton.cdiv(max_seq_len, split_blocks * block_size) if max_query_len == 1 else 1
    num_tiles = triton.cdiv(max_query_len, block_m)
    args = (q, k_cache, v_cache, block_tables.to(torch.int32).contiguous(),
            seq_lens.to(torch.int32).contiguous(), query_start_loc.to(torch.int32).contiguous())
    grid = (num_tiles * num_splits, num_seqs, h)
    meta = dict(H=h, HKV=k_cache.shape[1], D=d, D_PAD=d_pad, BLOCK_SIZE=block_size,
                BLOCK_M=block_m, SPLIT_BLOCKS=split_blocks, PRECISION=_precision(q.dtype))
    if num_splits == 1:
        _paged_kernel[grid](*args, out, out, out, scale, sliding_window, block_tables.shape[1], t, num_tiles,
                            PARTIAL=False, **meta)
        return out
    parts = torch.zeros(num_splits, t, h, d, dtype=torch.float32, device=q.device)
    m = torch.full((num_splits, t, h), float("-inf"), dtype=torch.float32, device=q.device)
    l = torch.zeros((num_splits, t, h), dtype=torch.float32, device=q.device)
    _paged_kernel[grid](*args, parts, m, l, scale, sliding_window, block_tables.shape[1], t, num_tiles, PARTIAL=True,
                        **meta)
    _merge_kernel[(t, h)](parts, m, l, out, t, num_splits, H=h, D=d, D_PAD=meta["D_PAD"])
    return out


@triton.jit
def _dense_kernel(q_ptr, k_ptr, v_ptr, out_ptr, scale, q_len, kv_len, num_tiles,
                  H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # One axis for (batch x head, query tile), so no grid dimension limit is reached.
    tile, bh = tl.program_id(0) % num_tiles, tl.program_id(0) // num_tiles
    b, head = bh // H, bh % H
    kv = (b * HKV + head // (H // HKV)).to(tl.int64) * kv_len * D
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    q_base = bh.to(tl.int64) * q_len * D
    q = tl.load(q_ptr + q_base + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    offset = kv_len - q_len
    end = kv_len
    if CAUSAL:
        end = tl.minimum(kv_len, offset + tile * BLOCK_M + BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_len
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv + cols[:, None] * D + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + kv + cols[:, None] * D + dims[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + offset)
        m, l, acc = _softmax_step(s, ok, v, m, l, acc, PRECISION)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_base + rows[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _dense_tiles(lq: int, d_pad: int, dtype: torch.dtype) -> tuple[int, int]:
    """Query and key tile sizes whose q, k, v and accumulator tiles fit in registers and shared
    memory: 64 x 64 up to 64 fp32 / 128 16-bit dims, smaller tiles beyond."""
    budget = 64 * 64 * (64 if dtype == torch.float32 else 128)  # tile rows x tile rows x dims
    block_m = 64 if lq > 32 else 16
    block_n = 64
    while block_m * block_n * d_pad > budget and max(block_m, block_n) > 16:
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2
    return block_m, block_n


def dense_attention(q, k, v, scale, causal=False):
    b, h, lq, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d_pad = triton.next_power_of_2(d)
    block_m, block_n = _dense_tiles(lq, d_pad, q.dtype)
    num_tiles = triton.cdiv(lq, block_m)
    _dense_kernel[(num_tiles * b * h,)](q, k, v, out, scale, lq, k.shape[2], num_tiles, H=h, HKV=k.shape[1], D=d,
                                        D_PAD=d_pad, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
                                        PRECISION=_precision(q.dtype))
    return out


@triton.jit
def _varlen_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, scale,
                   H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # Grid: (query tile, sequence, head); a tile past its sequence's end has nothing to do.
    tile, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - start
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    q_at = (start + rows).to(tl.int64)[:, None] * (H * D) + head * D + dims[None, :]
    q = tl.load(q_ptr + q_at, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    kv_head = head // (H // HKV)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    end = length
    if CAUSAL:
        end = tl.minimum(length, tile * BLOCK_M + BLOCK_M)
    for key0 in range(0, end, BLOCK_N):
        cols = key0 + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        kv_at = (start + cols).to(tl.int64)[:, None] * (HKV * D) + kv_head * D + dims[None, :]
        k = tl.load(k_ptr + kv_at, mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + kv_at, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        m, l, acc = _softmax_step(s, ok, v, m, l, acc, PRECISION)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_at, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def varlen_attention(q, k, v, cu_seqlens, scale, causal=False, max_seqlen=0):
    t, h, d = q.shape
    num_seqs = cu_seqlens.shape[0] - 1
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if t == 0 or num_seqs == 0 or max_seqlen == 0:
        return out
    check(num_seqs <= MAX_GRID_YZ and h <= MAX_GRID_YZ,
          f"the triton back-end takes at most {MAX_GRID_YZ} sequences and heads per call, got {num_seqs} and {h}")
    d_pad = triton.next_power_of_2(d)
    block_m, block_n = _dense_tiles(max_seqlen, d_pad, q.dtype)
    grid = (triton.cdiv(max_seqlen, block_m), num_seqs, h)
    _varlen_kernel[grid](q, k, v, out, cu_seqlens.to(torch.int32).contiguous(), scale, H=h, HKV=k.shape[1], D=d,
                         D_PAD=d_pad, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype))
    return out
