"""Every attention back-end against the pure-torch reference."""

import math

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import reference

from conftest import backend_params

BACKENDS = backend_params()


def paged_case(specs, heads, kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """Random q and a cache with shuffled blocks; specs = [(context_len, query_len), ...]."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in specs]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = order[used:used + n]
        used += n
    t = sum(qlen for _, qlen in specs)
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor([ctx for ctx, _ in specs], dtype=torch.int32)
    qsl = torch.tensor([0] + [qlen for _, qlen in specs], dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, tables, seq_lens, qsl


def tolerance(dtype):
    return {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {"atol": 2e-4, "rtol": 2e-4}


# Mixed batches: prefill from scratch, prefill after a cached prefix ending mid-block, decode steps,
# a long decode that takes the split-KV path, and single-token contexts.
MIXED = [(37, 37), (70, 5), (1, 1), (300, 1), (1500, 1), (129, 64)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_matches_reference(backend, device, block_size, heads, kv_heads, head_dim):
    case = paged_case(MIXED, heads, kv_heads, head_dim, block_size, seed=head_dim + heads)
    expected = reference.paged_attention(*case, scale=head_dim**-0.5)
    got = kernels.paged_attention(*(t.to(device) for t in case), backend=backend)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("heads,kv_heads", [(12, 4), (6, 3), (7, 1)])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_cpu_paged_attention_with_groups_not_a_multiple_of_four(heads, kv_heads, head_dim):
    """The C++ kernel takes query rows four at a time and the rest (3, 2, or 4 + 3 a decode step
    here) by their own blocking; the Triton interpreter is too slow for these in CI."""
    case = paged_case(MIXED, heads, kv_heads, head_dim, 16, seed=heads + head_dim)
    expected = reference.paged_attention(*case, scale=head_dim**-0.5)
    got = kernels.paged_attention(*case, backend="cpu")
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window", [0, 100])
def test_long_decode_only_batch_splits_keys(backend, device, window):
    case = paged_case([(2100, 1), (600, 1), (3, 1), (1030, 1)], 8, 2, 64, 16, seed=5)
    expected = reference.paged_attention(*case, scale=0.125, sliding_window=window)
    got = kernels.paged_attention(*(t.to(device) for t in case), scale=0.125, sliding_window=window, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window", [1, 7, 40])
def test_paged_attention_sliding_window(backend, device, window):
    case = paged_case([(90, 30), (200, 1), (33, 33)], 8, 2, 64, 16, seed=window)
    expected = reference.paged_attention(*case, scale=0.1, sliding_window=window)
    got = kernels.paged_attention(*(t.to(device) for t in case), scale=0.1, sliding_window=window, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_half_precision(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16")
    case = paged_case([(50, 10), (80, 1)], 4, 2, 64, 16, dtype=dtype, seed=3)
    expected = reference.paged_attention(*case, scale=0.125)
    got = kernels.paged_attention(*(t.to(device) for t in case), scale=0.125, backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), expected.float(), **tolerance(dtype))


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("window", [0, 40])
def test_cpu_paged_attention_reads_a_bf16_cache_under_fp32_queries(head_dim, window):
    """`kv_cache_dtype="bfloat16"` on a CPU: the keys and values are bf16, the arithmetic fp32, so
    the output is the reference's on the same (widened) values to fp32 precision."""
    q, k_cache, v_cache, *rest = paged_case(MIXED, 8, 2, head_dim, 16, seed=head_dim + window)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    expected = reference.paged_attention(q, k_cache, v_cache, *rest, scale=0.125, sliding_window=window)
    got = kernels.paged_attention(q, k_cache, v_cache, *rest, scale=0.125, sliding_window=window, backend="cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))


def test_cpu_write_kv_rounds_into_a_bf16_cache_as_torch_does():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(9, 2, 64, generator=g), torch.randn(9, 2, 64, generator=g)
    # halfway between two bf16 values: ties go to the even one, either way
    k[0, 0, :4] = torch.tensor([0x3F808000, 0x3F818000, -0x40800000 + 0x8000, 0x00008000],
                               dtype=torch.int32).view(torch.float32)
    slots = torch.tensor([0, 5, 17, 31, -1, 40, 41, 63, 2])
    want_k, want_v = torch.zeros(4, 2, 16, 64, dtype=torch.bfloat16), torch.zeros(4, 2, 16, 64, dtype=torch.bfloat16)
    reference.write_kv(k, v, want_k, want_v, slots)
    got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
    kernels.write_kv(k, v, got_k, got_v, slots, backend="cpu")
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert want_k[0, 0, 0, :2].view(torch.int16).tolist() == [0x3F80, 0x3F82]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_write_kv_matches_reference(backend, device):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(9, 2, 64, generator=g)
    v = torch.randn(9, 2, 64, generator=g)
    slots = torch.tensor([0, 5, 17, 31, -1, 40, 41, 63, 2])
    want_k, want_v = torch.zeros(4, 2, 16, 64), torch.zeros(4, 2, 16, 64)
    reference.write_kv(k, v, want_k, want_v, slots)
    got_k, got_v = want_k.new_zeros(want_k.shape).to(device), want_v.new_zeros(want_v.shape).to(device)
    kernels.write_kv(k.to(device), v.to(device), got_k, got_v, slots.to(device), backend=backend)
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
    # Slot 17 is block 1, offset 1; slot 62 (block 3, offset 14) was never written.
    assert torch.equal(want_k[1, :, 1], k[2]) and torch.equal(want_v[1, :, 1], v[2])
    assert torch.count_nonzero(want_k[3, :, 14]) == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 4, 77, 77, 64), (1, 8, 2, 33, 130, 128), (3, 2, 1, 1, 9, 64)])
