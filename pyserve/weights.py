"""Loading safetensors checkpoints (single file or sharded) into a module, by parameter name."""

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from tqdm import tqdm


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def load_weights(module: torch.nn.Module, model_dir: Path, *, transform=None, optional: tuple[str, ...] = (),
                 ignore_prefixes: tuple[str, ...] = (), ignore_suffixes: tuple[str, ...] = (),
                 packed: Mapping[str, tuple[str, int]] = MappingProxyType({})) -> None:
    """Copy every tensor of the checkpoint into the parameter or buffer of the same name.

    `transform(name, tensor)` may rename or reshape a tensor (returns (name, tensor)). `packed`
    maps a checkpoint module name to (the fused module that holds it, its part there): the tensor
    goes into that part's rows of the `FusedLinear` (q_proj -> (qkv_proj, 0)). Missing
    parameters (other than `optional` ones; a fused one until every part is in), unknown tensors
    and shape mismatches raise one error that names them all.
    """
    handles = [safe_open(str(path), framework="pt", device="cpu") for path in checkpoint_files(model_dir)]
    named = ((name, lambda h=h, name=name: h.get_tensor(name)) for h in handles for name in h.keys())
    load_tensors(module, named, model_dir, transform=transform, optional=optional, ignore_prefixes=ignore_prefixes,
                 ignore_suffixes=ignore_suffixes, packed=packed)


def _into_part(module: torch.nn.Module, name: str, packed: Mapping[str, tuple[str, int]]):
    """(the fused parameter's name, the part's index, first row, row count) for a checkpoint
    name whose module `packed` maps and whose parent holds that fused module, else None (a
    vision tower's own q_proj stays as it is)."""
    pieces = name.split(".")
    if len(pieces) < 2 or pieces[-2] not in packed:
        return None
    *owner, leaf, kind = pieces
    fused, index = packed[leaf]
    try:
        target = module.get_submodule(".".join([*owner, fused]))
    except AttributeError:
        return None
    first, rows = target.rows(index)
    return ".".join([*owner, fused, kind]), index, first, rows


def load_tensors(module: torch.nn.Module, named, source: Path, *, transform=None, optional: tuple[str, ...] = (),
                 ignore_prefixes: tuple[str, ...] = (), ignore_suffixes: tuple[str, ...] = (),
                 packed: Mapping[str, tuple[str, int]] = MappingProxyType({})) -> None:
    """load_weights for tensors from anywhere: `named` yields (name, a function returning the tensor)."""
    params = dict(module.named_parameters()) | dict(module.named_buffers())
    parts_in: dict[str, set[int]] = {}  # fused parameters: the parts loaded so far
    seen, unexpected, mismatched = set(), [], []
    names = list(named)
    with torch.no_grad():
        for name, get in tqdm(names, desc=f"loading {source.name}", unit="tensor", leave=False):
            if name.startswith(ignore_prefixes) or name.endswith(ignore_suffixes):
                continue
            tensor = get()
            if transform is not None:
                name, tensor = transform(name, tensor)
            stored = name  # the checkpoint's name, which messages use
            part = _into_part(module, name, packed) if packed else None
            if part is not None:
                name, index, first, rows = part
                parts_in.setdefault(name, set()).add(index)
            target = params.get(name)
            if target is not None and part is not None:
                target = target.narrow(0, first, rows)
            if target is None:
                unexpected.append(stored)
            elif tuple(target.shape) != tuple(tensor.shape):
                mismatched.append(f"{stored}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
                seen.add(name)  # present, though wrong: reported as a mismatch only
            else:
                target.copy_(tensor.to(target.dtype))
                seen.add(name)
    for name, indices in parts_in.items():  # a fused parameter is in once all its parts are
        if len(indices) != len(module.get_submodule(name.rsplit(".", 1)[0]).parts):
            seen.discard(name)
    missing = [n for n in params if n not in seen and n not in optional]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + " | ".join(problems))
