"""Low-precision weights: packing round-trips within each format's error bound, every CPU
instruction-set path of the packed linear kernel equals the reference (the dequantized weight
through torch; for w8a8/w4a8 the inputs quantized as `quantize_rows` says), and quantized models
stay close to the fp32 model: logits against transformers on the same dequantized weights, and
the committed demo model's held-out perplexity and greedy tokens."""

import importlib

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import cpu, reference
from pyserve.kernels.quantize import GROUP, quantize, quantize_rows

from conftest import backend_params

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="the C++ kernels are not built")
ISAS = [isa for isa in ("scalar", "avx2", "avx512") if cpu.ISAS[isa] <= cpu.ISAS[cpu.best_isa()]]


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :GROUP] = 0.0  # an all-zero group: scale 0 must not divide by zero
    return w


@pytest.mark.parametrize("format", ["bf16", "int8", "int4"])
def test_packing_round_trips_within_the_format_error(format):
    w = weights(24, 128)
    packed = quantize(w, format)
    back = packed.dequantize()
    groups = w.view(24, -1, GROUP).abs().amax(-1, keepdim=True)
    err = (back - w).view(24, -1, GROUP).abs()
    if format == "bf16":
        assert torch.all(err <= w.view(24, -1, GROUP).abs() * 2**-8)
    elif format == "int8":
        assert torch.all(err <= groups / 127 / 2 + 1e-7)  # half a step
    else:  # half a step, or a whole one where the top of the range clamps (Q4_0 has 8 steps down, 7 up)
        assert torch.all(err <= groups / 8 * 1.0001 + 1e-7)
    assert torch.all(back[0, :GROUP] == 0)
    assert packed.nbytes == {"bf16": 2, "int8": 1 + 2 / GROUP, "int4": 0.5 + 2 / GROUP}[format] * w.numel()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("format", ["bf16", "int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 19, 64])
def test_every_instruction_set_matches_the_reference(isa, format, rows):
    # 224: a four of groups and three after it; 1248: longer rows, 39 groups
    for n, k in ((1, 32), (37, 224), (130, 256), (23, 1248)):
        packed = quantize(weights(n, k, seed=n), format)
        x, bias = torch.randn(rows, k), torch.randn(n)
        want = reference.linear(x, packed, bias)
        got = cpu.quantized_linear(x, packed, bias, isa=isa)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cpu.quantized_linear(x, packed, None, isa=isa), reference.linear(x, packed),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("format", ["w8a8", "w4a8"])
def test_integer_products_give_a_row_the_same_result_in_any_batch(isa, format):
    """The integer kernels reduce a row in one order whatever rows share its batch: bit for bit
    the same alone, in a pass of 8 and in a batch of three passes (so a seeded decode's logits do
    not depend on the other requests; the fp32-input kernels do not promise this: how many
    accumulator chains they keep depends on the rows in a pass)."""
    packed = quantize(weights(40, 2080, seed=3), format)
    x, bias = torch.randn(19, 2080), torch.randn(40)
    batch = cpu.quantized_linear(x, packed, bias, isa=isa)
    for i in (0, 7, 18):
        assert torch.equal(cpu.quantized_linear(x[i:i + 1], packed, bias, isa=isa)[0], batch[i])
    assert torch.equal(cpu.quantized_linear(x[:8], packed, bias, isa=isa), batch[:8])
    if isa != "scalar":  # a prompt's rows, over the kernels' row blocks
        prompt = torch.cat([torch.randn(280, 2080), x])
        assert torch.equal(cpu.quantized_linear(prompt, packed, bias, isa=isa)[280:], batch)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("format", ["int8", "w8a8"])
def test_a_minus_128_weight_from_a_file_counts_as_itself(isa, format):
    """Our quantizer stays within [-127, 127], but a Q8_0 file may hold -128 (its range allows it):
    the kernels that move signs between bytes must not read it as +128 or saturate."""
    packed = quantize(weights(9, 256, seed=4), format)
    packed.data[:, ::3] = -128
    packed.data[2] = -128
    x = torch.randn(5, 256)
    x[1] = -x[1].abs()  # negative inputs meet the -128s
    torch.testing.assert_close(cpu.quantized_linear(x, packed, isa=isa), reference.linear(x, packed),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "cpu"])
@pytest.mark.parametrize("format", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_gpu_packed_products_match_the_reference(backend, device, format, rows):
    """The GPU back-ends' packed products (the Triton kernel runs in its interpreter here)."""
    n, k = 45, 160 if format != "bf16" else 150  # odd sizes; bf16 takes any K
    w, x, bias = weights(n, k, seed=rows), weights(rows, k, seed=99), weights(1, n, seed=7)[0]
    packed = quantize(w, format)
    want = reference.linear(x, packed, bias)
    dev_packed = kernels.QuantizedWeight(packed.format, packed.data.to(device),
                                         None if packed.scales is None else packed.scales.to(device), packed.shape)
    got = kernels.linear(x.to(device), dev_packed, bias.to(device), backend=backend).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_int8_activations_are_quantized_per_group_as_the_reference_says():
    """w8a8 differs from int8 exactly by the inputs' quantization: the integer kernels equal int8's
    kernel fed quantize_rows(x), at decode and prompt sizes alike (the latter on every path: the
    integer kernels on AVX2, the unpacked GEMM on quantized inputs without it)."""
    w, x = weights(70, 256), torch.randn(5, 256) * torch.logspace(-2, 2, 256)  # groups of very different size
    x[1, 64:96] = 0.0  # an all-zero group of inputs
    q = quantize_rows(x)
    steps = x.view(5, -1, GROUP).abs().amax(-1, keepdim=True) / 127
    assert torch.all((q - x).view(5, -1, GROUP).abs() <= steps / 2 * 1.0001 + 1e-30) and torch.all(q[1, 64:96] == 0)
    for weights_only, with_inputs in (("int8", "w8a8"), ("int4", "w4a8")):
        torch.testing.assert_close(cpu.quantized_linear(x, quantize(w, with_inputs)),
                                   cpu.quantized_linear(q, quantize(w, weights_only)), atol=1e-4, rtol=1e-5)
    big = torch.randn(300, 256)  # a prompt: beyond the decode-sized kernels, over one row block
    want = kernels.linear(quantize_rows(big), quantize(w, "int8"))
    for isa in ("auto", "scalar"):
        torch.testing.assert_close(cpu.quantized_linear(big, quantize(w, "w8a8"), isa=isa), want, atol=1e-4, rtol=1e-5)


def test_bf16_rows_of_any_length_and_the_prefill_path():
    packed = quantize(weights(10, 45), "bf16")  # 45: a tail after the last full group
    x = torch.randn(2, 45)
    torch.testing.assert_close(kernels.linear(x, packed), reference.linear(x, packed), atol=1e-4, rtol=1e-4)
    big = torch.randn(3, 27, 45)  # 81 rows: unpacked once, torch's GEMM
    torch.testing.assert_close(kernels.linear(big, packed), reference.linear(big, packed), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("format", ["bf16", "int8", "int4", "w8a8"])
def test_prefill_unpacks_large_weights_a_block_of_rows_at_a_time(monkeypatch, format):
    """Beyond the decode-sized kernels a weight is unpacked in blocks of rows (here 7 of its 37,
    the last block short), with the same result as unpacking it whole."""
    n, k = 37, 64
    packed, x, bias = quantize(weights(n, k), format), torch.randn(2, 40, k), torch.randn(n)
    module = importlib.import_module("pyserve.kernels.quantize")  # not the function pyserve.kernels exports
    monkeypatch.setattr(module, "UNPACK_WHOLE_BYTES", 0)
    monkeypatch.setattr(module, "UNPACK_BLOCK_BYTES", 7 * 4 * k)
    isa = "scalar" if format == "w8a8" else "auto"  # w8a8 prompts unpack only without AVX2
    torch.testing.assert_close(cpu.quantized_linear(x, packed, bias, isa=isa), reference.linear(x, packed, bias),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cpu.quantized_linear(x, packed, isa=isa), reference.linear(x, packed),
                               atol=1e-4, rtol=1e-4)


def test_bad_weights_and_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 40), "int8")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(4, 64), "fp8")
    with pytest.raises(kernels.KernelInputError, match="features"):
        kernels.linear(torch.randn(1, 32), quantize(torch.randn(4, 64), "int8"))