def test_dense_attention_matches_reference(backend, device, causal, shape):
    b, h, hkv, lq, lk, d = shape
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    expected = reference.dense_attention(q, k, v, d**-0.5, causal)
    got = kernels.dense_attention(q.to(device), k.to(device), v.to(device), causal=causal, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


def varlen_case(lengths, h, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, n, d, generator=g).to(dtype) for n in (h, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def sdpa_per_sequence(q, k, v, cu, causal):
    """The independent reference: torch's SDPA on each sequence alone (KV heads repeated for GQA)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            qs, ks, vs = (x[start:end].float().transpose(0, 1) for x in (q, k, v))
            ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths, h, hkv, d", [([7, 1, 40, 0, 129], 4, 4, 64), ([3, 77], 8, 2, 128),
                                                  ([1], 2, 1, 32), ([300, 5, 64], 12, 12, 64)])
def test_varlen_attention_matches_sdpa_on_each_sequence(backend, device, causal, lengths, h, hkv, d):
    q, k, v, cu = varlen_case(lengths, h, hkv, d, seed=sum(lengths))
    want = sdpa_per_sequence(q, k, v, cu, causal)
    got = kernels.varlen_attention(q.to(device), k.to(device), v.to(device), cu.to(device), causal=causal,
                                   backend=backend)
    torch.testing.assert_close(got.cpu(), want, **tolerance(torch.float32))
    torch.testing.assert_close(reference.varlen_attention(q, k, v, cu, d**-0.5, causal), want, atol=1e-5, rtol=1e-5)


def test_varlen_attention_equals_one_sequence_alone_in_any_pack():
    """A sequence's output does not depend on what it is packed with (CPU kernel, bit for bit)."""
    q, k, v, cu = varlen_case([33, 50, 17], 4, 2, 64, seed=9)
    packed = kernels.varlen_attention(q, k, v, cu, backend="cpu")
    alone = kernels.varlen_attention(q[33:83], k[33:83], v[33:83], torch.tensor([0, 50], dtype=torch.int32),
                                     backend="cpu")
    assert torch.equal(packed[33:83], alone)


def test_varlen_attention_rejects_bad_arguments():
    q, k, v, cu = varlen_case([4, 4], 4, 2, 64)
    with pytest.raises(kernels.KernelInputError, match="q has 3 heads"):
        kernels.varlen_attention(q[:, :3], k, v, cu)
    with pytest.raises(kernels.KernelInputError, match="cu_seqlens"):
        kernels.varlen_attention(q, k, v, cu.float())
    with pytest.raises(kernels.KernelInputError, match="k"):
        kernels.varlen_attention(q, k[:5], v[:5], cu)


def test_dense_reference_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 4, 50, 64) for _ in range(3))
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(reference.dense_attention(q, k, v, 64**-0.5, causal), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_rejects_bad_arguments():
    q, kc, vc, bt, sl, qsl = paged_case([(20, 4)], 4, 2, 64, 16)
    with pytest.raises(kernels.KernelInputError, match="q has 3 heads"):
        kernels.paged_attention(q[:, :3], kc, vc, bt, sl, qsl)
    with pytest.raises(kernels.KernelInputError, match="block_tables"):
        kernels.paged_attention(q, kc, vc, bt.float(), sl, qsl)
    with pytest.raises(kernels.KernelInputError, match="query_start_loc"):
        kernels.paged_attention(q, kc, vc, bt, sl, qsl[:1])
    with pytest.raises(kernels.KernelInputError, match="seq_len"):
        kernels.paged_attention(q, kc, vc, bt, sl * 100, qsl)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.paged_attention(q, kc, vc, bt, sl, qsl, backend="nope")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32])  # 13 and 32: passes of eight rows over cached weights
