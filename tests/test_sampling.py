"""The fused sampler on every back-end against the reference, by exact match where the result is
deterministic and by a chi-square test where it is a draw."""

from dataclasses import replace

import pytest
import torch
from scipy import stats

from pyserve import kernels
from pyserve.kernels import reference
from pyserve.kernels.types import SamplingRow, SamplingTensors

from conftest import backend_params

BACKENDS = backend_params()


def logits_for(batch, vocab, seed=0, scale=3.0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def run(backend, device, logits, rows, num_logprobs=0):
    params = SamplingTensors.from_rows(rows, device)
    return kernels.sample(logits.to(device), params, num_logprobs=num_logprobs, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 1001, 32003])
def test_greedy_is_exact_with_logprobs(backend, device, vocab):
    logits = logits_for(5, vocab, seed=vocab)
    rows = [SamplingRow(temperature=0.0) for _ in range(5)]
    n = min(vocab, 5)
    got = run(backend, device, logits, rows, num_logprobs=n)
    want = reference.sample(logits, SamplingTensors.from_rows(rows), num_logprobs=n)
    assert torch.equal(got.tokens.cpu(), logits.argmax(-1))
    torch.testing.assert_close(got.logprobs.cpu(), want.logprobs, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.top_tokens.cpu(), want.top_tokens)
    torch.testing.assert_close(got.top_logprobs.cpu(), want.top_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_penalties_and_bias_match_reference(backend, device):
    vocab = 50
    logits = logits_for(6, vocab, seed=1, scale=1.0)
    rows = [
        SamplingRow(temperature=0.0, repetition_penalty=1.8, prompt_tokens=[logits[0].argmax().item(), 3, 3]),
        SamplingRow(temperature=0.0, repetition_penalty=0.5, output_tokens=[1, 2, 2, 9]),
        SamplingRow(temperature=0.0, frequency_penalty=0.7, output_tokens=[logits[2].argmax().item()] * 3),
        SamplingRow(temperature=0.0, presence_penalty=2.5, output_tokens=[logits[3].argmax().item(), 4]),
        SamplingRow(temperature=0.0, logit_bias={7: 10.0, 8: -100.0}),
        SamplingRow(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2,
                    prompt_tokens=list(range(0, 50, 3)), output_tokens=[5, 5, 6, logits[5].argmax().item()],
                    logit_bias={11: 1.5}),
    ]
    params = SamplingTensors.from_rows(rows)
    want = reference.sample(logits, params)
    got = run(backend, device, logits, rows)
    assert torch.equal(got.tokens.cpu(), want.tokens)
    # Each penalty changed the outcome from the plain argmax for at least most rows.
    assert (want.tokens != logits.argmax(-1)).sum() >= 4
    # And the reference penalties themselves follow their definitions.
    x = reference.processed_logits(logits, params, 2)
    assert torch.isclose(x[rows[2].output_tokens[0]], logits[2, rows[2].output_tokens[0]] - 2.1)


FILTERS = [
    dict(top_k=5),
    dict(top_p=0.7),
    dict(min_p=0.2),
    dict(top_k=20, top_p=0.8, temperature=0.7),
    dict(temperature=1.5, min_p=0.05, top_p=0.95),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_filtered_distribution_chi_square(backend, device, filters):
    vocab, draws = 40, 4000
    if backend == "triton" and device == "cpu":  # the interpreter runs ~0.2 s per row here
        if filters not in (FILTERS[3], FILTERS[4]):
            pytest.skip("covered on a GPU; the interpreter runs the combined filters only")
        # 200 draws still tell a doubled temperature apart (p 1e-11 and 4e-6 with these seeds)
        vocab, draws = 16, 200
    row_logits = logits_for(1, vocab, seed=7, scale=1.5)
    logits = row_logits.expand(draws, vocab).contiguous()
    rows = [SamplingRow(seed=1234, step=i, **filters) for i in range(draws)]
    got = run(backend, device, logits, rows).tokens.cpu()

    temp = filters.get("temperature", 1.0)
    keep = reference.candidate_mask(row_logits[0], temp, filters.get("top_k", 0), filters.get("top_p", 1.0),
                                    filters.get("min_p", 0.0))
    probs = torch.softmax(row_logits[0] / temp, 0) * keep
    probs = probs / probs.sum()
    assert keep[got].all(), "a filtered-out token was drawn"
    counts = torch.bincount(got, minlength=vocab)[keep].numpy()
    expected = probs[keep].double().numpy()
    expected = expected / expected.sum() * draws
    _, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3, (counts, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_seeded_rows_do_not_depend_on_the_batch(backend, device):
    vocab = 1000
    logits = logits_for(8, vocab, seed=3)
    rows = [SamplingRow(temperature=0.9, top_k=(0, 50)[i % 2], top_p=(1.0, 0.9)[i % 3 == 0], seed=100 + i, step=i)
            for i in range(8)]
    alone = torch.stack([run(backend, device, logits[i:i + 1], rows[i:i + 1]).tokens.cpu()[0] for i in range(8)])
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = run(backend, device, logits[perm], [rows[i] for i in perm]).tokens.cpu()
    together = run(backend, device, logits, rows).tokens.cpu()
    want = reference.sample(logits, SamplingTensors.from_rows(rows)).tokens
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[perm])
    assert torch.equal(together, want), "back-end and reference disagree on seeded draws"


def test_seeded_draws_are_the_same_on_one_and_two_threads():
    if "cpu" not in kernels.available():
        pytest.skip("the cpu back-end is not built")
    from pyserve import _C
    logits = logits_for(16, 5000, seed=9)
    rows = [SamplingRow(temperature=1.0, top_p=0.95, seed=i, step=3) for i in range(16)]
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = run("cpu", "cpu", logits, rows).tokens
        _C.set_num_threads(2)
        two = run("cpu", "cpu", logits, rows).tokens
    finally:
        _C.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sampling_rejects_bad_arguments(backend):
    """Each CPU back-end checks the values it reads (the C++ one in its own pass over the rows)."""
    logits = logits_for(2, 10)

    def rejects(match, params, **kw):
        with pytest.raises(kernels.KernelInputError, match=match):
            kernels.sample(logits, params, backend=backend, **kw)

    rejects("params has 1 rows", SamplingTensors.from_rows([SamplingRow()]))
    rejects("num_logprobs", SamplingTensors.from_rows([SamplingRow()] * 2), num_logprobs=11)
    for field, bad in (("top_p", 1.5), ("top_p", 0.0), ("top_p", float("nan")), ("temperature", -0.5),
                       ("temperature", float("nan")), ("repetition_penalty", 0.0)):
        rejects(f"params.{field} must be", SamplingTensors.from_rows([SamplingRow(), SamplingRow(**{field: bad})]))
    rejects("params.output_tokens holds token ids outside", SamplingTensors.from_rows([SamplingRow(output_tokens=[10])] * 2))
    rejects("params.prompt_tokens holds", SamplingTensors.from_rows([SamplingRow(prompt_tokens=[3, -1])] * 2))
    rejects("params.bias_tokens holds", SamplingTensors.from_rows([SamplingRow(logit_bias={12: 1.0})] * 2))
    good = SamplingTensors.from_rows([SamplingRow(output_tokens=[1, 2]), SamplingRow(output_tokens=[3])])
    for offsets in ([0, 2, 4], [1, 2, 3], [0, 3, 2]):  # past the end, not from 0, falling
        rejects("params.output_offsets must rise from 0",
                replace(good, output_offsets=torch.tensor(offsets, dtype=torch.int32)))
    rejects("params.bias_values must have shape", replace(good, bias_values=torch.zeros(1)))
    assert kernels.sample(logits, good, backend=backend).tokens.shape == (2,)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_logits_are_never_chosen(backend, device):
    vocab = 300
    logits = logits_for(5, vocab, seed=4)
    logits[0, logits[0].argmax()] = float("nan")  # a NaN where the maximum was
    logits[1, ::3] = float("nan")
    logits[2] = float("nan")  # a row of NaNs: token 0, never an id past the vocabulary
    logits[3, 7] = float("inf")
    logits[4, :] = float("-inf")
    logits[4, 42] = float("nan")
    rows = [SamplingRow(temperature=0.0), SamplingRow(temperature=0.0), SamplingRow(temperature=0.0),
            SamplingRow(temperature=0.0), SamplingRow(temperature=0.0)]
    got = run(backend, device, logits, rows).tokens.cpu()
    want = reference.sample(logits, SamplingTensors.from_rows(rows)).tokens
    finite = torch.where(torch.isnan(logits), float("-inf"), logits)
    assert got.tolist() == want.tolist() == [int(finite[0].argmax()), int(finite[1].argmax()), 0, 7, 0]
    drawn = run(backend, device, logits[:2], [SamplingRow(temperature=1.0, seed=s) for s in (1, 2)]).tokens.cpu()
    assert all(0 <= t < vocab and not torch.isnan(logits[r, t]) for r, t in enumerate(drawn.tolist()))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 300, 32003])