# -- whole models ---------------------------------------------------------------------------------

MODELS = {"llama": ("llama", {}), "llama-tied": ("llama", {"tie_word_embeddings": True}), "gpt2": ("gpt2", {})}


@pytest.fixture(scope="module", params=list(MODELS))
def text_model_dir(request, tmp_path_factory):
    from tiny_models import make_model
    arch, overrides = MODELS[request.param]
    return make_model(tmp_path_factory.mktemp(request.param), arch, **overrides)


def dequantized_reference(model_dir, format: str):
    """transformers' model with every linear weight replaced by its packed-then-unpacked value
    (a tied head untied: the embedding lookups keep the full-precision table, as pyserve does)."""
    from transformers.pytorch_utils import Conv1D

    from tiny_models import load_reference
    ref = load_reference(model_dir)
    embeddings = ref.get_input_embeddings().weight
    with torch.no_grad():
        for module in list(ref.modules()):
            if isinstance(module, torch.nn.Linear) and module.weight is not embeddings:
                module.weight.copy_(quantize(module.weight, format).dequantize())
            elif isinstance(module, Conv1D):  # GPT-2 keeps [in, out]
                module.weight.copy_(quantize(module.weight.t(), format).dequantize().t())
        head = ref.get_output_embeddings()
        if head.weight is embeddings:
            head.weight = torch.nn.Parameter(quantize(embeddings, format).dequantize())
    return ref


