"""Low-precision weights: packing round-trips within each format's error bound, every CPU
instruction-set path of the packed linear kernel equals the reference (the dequantized weight
through torch), and quantized models stay close to the fp32 model."""

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import cpu, reference
from pyserve.kernels.quantize import GROUP, quantize

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
    assert packed.nbytes == {"bf16": 2, "int8": 1 + 4 / GROUP, "int4": 0.5 + 4 / GROUP}[format] * w.numel()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("format", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 19, 64])
def test_every_instruction_set_matches_the_reference(isa, format, rows):
    for n, k in ((1, 32), (37, 96), (130, 256)):
        packed = quantize(weights(n, k, seed=n), format)
        x, bias = torch.randn(rows, k), torch.randn(n)
        want = reference.linear(x, packed, bias)
        got = cpu.quantized_linear(x, packed, bias, isa=isa)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cpu.quantized_linear(x, packed, None, isa=isa), reference.linear(x, packed),
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


def test_bf16_rows_of_any_length_and_the_prefill_path():
    packed = quantize(weights(10, 45), "bf16")  # 45: a tail after the last full group
    x = torch.randn(2, 45)
    torch.testing.assert_close(kernels.linear(x, packed), reference.linear(x, packed), atol=1e-4, rtol=1e-4)
    big = torch.randn(3, 27, 45)  # 81 rows: unpacked once, torch's GEMM
    torch.testing.assert_close(kernels.linear(big, packed), reference.linear(big, packed), atol=1e-4, rtol=1e-4)


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
