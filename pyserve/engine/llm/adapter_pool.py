"""LoRA adapters by name: every loaded adapter in host memory, a fixed number of them in the
model's layers (slots), the least recently used idle one making room for the next.

The scheduler lets at most `slots` distinct adapters run at once, so a step's adapters always
fit; those of waiting requests come in when their requests do.

    pool = AdapterPool(model, slots=32)
    pool.load("sql", "adapters/sql")      # validated now; placed when a request needs it
    slots = pool.place({pool.id("sql")})  # adapter id -> slot, for the step about to run
"""

import logging
from pathlib import Path
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ...errors import InvalidParameter, NotFound
from ...lora import LoraAdapter

log = logging.getLogger("pyserve.engine")


@dataclass
class _Loaded:
    id: int  # unique per load: a name loaded again is another adapter (and prefix-cache key)
    scale: float
    layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]  # (layer, A, B) in the model's layout


class AdapterPool:
    def __init__(self, model, slots: int):
        if slots < 1:
            raise ValueError(f"max_loras must be >= 1, got {slots}")
        self.model, self.slots = model, slots
        self.loaded: dict[str, _Loaded] = {}
        self.resident: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._loads = 0
        self.swaps = 0  # adapters copied into a slot (first placements included)

    def __contains__(self, name: str) -> bool:
        return name in self.loaded

    def id(self, name: str) -> int:
        if name not in self.loaded:
            raise NotFound(f"no LoRA adapter named {name!r} is loaded", "lora")
        return self.loaded[name].id

    def cache_key(self, name: str | None) -> str:
        """What the prefix cache roots this adapter's blocks in ('' for the base model)."""
        return "" if name is None else f"lora:{name}:{self.id(name)}"

    def load(self, name: str, source: "LoraAdapter | str | Path") -> None:
        """Take a PEFT adapter (read already, or read here from its directory) and check it;
        InvalidParameter if it does not fit the model."""
        if name in self.loaded:
            raise InvalidParameter("lora", f"an adapter named {name!r} is already loaded")
        adapter = source if isinstance(source, LoraAdapter) else LoraAdapter.load(name, source)
        layers = self.model.adapter_layers(adapter)  # the plugin's mapping; raises on a mismatch
        self._loads += 1
        self.loaded[name] = _Loaded(self._loads, adapter.scale, layers)
        log.info("LoRA adapter %s loaded (%d layers)", name, len(layers))

    def unload(self, name: str, in_use: set[int] = frozenset()) -> None:
        """Forget an adapter; refused while it is in `in_use` (adapter ids of running requests)."""
        if name not in self.loaded:
            raise NotFound(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        if self.loaded[name].id in in_use:
            raise InvalidParameter("lora_name", f"adapter {name!r} is in use by running requests")
        loaded = self.loaded.pop(name)
        slot = self.resident.pop(loaded.id, None)
        if slot is not None:  # no row will name the slot again; its rank 0 keeps it inert regardless
            for layer, a, b in loaded.layers:
                layer.put_adapter(slot, a[:0], b[:, :0], 0.0)
        log.info("LoRA adapter %s unloaded", name)

    def place(self, ids: set[int]) -> dict[int, int]:
        """Make the adapters `ids` resident (evicting the least recently used others) and return
        each one's slot."""
        if len(ids) > self.slots:
            raise RuntimeError(f"a step needs {len(ids)} adapters, the pool holds {self.slots}")
        for adapter_id in ids:
            if adapter_id in self.resident:
                self.resident.move_to_end(adapter_id)
        missing = ids - set(self.resident)
        by_id = {loaded.id: loaded for loaded in self.loaded.values()} if missing else {}
        for adapter_id in missing:
            if len(self.resident) < self.slots:
                slot = min(set(range(self.slots)) - set(self.resident.values()))
            else:
                victim = next(i for i in self.resident if i not in ids)
                slot = self.resident.pop(victim)
            loaded = by_id[adapter_id]
            for layer, a, b in loaded.layers:
                layer.put_adapter(slot, a, b, loaded.scale)
            self.resident[adapter_id] = slot
            self.swaps += 1
        return {adapter_id: self.resident[adapter_id] for adapter_id in ids}