@pytest.mark.parametrize("format", ["bf16", "int8", "int4"])
def test_quantized_models_match_transformers_on_the_same_dequantized_weights(text_model_dir, format):
    from pyserve import LLM, SamplingParams
    from pyserve.nn import quantize_model
    from pyserve.plugin import PluginRegistry

    from test_llm import PROMPTS, one_sequence_forward, reference_greedy
    model = PluginRegistry.discover().for_model(text_model_dir).load(text_model_dir)
    report = quantize_model(model, format)
    assert report.layers > 0 and report.packed_bytes < report.unpacked_bytes
    ref = dequantized_reference(text_model_dir, format)
    with torch.no_grad():
        for ids in PROMPTS + [[0] + list(range(3, 72))]:  # the C++ kernels (<= 64 rows), and the unpacked GEMM
            want = ref(torch.tensor([ids])).logits[0].float()
            assert (one_sequence_forward(model, ids) - want).abs().max() <= 1e-4
    llm = LLM(text_model_dir, device="cpu", quantization=format)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [reference_greedy(ref, ids, 12) for ids in PROMPTS]


# -- quality on a trained model -------------------------------------------------------------------

# Held-out perplexity may rise by this fraction; at least this share of greedy tokens must stay
# (the issue asks it of the 8- and 16-bit formats).
PERPLEXITY_RISE = {"bf16": 0.01, "int8": 0.01, "w8a8": 0.01, "int4": 0.05, "w4a8": 0.05}
GREEDY_KEPT = {"bf16": 0.95, "int8": 0.95, "w8a8": 0.95, "int4": 0.0, "w4a8": 0.0}


