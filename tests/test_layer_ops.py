"""The per-layer decoder steps (RMS norm with the residual add, rotary embedding, SiLU-gated
product) on each back-end against the reference, which the model tests check against
transformers end to end."""

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import reference

from conftest import backend_params

BACKENDS = backend_params()
ROWS = [1, 3, 700]  # decode sizes run on the calling thread, prefill sizes on the thread team


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(backend, device, rows, with_residual):
    dim = 173
    x, weight, residual = rand(rows, dim), rand(dim, seed=1), rand(rows, dim, seed=2) if with_residual else None
    want_y, want_h = reference.rms_norm(x, weight, 1e-5, residual)
    y, h = kernels.rms_norm(x.to(device), weight.to(device), 1e-5,
                            residual=None if residual is None else residual.to(device), backend=backend)
    torch.testing.assert_close(y.cpu(), want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.cpu(), want_h)
    ms = (want_h ** 2).mean(-1, keepdim=True)  # the definition, independently
    torch.testing.assert_close(want_y, want_h / torch.sqrt(ms + 1e-5) * weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
def test_rotary_rotates_the_leading_heads_in_place(backend, device, rows):
    heads, kv_heads, dim = 4, 2, 16
    qkv = rand(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    cos, sin = angles.cos(), angles.sin()
    want = qkv.clone()
    reference.rotary(want, cos, sin, heads + kv_heads)
    got = qkv.to(device)
    kernels.rotary(got, cos.to(device), sin.to(device), heads + kv_heads, backend=backend)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    rotated = (heads + kv_heads) * dim
    assert torch.equal(want[:, rotated:], qkv[:, rotated:])  # v untouched
    # A rotation keeps each pair's length, and position 0 is the identity.
    pairs = lambda t: t[:, :rotated].view(rows, -1, 2, dim // 2)  # noqa: E731
    torch.testing.assert_close(pairs(want).norm(dim=2), pairs(qkv).norm(dim=2), atol=1e-5, rtol=1e-5)
    assert torch.equal(want[0], qkv[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(backend, device, rows):
    x = rand(rows, 2 * 101) * 4
    x[0, :8] = torch.tensor([-1000.0, -100.0, -88.0, -50.0, 0.0, 50.0, 100.0, 1000.0])  # exp's range edges
    got = kernels.silu_mul(x.to(device), backend=backend).cpu()
    gate, up = x[:, :101], x[:, 101:]
    torch.testing.assert_close(got, gate * torch.sigmoid(gate) * up, atol=1e-5, rtol=1e-5)


def test_layer_ops_check_their_arguments():
    with pytest.raises(kernels.KernelInputError, match="residual"):
        kernels.rms_norm(rand(2, 8), rand(8), 1e-6, residual=rand(3, 8))
    with pytest.raises(kernels.KernelInputError, match="do not fit"):
        kernels.rotary(rand(2, 16), rand(2, 4), rand(2, 4), 3)
    with pytest.raises(kernels.KernelInputError, match="even"):
        kernels.silu_mul(rand(2, 7))


def random_stack(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, fmt=None, qkv_bias=True):
    gen = torch.Generator().manual_seed(5)

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def product(n, k):
        weight = w(n, k)
        return kernels.quantize(weight, fmt) if fmt else weight

    qkv_rows = (heads + 2 * kv_heads) * head_dim
    return kernels.DecoderStackWeights(
        [kernels.DecoderLayerWeights(1 + w(hidden), 1 + w(hidden), product(qkv_rows, hidden),
                                     product(hidden, heads * head_dim), product(2 * inter, hidden),
                                     product(hidden, inter), w(qkv_rows) if qkv_bias else None)
         for _ in range(layers)], 1 + w(hidden), heads, kv_heads, head_dim, 1e-5)


@pytest.mark.parametrize("fmt", [None, "int8", "int4", "bf16"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decoder_stack_matches_the_ops_in_order(fmt, window, cache_dtype):
    """The C++ stack against the reference composition: three sequences decoding at different
    context lengths (caches already holding their earlier keys), one with two new tokens."""
    stack = random_stack(fmt=fmt)
    block, blocks = 4, 16
    caches = [torch.randn(blocks, 2, block, 16, generator=torch.Generator().manual_seed(i)).to(cache_dtype)
              for i in range(4)]
    contexts, new = [9, 3, 14], [1, 2, 1]
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0], [6, 7, 8, 9]], dtype=torch.int32)
    positions = [p for c, n in zip(contexts, new) for p in range(c - n, c)]
    slots = torch.tensor([int(tables[s, p // block]) * block + p % block
                          for s, (c, n) in enumerate(zip(contexts, new)) for p in range(c - n, c)])
    starts = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
    x = rand(len(positions), 64, seed=9)
    args = (angles.cos(), angles.sin(), stack)
    meta = (slots, tables, torch.tensor(contexts, dtype=torch.int32), starts)
    mine = [c.clone() for c in caches]
    got = kernels.decoder_stack(x, *args, mine[:2], mine[2:], *meta, scale=0.25, sliding_window=window)
    theirs = [c.clone() for c in caches]
    want = reference.decoder_stack(x, *args, theirs[:2], theirs[2:], *meta, scale=0.25, sliding_window=window)
    assert got is not None  # the CPU back-end took the call
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(mine, theirs):  # a bf16 cache: new keys the same to within one rounding step
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5 if cache_dtype == torch.float32 else 2**-8)


def test_decoder_stack_declines_what_it_cannot_take():
    stack = random_stack()
    cache = torch.zeros(4, 2, 4, 16)
    big = rand(9, 64)  # more rows than a stack call takes: the model runs op by op
    cos = torch.ones(9, 8)
    assert kernels.decoder_stack(big, cos, cos, stack, [cache] * 2, [cache] * 2, torch.zeros(9, dtype=torch.int64),
                                 torch.zeros(1, 1, dtype=torch.int32), torch.tensor([9], dtype=torch.int32),
                                 torch.tensor([0, 9], dtype=torch.int32), scale=0.25) is None
    with pytest.raises(kernels.KernelInputError, match="layers need"):
        kernels.decoder_stack(big, cos, cos, stack, [cache], [cache], torch.zeros(9, dtype=torch.int64),
                              torch.zeros(1, 1, dtype=torch.int32), torch.tensor([9], dtype=torch.int32),
                              torch.tensor([0, 9], dtype=torch.int32), scale=0.25)


@pytest.mark.parametrize("fmt", [None, "w8a8", "int4"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decode_step_matches_the_ops_in_order(fmt, cache_dtype):
    """The C++ decode step (ids to logits from host lists) against the reference: three sequences
    one token each, ragged block tables, a window; the logits, greedy tokens and cache writes."""
    stack = random_stack(fmt=fmt)
    vocab, block = 45, 4
    embedding = rand(vocab, 64, seed=11)
    head = rand(vocab, 64, seed=12) * 0.2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    weights = kernels.DecoderModelWeights(stack, embedding, inv_freq, kernels.quantize(head, fmt) if fmt else head)
    caches = [torch.randn(16, 2, block, 16, generator=torch.Generator().manual_seed(i)).to(cache_dtype)
              for i in range(4)]
    tables = [[0, 1, 2], [4], [6, 7, 8, 9]]
    positions = [8, 2, 13]
    slots = [tables[s][p // block] * block + p % block for s, p in enumerate(positions)]
    ids = [5, vocab - 1, 0]
    mine, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    got = kernels.decode_step(ids, positions, slots, tables, weights, mine[:2], mine[2:], scale=0.25,
                              sliding_window=5)
    want = reference.decode_step(ids, positions, slots, tables, weights, theirs[:2], theirs[2:], 0.25, 5)
    assert got is not None  # the CPU back-end took the call
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    assert got.greedy == reference.greedy(got.logits).tolist()
    for a, b in zip(mine, theirs):  # a bf16 cache: new keys within one bf16 step (2^-7 at most)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5 if cache_dtype == torch.float32 else 2**-7)
    # the meaning spelled out once more: the embedding rows through decoder_stack and the head
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * inv_freq
    width = max(map(len, tables))
    hidden = reference.decoder_stack(
        embedding[ids], angles.cos(), angles.sin(), stack, [c.clone() for c in caches[:2]],
        [c.clone() for c in caches[2:]], torch.tensor(slots),
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor([p + 1 for p in positions], dtype=torch.int32), torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        0.25, 5)
    torch.testing.assert_close(want.logits, reference.linear(hidden, weights.head), atol=1e-5, rtol=1e-5)


def test_decode_step_checks_and_declines():
    weights = kernels.DecoderModelWeights(random_stack(), rand(45, 64), torch.ones(8), rand(45, 64))
    cache = torch.zeros(4, 2, 4, 16)
    with pytest.raises(kernels.KernelInputError, match="token ids"):
        kernels.decode_step([45], [0], [0], [[0]], weights, [cache] * 2, [cache] * 2, scale=0.25)
    with pytest.raises(kernels.KernelInputError, match="one entry a sequence"):
        kernels.decode_step([1, 2], [0], [0], [[0]], weights, [cache] * 2, [cache] * 2, scale=0.25)
    narrow = kernels.DecoderModelWeights(weights.stack, rand(45, 64), torch.ones(8), rand(45, 32))
    with pytest.raises(kernels.KernelInputError, match="head must be"):
        kernels.decode_step([1], [0], [0], [[0]], narrow, [cache] * 2, [cache] * 2, scale=0.25)
    # a head with more rows than the embedding (padded vocabularies): logits as wide as the head
    wide = kernels.DecoderModelWeights(weights.stack, rand(45, 64), torch.ones(8), rand(50, 64, seed=3))
    got = kernels.decode_step([44], [0], [0], [[0]], wide, [cache.clone()] * 2, [cache.clone()] * 2, scale=0.25)
    want = reference.decode_step([44], [0], [0], [[0]], wide, [cache.clone()] * 2, [cache.clone()] * 2, 0.25)
    assert got.logits.shape == (1, 50)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    many = list(range(9))  # more rows than a stack call takes
    assert kernels.decode_step(many, many, many, [[0, 1, 2]] * 9, weights, [cache] * 2, [cache] * 2,
                               scale=0.25) is None


def test_packed_models_decode_a_busy_batch_in_one_call():
    """With every product packed, a decode step of up to MAX_PACKED_STACK_ROWS sequences (a server
    under load) is one call, against the reference; an fp32 product anywhere, the head included,
    keeps the fp32 limit, and one row past the packed one declines."""
    from pyserve import _C

    rows, block = 40, 4
    stack = random_stack(fmt="w8a8")
    embedding, head = rand(45, 64, seed=11), rand(45, 64, seed=12) * 0.2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    weights = kernels.DecoderModelWeights(stack, embedding, inv_freq, kernels.quantize(head, "w8a8"))
    caches = [torch.randn(3 * rows, 2, block, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    tables = [[3 * s, 3 * s + 1, 3 * s + 2][:1 + s % 3] for s in range(rows)]
    positions = [4 * len(t) - 1 - s % 4 for s, t in enumerate(tables)]
    slots = [tables[s][p // block] * block + p % block for s, p in enumerate(positions)]
    ids = [(7 * s) % 45 for s in range(rows)]
    mine, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    got = kernels.decode_step(ids, positions, slots, tables, weights, mine[:2], mine[2:], scale=0.25)
    want = reference.decode_step(ids, positions, slots, tables, weights, theirs[:2], theirs[2:], 0.25)
    assert got is not None

    # int8 inputs round each value to one of 255 levels: a row with a value within fp32 rounding of
    # a level's edge has two right answers, a level apart. The reference run on embeddings moved by
    # fp32 rounding finds such rows; every other row must match it to fp32 rounding.
    def reference_logits(noise_seed):
        noise = rand(*embedding.shape, seed=noise_seed) * 1e-6
        moved = kernels.DecoderModelWeights(stack, embedding + noise, inv_freq, weights.head)
        fresh = [c.clone() for c in caches]
        return reference.decode_step(ids, positions, slots, tables, moved, fresh[:2], fresh[2:], 0.25).logits

    moves = torch.stack([(reference_logits(s) - want.logits).abs().amax(1) for s in (101, 102, 103)]).amax(0)
    pinned = moves < 1e-4
    assert pinned.sum() >= rows - 4, "the test's data should leave nearly every row well defined"
    torch.testing.assert_close(got.logits[pinned], want.logits[pinned], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, atol=0.1, rtol=0)  # a level apart, no more
    assert got.greedy == reference.greedy(got.logits).tolist()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    fp32_head = kernels.DecoderModelWeights(stack, embedding, inv_freq, head)
    assert kernels.decode_step(ids, positions, slots, tables, fp32_head, mine[:2], mine[2:], scale=0.25) is None
    fp32_stack = kernels.DecoderModelWeights(random_stack(), embedding, inv_freq, kernels.quantize(head, "w8a8"))
    assert kernels.decode_step(ids, positions, slots, tables, fp32_stack, mine[:2], mine[2:], scale=0.25) is None
    over = _C.MAX_PACKED_STACK_ROWS + 1
    x = rand(over, 64)
    cos = torch.ones(over, 8)
    assert kernels.decoder_stack(x, cos, cos, stack, mine[:2], mine[2:], torch.zeros(over, dtype=torch.int64),
                                 torch.zeros(over, 1, dtype=torch.int32), torch.ones(over, dtype=torch.int32),
                                 torch.arange(over + 1, dtype=torch.int32), scale=0.25) is None
