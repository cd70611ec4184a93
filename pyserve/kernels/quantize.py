"""Low-precision weights: packing fp32 weights into the formats the linear kernels read, and
unpacking them again (the reference every back-end must agree with).

    packed = quantize(weight, "int8")          # weight [N, K] fp32/bf16/fp16
    y = kernels.linear(x, packed, bias)         # == torch.nn.functional.linear(x, packed.dequantize(), bias)

Formats (see csrc/cpu/quantized_linear.h for the byte layout):
- bf16: the weight rounded to bfloat16 (2 bytes a weight);
- int8: symmetric, an fp16 scale per group of 32 input values, q in [-127, 127] (llama.cpp's Q8_0;
  1.0625 bytes);
- int4: an fp16 scale per group of 32, q in [0, 15] standing for q - 8, two per byte (Q4_0; 0.5625
  bytes).

w8a8 and w4a8 are int8 and int4 weights whose products also quantize their input rows to int8 per
group of 32 (`quantize_rows`) and take integer dot products, as llama.cpp's Q8_0 and Q4_0 do on
CPUs: the same bytes read for a third of the work, in decode and prefill alike. GPU back-ends run
them as int8 and int4 with their own (bf16) activations.
"""

from dataclasses import dataclass

import torch

FORMATS = ("bf16", "int8", "int4", "w8a8", "w4a8")
GROUP = 32
INT8_ACTIVATIONS = {"w8a8": "int8", "w4a8": "int4"}  # a format with int8 inputs: its weights' format
FORMAT_CODES = {"bf16": 1, "int8": 2, "int4": 3}  # csrc/cpu/quantized_linear.h WeightFormat
# Beyond this many rows, unpacking the weight once for a GEMM costs less than reading it packed per row.
MAX_PACKED_ROWS = 64


@dataclass
class QuantizedWeight:
    """A packed [N, K] weight: `data` in the format's layout, `scales` [N, K/32] fp16 for the
    grouped formats (as llama.cpp stores them: a decode step reads them too); `int8_activations`
    for w8a8/w4a8 (`format` is then int8/int4)."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor | None
    shape: tuple[int, int]
    int8_activations: bool = False

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scales

    @property
    def device(self) -> torch.device:
        return self.data.device

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows [start, stop), as views of this weight's storage."""
        n, k = self.shape
        scales = None if self.scales is None else self.scales.view(n, -1)[start:stop]
        return QuantizedWeight(self.format, self.data.view(n, -1)[start:stop], scales, (stop - start, k),
                               self.int8_activations)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        if self.format == "bf16":
            return self.data.to(dtype)
        if self.format == "int8":
            q = self.data.view(n, k // GROUP, GROUP).to(torch.float32)
        else:
            packed = self.data.view(n, k // GROUP, GROUP // 2)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32) - 8
        return (q * self.scales[..., None].float()).view(n, k).to(dtype)


def input_rows(x: torch.Tensor) -> int:
    """The rows a product's input [..., K] holds (0 where K is 0)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def packed_rows(x: torch.Tensor, weight) -> int:
    """The rows of x when a decode-sized kernel over the packed weight takes the product; 0 when
    the weight is not packed or the batch is large (or empty): then a GEMM on the unpacked weight."""
    rows = input_rows(x)
    return rows if isinstance(weight, QuantizedWeight) and 0 < rows <= MAX_PACKED_ROWS else 0


# Beyond MAX_PACKED_ROWS a product unpacks its weight for a GEMM: whole where the fp32 copy is at
# most UNPACK_WHOLE_BYTES, else UNPACK_BLOCK_BYTES of rows at a time, blocks that stay in cache
# while the GEMM reads them (unpacked whole, a Llama 3 output layer was a 4 GB transient). Measured
# on a 2-core AVX2 machine: 14336 x 4096 at 1,024 rows 1.22 s in 4 MB blocks, 1.46 whole; 4096 x
# 768 at 2,048 rows 111 ms whole, 141 ms in 4 MB blocks (narrower GEMMs).
UNPACK_WHOLE_BYTES = 32 * 2**20
UNPACK_BLOCK_BYTES = 4 * 2**20


def unpacked_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x times the weight's values through torch's GEMM (cuBLAS on a GPU), a large packed weight
    unpacked a block of rows at a time: the path of prefill-sized batches, where the arithmetic,
    not the bytes, is the cost. Inputs stay as they are (the caller quantizes w8a8's)."""
    if not isinstance(weight, QuantizedWeight):
        return torch.nn.functional.linear(x, weight, bias)
    n, k = weight.shape
    if 4 * n * k <= UNPACK_WHOLE_BYTES:
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    block = max(1, UNPACK_BLOCK_BYTES // (4 * k))
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        out[..., start:stop] = torch.nn.functional.linear(x, weight.rows(start, stop).dequantize(x.dtype),
                                                          None if bias is None else bias[start:stop])
    return out


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """The values x [..., K] (K a multiple of 32) stand for once the int8-activation kernels
    quantize them: per group of 32, scale = amax / 127 and q = round-half-even(x * (127 / amax))
    (csrc/cpu/integer_linear.h), returned as fp32 q * scale."""
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    # a true division, as the kernels do (`127.0 / tensor` is a reciprocal and a product: two roundings)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    return ((groups * inv).round() * (amax / 127.0)).reshape(x.shape)


def fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales as the packed formats store them; the values are chosen against these."""
    if not bool((scales.abs() <= 65504).all()):  # NaN and infinity fail this too
        raise ValueError("weights beyond fp16 scales' range (|w| up to ~8e6) cannot be packed")
    return scales.to(torch.float16).contiguous()


def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """Pack a [N, K] weight; the grouped formats need K to be a multiple of 32."""
    if format not in FORMATS:
        raise ValueError(f"unknown weight format {format!r}; choose one of {', '.join(FORMATS)}")
    if format in INT8_ACTIVATIONS:
        packed = quantize(weight, INT8_ACTIVATIONS[format])
        packed.int8_activations = True
        return packed
    if weight.ndim != 2:
        raise ValueError(f"a weight to quantize must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    if format == "bf16":
        return QuantizedWeight(format, w.to(torch.bfloat16).contiguous(), None, (n, k))
    if k % GROUP:
        raise ValueError(f"{format} needs the input size to be a multiple of {GROUP}, got {k}")
    groups = w.view(n, k // GROUP, GROUP)
    if format == "int8":
        scales = fp16_scales(groups.abs().amax(dim=-1) / 127)
        s = scales.float()[..., None]
        q = torch.where(s > 0, groups / s.clamp_min(1e-30), 0.0)
        return QuantizedWeight(format, q.round().clamp(-127, 127).to(torch.int8).view(n, k).contiguous(), scales,
                               (n, k))
    # int4, as Q4_0: the value of largest magnitude maps to -8, so its sign fixes the scale's.
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]
    scales = fp16_scales(extreme / -8)
    s = scales.float()
    q = torch.where(s[..., None] != 0, groups / torch.where(s == 0, 1.0, s)[..., None], 0.0)
    q = (q + 8).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., : GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return QuantizedWeight(format, packed.reshape(n, k // 2).contiguous(), scales, (n, k))