def chunked_logits(model, ids: list[int], chunk: int = 64, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """All-position logits, fed `chunk` tokens a step as chunked prefill feeds them: every product
    then takes the decode-sized kernels (<= 64 rows), where w8a8/w4a8 quantize their inputs."""
    from pyserve.tasks import AttentionMetadata, KVCache
    spec, block = model.spec, 16
    blocks = -(-len(ids) // block)
    cache = KVCache.allocate(spec.num_layers, blocks, spec.num_kv_heads, block, spec.head_dim,
                             cache_dtype or spec.dtype, spec.device)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    logits = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            meta = AttentionMetadata(torch.arange(start, end), table, torch.tensor([end], dtype=torch.int32),
                                     torch.tensor([0, end - start], dtype=torch.int32), end - start, end)
            hidden = model.forward(torch.tensor(ids[start:end]), torch.arange(start, end), meta, cache)
            logits.append(model.compute_logits(hidden).float())
    return torch.cat(logits)


@pytest.fixture(scope="module")
def held_out_windows():
    """The demo chat model (trained on stdlib docs) and four 256-token windows of documents it
    never saw, with its fp32 logits on them."""
    import random

    from pyserve.demo import demo_model_dirs
    from pyserve.demo.data import is_held_out, python_docs
    from pyserve.demo.train_text import token_stream
    from pyserve.plugin import PluginRegistry
    from tokenizers import Tokenizer

    model_dir = demo_model_dirs()["pydoc-chat"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    held = token_stream(tok, {k: v for k, v in python_docs().items() if is_held_out(k)}, random.Random(0), chat=False)
    windows = [held[i * 256:(i + 1) * 256].tolist() for i in range(4)]
    load = lambda: PluginRegistry.discover().for_model(model_dir).load(model_dir)  # noqa: E731
    fp32 = load()
    return load, windows, [chunked_logits(fp32, w) for w in windows]


def perplexity(logits: list[torch.Tensor], windows: list[list[int]]) -> float:
    nll = [torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(w[1:]), reduction="sum")
           for lg, w in zip(logits, windows)]
    return float(torch.exp(sum(nll) / sum(len(w) - 1 for w in windows)))


@pytest.mark.parametrize("format", list(PERPLEXITY_RISE))
def test_a_trained_model_keeps_its_perplexity_and_greedy_tokens(held_out_windows, format):
    from pyserve.nn import quantize_model
    load, windows, want = held_out_windows
    model = load()
    quantize_model(model, format)
    got = [chunked_logits(model, w) for w in windows]
    base, ppl = perplexity(want, windows), perplexity(got, windows)
    same = float(torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]).float().mean())
    print(f"{format}: held-out perplexity {ppl:.3f} vs fp32 {base:.3f} ({ppl / base - 1:+.2%}), "
          f"greedy tokens the same at {same:.1%} of positions")
    assert ppl <= base * (1 + PERPLEXITY_RISE[format]) and same >= GREEDY_KEPT[format]


@pytest.mark.parametrize("chunk", [64, 8])  # 8: decode-sized steps, through the fused C++ stack
def test_a_bf16_kv_cache_keeps_perplexity_and_greedy_tokens(held_out_windows, chunk):
    """Keys and values stored in bf16 (`kv_cache_dtype="bfloat16"`), everything else in fp32: held
    to the bars the issue sets for bf16 weights."""
    load, windows, want = held_out_windows
    model = load()
    got = [chunked_logits(model, w, chunk, torch.bfloat16) for w in windows]
    base, ppl = perplexity(want, windows), perplexity(got, windows)
    same = float(torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]).float().mean())
    print(f"bf16 KV cache, {chunk}-token steps: held-out perplexity {ppl:.3f} vs fp32 {base:.3f} "
          f"({ppl / base - 1:+.2%}), greedy tokens the same at {same:.1%} of positions")
    assert ppl <= base * 1.01 and same >= 0.95
    assert not all(torch.equal(g, w) for g, w in zip(got, want))  # the cache did round
