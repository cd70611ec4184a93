"""LoRA adapters in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), for
plugins that serve several adapters over one base model.

    adapter = LoraAdapter.load("my-adapter", "path/to/adapter")
    adapter.weights["model.layers.0.self_attn.q_proj"]   # (A [r, in], B [out, r])
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import InvalidParameter

Target = tuple[torch.nn.Module, list[str], list[int]]  # a layer, its parts' module names, their output sizes


@dataclass
class LoraAdapter:
    name: str
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # base module name -> (A [r, in], B [out, r])

    @classmethod
    def load(cls, name: str, path: str | Path) -> "LoraAdapter":
        """Read and check a PEFT adapter directory; every fault is an InvalidParameter naming it."""
        path = Path(path)
        config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
        try:
            # regular files only: reading a FIFO or a device would wait forever
            found = config_path.is_file() and weights_path.is_file()
        except OSError as exc:  # a name too long for the file system, a loop of links, ...
            raise InvalidParameter("lora", f"cannot read the adapter path: {exc.strerror or exc}") from None
        if not found:
            raise InvalidParameter("lora", f"{str(path)[:200]} is not a PEFT LoRA adapter (adapter_config.json and "
                                           f"adapter_model.safetensors)")
        try:
            cfg = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidParameter("lora", f"{path}: adapter_config.json is not readable JSON: {exc}") from None
        if not isinstance(cfg, dict):
            raise InvalidParameter("lora", f"{path}: adapter_config.json must hold an object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise InvalidParameter("lora", f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise InvalidParameter("lora", f"{path}: adapter_config.json needs a positive integer r, got {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise InvalidParameter("lora", f"{path}: lora_alpha must be a number, got {alpha!r}")
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        try:
            tensors = load_file(str(weights_path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own kinds for a broken file
            raise InvalidParameter("lora", f"{path}: adapter_model.safetensors cannot be read: {exc}") from None
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise InvalidParameter("lora", f"{path}: unexpected tensor {key!r} (only LoRA A/B weights are served)")
            pieces.setdefault(module.removeprefix("base_model.model."), {})[kind[0]] = tensor.float()
        weights = {}
        for module, ab in pieces.items():
            if set(ab) != {"A", "B"}:
                raise InvalidParameter("lora", f"{path}: {module} lacks its lora_A or lora_B weight")
            weights[module] = (ab["A"], ab["B"])
        return cls(name, rank, float(scale), weights)


@dataclass
class LoraStack:
    """One layer's resident adapters, stacked for `kernels.lora` (a row names its slot)."""

    a: torch.Tensor  # [slots, max_rank, in]
    b: torch.Tensor  # [slots, out, max_rank]
    rank: torch.Tensor  # [slots] int32 (0: the adapter leaves this layer alone)
    scale: torch.Tensor  # [slots] float32

    @classmethod
    def empty(cls, in_features: int, out_features: int, device) -> "LoraStack":
        return cls(torch.zeros(0, 0, in_features, device=device), torch.zeros(0, out_features, 0, device=device),
                   torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, device=device))

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> "LoraStack":
        """Slot `slot` now holds A [r, in] and B [out, r] (r may be 0): written in place, or into a
        grown copy when the slot or the rank is new."""
        stack = self
        if slot >= self.a.shape[0] or a.shape[0] > self.a.shape[1]:
            stack = self._grown(max(slot + 1, self.a.shape[0]), max(a.shape[0], self.a.shape[1]))
        r = a.shape[0]
        stack.a[slot], stack.b[slot] = 0.0, 0.0
        stack.a[slot, :r], stack.b[slot, :, :r] = a, b
        stack.rank[slot], stack.scale[slot] = r, scale
        return stack

    def _grown(self, slots: int, rank: int) -> "LoraStack":
        grown = LoraStack(self.a.new_zeros(slots, rank, self.a.shape[2]), self.b.new_zeros(slots, self.b.shape[1], rank),
                          self.rank.new_zeros(slots), self.scale.new_zeros(slots))
        grown.a[:self.a.shape[0], :self.a.shape[1]] = self.a
        grown.b[:self.b.shape[0], :, :self.b.shape[2]] = self.b
        grown.rank[:self.rank.shape[0]], grown.scale[:self.scale.shape[0]] = self.rank, self.scale
        return grown


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor] | None], sizes: list[int], in_features: int):
    """One adapter for a fused projection from its parts' (A, B) (None: a part the adapter leaves
    alone): the ranks stack, and B is block-diagonal over the parts' output rows."""
    ranks = [0 if p is None else p[0].shape[0] for p in parts]
    a = torch.zeros(sum(ranks), in_features)
    b = torch.zeros(sum(sizes), sum(ranks))
    r0 = n0 = 0
    for part, rank, size in zip(parts, ranks, sizes):
        if part is not None:
            a[r0:r0 + rank] = part[0]
            b[n0:n0 + size, r0:r0 + rank] = part[1]
        r0, n0 = r0 + rank, n0 + size
    return a, b


def adapter_layers(adapter: LoraAdapter, targets: list[Target]) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """The adapter as (layer, A, B) for every target layer (rank 0 where it leaves one alone), the
    parts of a fused layer stacked by `fuse`; InvalidParameter naming the module when the adapter
    targets a module not listed or has the wrong shapes for it."""
    known = {name for _, names, _ in targets for name in names}
    unknown = sorted(set(adapter.weights) - known)
    if unknown:
        raise InvalidParameter("lora", f"adapter {adapter.name!r} targets {unknown[0]}, which this model "
                                       f"does not serve adapters on (attention and MLP projections)")
    layers = []
    for layer, names, sizes in targets:
        parts = [adapter.weights.get(name) for name in names]
        for name, part, size in zip(names, parts, sizes):
            if part is not None and (part[0].shape[1] != layer.in_features or part[1].shape[0] != size):
                raise InvalidParameter("lora", f"adapter {adapter.name!r}: {name} has shapes "
                                               f"{tuple(part[0].shape)}/{tuple(part[1].shape)}, the model "
                                               f"takes [r, {layer.in_features}]/[{size}, r]")
        layers.append((layer, *fuse(parts, sizes, layer.in_features)))
    return layers