def test_greedy_finds_what_the_sampler_draws_at_temperature_zero(backend, device, vocab):
    """kernels.greedy, the sampler's shortcut for plain greedy rows, on the sampler's own rule:
    the first maximum (ties to the lower id), NaN as -inf, token 0 when nothing beats -inf."""
    logits = logits_for(7, vocab, seed=vocab).round()  # rounded: ties at the maximum are common
    logits[1, ::3] = float("nan")
    logits[2] = float("nan")
    logits[3, -1] = float("inf")
    logits[4] = float("-inf")
    logits[5, :] = logits[5].max()  # all tied
    logits[6, vocab // 2:] = float("nan")  # NaNs in the last lanes
    rows = [SamplingRow(temperature=0.0) for _ in range(7)]
    got = kernels.greedy(logits.to(device), backend=backend).cpu()
    drawn = run(backend, device, logits, rows).tokens.cpu()
    first_max = [int((row == row.max()).nonzero()[0]) if row.max() > float("-inf") else 0
                 for row in torch.where(torch.isnan(logits), float("-inf"), logits)]
    assert got.tolist() == drawn.tolist() == first_max
    assert reference.greedy(logits).tolist() == first_max
    padded = torch.zeros(3, vocab + 5)
    padded[:, :vocab] = logits[:3]
    assert kernels.greedy(padded[:, :vocab].to(device), backend=backend).cpu().tolist() == first_max[:3]


def test_padded_logits_views_are_sampled_as_their_visible_columns():
    vocab = 1000
    padded = logits_for(3, 1024, seed=8)
    padded[:, vocab:] = 100.0  # padding that must never be read
    rows = [SamplingRow(temperature=0.0), SamplingRow(temperature=0.7, seed=3), SamplingRow(temperature=1.0, top_k=5)]
    view = padded[:, :vocab]
    want = reference.sample(view.contiguous(), SamplingTensors.from_rows(rows)).tokens
    for backend, device in [("cpu", "cpu"), ("triton", "cpu")]:
        if backend not in kernels.available():
            continue
        got = run(backend, device, view, rows).tokens
        assert got.tolist() == want.tolist(), backend


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """Bools [M, V] as the packed int32 words the sampler takes (bit t % 32 of word t // 32)."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.reshape(rows, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab", [45, 1001])
def test_allowed_token_masks_match_reference(backend, device, vocab):
    """Masked and unmasked rows in one batch: greedy and seeded draws equal the reference, every
    drawn token is allowed, and the unmasked rows are untouched by the masks."""
    gen = torch.Generator().manual_seed(vocab)
    logits = logits_for(6, vocab, seed=7)
    allowed = torch.rand(3, vocab, generator=gen) < torch.tensor([[0.02], [0.5], [0.97]])
    allowed[:, 3] = True  # never an empty mask
    rows = [SamplingRow(temperature=0.0), SamplingRow(temperature=0.0), SamplingRow(temperature=1.0, seed=3),
            SamplingRow(temperature=0.8, top_k=10, seed=4), SamplingRow(temperature=1.0, top_p=0.9, seed=5),
            SamplingRow(temperature=0.0, logit_bias={5: 50.0})]
    which = torch.tensor([0, -1, 1, 2, 0, 1], dtype=torch.int32)
    params = SamplingTensors.from_rows(rows).with_allowed(pack_bits(allowed), which)
    want = reference.sample(logits, params, num_logprobs=3)
    got = kernels.sample(logits.to(device), params.to(device), num_logprobs=3, backend=backend)
    assert got.tokens.cpu().tolist() == want.tokens.tolist()
    for r, t in enumerate(want.tokens.tolist()):
        assert which[r] < 0 or allowed[which[r], t]
    assert int(want.tokens[1]) == int(logits[1].argmax())  # the unmasked row
    torch.testing.assert_close(got.top_logprobs.cpu(), want.top_logprobs, atol=1e-4, rtol=1e-4)  # raw logits
    # The reference's mask meets its definition.
    x = reference.processed_logits(logits, params, 0)
    assert torch.equal(torch.isfinite(x), allowed[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_draws_follow_the_renormalized_distribution(backend, device):
    vocab, draws = 40, 4000
    if backend == "triton" and device == "cpu":  # the interpreter runs ~0.1 s per row here
        draws = 400
    logits = logits_for(1, vocab, seed=9, scale=1.0)
    allowed = torch.zeros(1, vocab, dtype=torch.bool)
    allowed[0, [1, 5, 6, 17, 33, 39]] = True
    bits = pack_bits(allowed)
    rows = [SamplingRow(temperature=1.0, seed=s) for s in range(draws)]
    params = SamplingTensors.from_rows(rows).with_allowed(bits, torch.zeros(draws, dtype=torch.int32))
    tokens = kernels.sample(logits.expand(draws, vocab).contiguous().to(device), params.to(device),
                            backend=backend).tokens.cpu()
    assert set(tokens.tolist()) <= {1, 5, 6, 17, 33, 39}
    probs = torch.softmax(logits[0].masked_fill(~allowed[0], float("-inf")), 0)[allowed[0]]
    counts = torch.bincount(tokens, minlength=vocab)[allowed[0]]
    assert stats.chisquare(counts.numpy(), (probs * draws).numpy()).pvalue > 1e-3


def test_allowed_masks_are_checked():
    logits = logits_for(2, 70)
    params = SamplingTensors.from_rows([SamplingRow()] * 2)
    with pytest.raises(kernels.KernelInputError, match="allowed_bits must have shape"):
        kernels.sample(logits, params.with_allowed(torch.zeros(1, 2, dtype=torch.int32),
                                                   torch.zeros(2, dtype=torch.int32)))
    with pytest.raises(kernels.KernelInputError, match="allowed_row must be in"):
        kernels.sample(logits, params.with_allowed(torch.zeros(1, 3, dtype=torch.int32),
                                                   torch.tensor([0, 1], dtype=torch.int32)))