@pytest.mark.parametrize("n,k", [(1, 1), (37, 19), (256, 768), (70, 1536)])
def test_linear_matches_torch(backend, device, rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        want = torch.nn.functional.linear(x, w, bias)
        got = kernels.linear(x.to(device), w.to(device), None if bias is None else bias.to(device), backend=backend)
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    # Leading dimensions are kept, as in torch.nn.functional.linear.
    assert kernels.linear(x.view(rows, 1, k).to(device), w.to(device), backend=backend).shape == (rows, 1, n)


# -- what a GPU run would break (issue 16): stale slots, views, odd shapes, host-side sizes ----------

def poison_unused_slots(case, value=float("nan")):
    """Fill every cache slot that no sequence's context reaches (whole unused blocks and the tails
    of partly used ones) with `value`, as a reused block would hold stale data."""
    q, k_cache, v_cache, tables, seq_lens, _ = case
    used = torch.zeros(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool)
    bs = k_cache.shape[2]
    for s, ctx in enumerate(seq_lens.tolist()):
        for pos in range(ctx):
            used[tables[s, pos // bs], pos % bs] = True
    for cache in (k_cache, v_cache):
        cache.masked_fill_(~used[:, None, :, None], value)
    return case


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stale_nan_or_inf_in_unused_slots_never_reaches_the_output(backend, device, value):
    case = poison_unused_slots(paged_case(MIXED, 8, 2, 64, 16, seed=11), value)
    clean = [t.nan_to_num(0.0, 0.0, 0.0) if i in (1, 2) else t for i, t in enumerate(case)]
    expected = reference.paged_attention(*clean, scale=0.125)
    got = kernels.paged_attention(*(t.to(device) for t in case), scale=0.125, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_views_of_q_give_the_same_output(backend, device):
    q, *rest = paged_case([(40, 8), (70, 1)], 8, 2, 64, 16, seed=2)
    expected = reference.paged_attention(q, *rest, scale=0.125)
    rest = [t.to(device) for t in rest]
    transposed = q.transpose(0, 1).contiguous().transpose(0, 1)  # dense but permuted strides
    qkv = torch.cat([q.reshape(q.shape[0], -1), torch.randn(q.shape[0], 2 * 2 * 64)], dim=1)
    from_fused = qkv[:, :8 * 64].view(q.shape)  # rows strided by the fused width
    for view in (transposed, from_fused):
        assert not view.is_contiguous()
        got = kernels.paged_attention(view.to(device), *rest, scale=0.125, backend=backend)
        torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))
    b, h, lq, d = 2, 4, 33, 64
    qd, kd, vd = (torch.randn(b, lq, h, d).transpose(1, 2) for _ in range(3))  # [B, H, L, D] views
    want = reference.dense_attention(qd.contiguous(), kd.contiguous(), vd.contiguous(), d**-0.5, True)
    got = kernels.dense_attention(qd.to(device), kd.to(device), vd.to(device), causal=True, backend=backend)
    torch.testing.assert_close(got.cpu(), want, **tolerance(torch.float32))


# The shapes a back-end refuses, and the word its error names; every other shape must be right.
REFUSED = {("cuda", 16, 80): "head_dim", ("cpu", 128, 32): "block_size"}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("block_size,head_dim", [(64, 64), (128, 32), (16, 80), (16, 96), (16, 256)])
def test_block_sizes_and_head_dims_are_right_or_refused_clearly(backend, device, block_size, head_dim):
    case = paged_case([(150, 20), (300, 1), (5, 5)], 4, 2, head_dim, block_size, seed=block_size + head_dim)
    refused = REFUSED.get((backend, block_size, head_dim))
    if refused:
        with pytest.raises(kernels.KernelInputError, match=refused):
            kernels.paged_attention(*(t.to(device) for t in case), backend=backend)
        return
    expected = reference.paged_attention(*case, scale=head_dim**-0.5)
    got = kernels.paged_attention(*(t.to(device) for t in case), backend=backend)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


def test_triton_refuses_blocks_too_small_for_its_tiles():
    case = paged_case([(20, 4)], 4, 2, 64, 8)
    from pyserve.kernels.triton import attention
    with pytest.raises(kernels.KernelInputError, match="power of two >= 16"):
        attention.paged_attention(*case, 0.125)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_host_side_lengths_give_the_same_output(backend, device):
    case = paged_case(MIXED, 8, 2, 64, 16, seed=9)
    expected = reference.paged_attention(*case, scale=0.125)
    q_lens = [q for _, q in MIXED]
    got = kernels.paged_attention(*(t.to(device) for t in case), scale=0.125, backend=backend,
                                  max_query_len=max(q_lens), max_seq_len=max(c for c, _ in MIXED))
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


def test_caches_must_be_contiguous():
    q, kc, vc, bt, sl, qsl = paged_case([(20, 4)], 4, 2, 64, 16)
    strided = kc.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(kernels.KernelInputError, match="k_cache must be contiguous"):
        kernels.paged_attention(q, strided, vc, bt, sl, qsl)
    with pytest.raises(kernels.KernelInputError, match="v_cache must be contiguous"):
        kernels.write_kv(q[:, :2], q[:, :2], kc, vc.transpose(0, 1).contiguous().transpose(0, 1),
                         torch.arange(q.shape[0]))


def test_fp32_triton_products_ask_for_ieee_precision():
    from pyserve.kernels.triton.attention import _precision
    # The interpreter multiplies exactly either way; on NVIDIA GPUs "tf32" would cost ~1e-3.
    assert _precision(torch.float32) == "ieee"
