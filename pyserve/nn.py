"""Layers for plugin authors that run through pyserve's kernels, and low-precision weights for them.

A layer that can hold its weight packed (bf16, int8, int4: see `pyserve.kernels.quantize`)
defines `pack(format) -> int` (packs, and returns the bytes the packed copy replaces; a layer
with `keep_unpacked = True` is skipped);
`quantize_model` calls it on every such layer of a loaded model, which is how `--quantization`
works for any plugin built from these layers:

    model = plugin.load(model_dir)
    report = quantize_model(model, "int8")   # every pyserve.nn.Linear now reads int8 weights
"""

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .kernels import placement
from .lora import LoraStack


class LoraTarget:
    """A mixin for a layer y = f(x) with `in_features`, `out_features` and a `weight` on its
    device, that takes LoRA adapters: each row of a batch adds its own adapter's delta."""

    lora: "LoraStack | None" = None  # the adapters resident in this layer (pyserve.lora)

    def put_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        if self.lora is None:
            self.lora = LoraStack.empty(self.in_features, self.out_features, self.weight.device)
        self.lora = self.lora.put(slot, a, b, scale)

    def add_adapters(self, y: torch.Tensor, x: torch.Tensor, adapters: torch.Tensor | None) -> torch.Tensor:
        """y plus each row's adapter delta; `adapters` [rows] names each row's slot (-1: none)."""
        if adapters is not None and self.lora is not None:
            kernels.lora(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.lora.a, self.lora.b, adapters,
                         self.lora.rank, self.lora.scale)
        return y


class Linear(LoraTarget, nn.Linear):
    """nn.Linear whose forward is `kernels.linear` (fast decode-sized products on the CPU), and
    whose weight may be packed to fewer bytes."""

    packed: kernels.QuantizedWeight | None = None

    def pack(self, format: str) -> int:
        self.packed = kernels.quantize(self.weight, format)
        return release(self, "weight")

    @property
    def matrix(self) -> "torch.Tensor | kernels.QuantizedWeight":
        """The weight as the kernels read it: packed when packed."""
        return self.weight if self.packed is None else self.packed

    def forward(self, x: torch.Tensor, adapters: torch.Tensor | None = None) -> torch.Tensor:
        """`adapters` [rows] picks each row's LoRA adapter slot (-1: none)."""
        return self.add_adapters(kernels.linear(x, self.matrix, self.bias), x, adapters)


class FusedLinear(Linear):
    """One Linear for several that read the same input (q/k/v, gate/up): one larger product a step.
    Its output rows are the parts' in order; a checkpoint's separate tensors load into their
    rows (see `TextModule.packed_modules_mapping` and `pyserve.weights.load_tensors`)."""

    def __init__(self, in_features: int, parts: tuple[int, ...], bias: bool = True, **kwargs):
        super().__init__(in_features, sum(parts), bias=bias, **kwargs)
        self.parts = tuple(parts)

    def rows(self, index: int) -> tuple[int, int]:
        """(first row, row count) of part `index`."""
        return sum(self.parts[:index]), self.parts[index]


def release(module: nn.Module, name: str) -> int:
    """Drop a parameter's storage once a packed copy replaced it (the name stays); returns its bytes."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False))
    return old.numel() * old.element_size()


@dataclass
class QuantizationReport:
    format: str
    layers: int  # weights packed
    packed_bytes: int  # of those weights, packed
    unpacked_bytes: int  # of those weights in the dtype they were loaded in

    def __str__(self) -> str:
        mib = 2**20
        return (f"{self.format} weights: {self.layers} layers, {self.unpacked_bytes / mib:.1f} MiB -> "
                f"{self.packed_bytes / mib:.1f} MiB; a decode step reads {self.packed_bytes / mib:.1f} MiB of them "
                f"instead of {self.unpacked_bytes / mib:.1f} ({self.unpacked_bytes / max(self.packed_bytes, 1):.2f}x fewer)")


def quantize_model(model, format: str) -> QuantizationReport:
    """Pack the weight of every layer that supports it (a `pack(format)` method) inside the loaded
    model (an nn.Module, or an object holding them as attributes, as TextModel does)."""
    if format not in kernels.WEIGHT_FORMATS:
        raise ValueError(f"--quantization must be none or one of {', '.join(kernels.WEIGHT_FORMATS)}, got {format!r}")
    roots = [model] if isinstance(model, nn.Module) else [m for m in vars(model).values() if isinstance(m, nn.Module)]
    report = QuantizationReport(format, 0, 0, 0)
    everything: list[kernels.QuantizedWeight] = []
    for root in roots:
        for layer in list(root.modules()):
            if not callable(getattr(layer, "pack", None)) or getattr(layer, "keep_unpacked", False):
                continue
            report.unpacked_bytes += layer.pack(format)
            packed = [v for v in vars(layer).values() if isinstance(v, kernels.QuantizedWeight)]
            report.layers += len(packed)
            report.packed_bytes += sum(p.nbytes for p in packed)
            everything += packed
    if not report.layers:
        raise ValueError("this model has no layers that can hold packed weights (pyserve.nn.Linear)")
    placement.gather(everything)  # in the order the layers run, on huge pages where granted
    return report


def pack_as_asked(model, quantization: str | None) -> QuantizationReport | None:
    """`quantize_model` as a load asks: None packs as the checkpoint was (a Q8_0/Q4_0 GGUF file's
    `weight_format`), "none" leaves the weights as loaded; the report, or None when nothing was packed."""
    if quantization is None:
        quantization = getattr(model, "weight_format", None)
    return None if quantization in (None, "none") else quantize_model(model, quantization)
