"""The package's shape: arrows point down only (no layer imports one above it), and the public
API that users and plugin authors import (docs/architecture.md) keeps its names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyserve"

# A layer may import itself and the layers listed after it, never one before it.
# llm: the offline API over the engines; store: the data directory the server keeps its records in;
# finetune: training adapters for the served text models
LAYERS = ["server", "store", "finetune", "llm", "engine", "plugin", "kernels"]
PLACE = {"server": "server", "store": "store", "finetune": "finetune", "engine": "engine", "llm": "llm",
         "ray": "server", "cli": "server",
         "plugin": "plugin", "tasks": "plugin", "text_model": "plugin", "nn": "plugin", "weights": "plugin",
         "tokenizer": "plugin", "lora": "plugin", "parallel": "plugin", "kernels": "kernels"}


def layer_of(module: str) -> str | None:
    """The layer of a pyserve module named from the package root (e.g. 'engine.llm.runner')."""
    return PLACE.get(module.split(".")[0])


def imports_of(path: Path) -> set[str]:
    """pyserve modules a file imports, at any depth of the file (lazy imports count too)."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(here[:-1])[:len(here) - node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("pyserve."):
                found.add(node.module.removeprefix("pyserve."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pyserve.") for a in node.names if a.name.startswith("pyserve.")}
    return {m for m in found if m}


def test_no_layer_imports_one_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        mine = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if mine is None:
            continue
        for module in imports_of(path):
            theirs = layer_of(module)
            if theirs is not None and LAYERS.index(theirs) < LAYERS.index(mine):
                upward.append(f"{path.relative_to(PACKAGE)} ({mine}) imports {module} ({theirs})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module, names", [
    ("pyserve", ["LLM", "SamplingParams"]),
    ("pyserve.plugin", ["Plugin", "PluginRegistry", "TEXT_GENERATION", "IMAGE_GENERATION", "TENSOR"]),
    ("pyserve.tasks", ["TASKS", "TensorModel", "TensorSpec", "Operation", "TextGenerationModel",
                       "ImageGenerationModel"]),
    ("pyserve.text_model", ["TextModule", "TextModel"]),
    ("pyserve.nn", ["Linear", "FusedLinear"]),
    ("pyserve.client", ["Client", "AsyncClient"]),
    ("pyserve.protocol", ["tensor_from_wire", "tensor_to_wire"]),
    ("pyserve.engine.diffusion", ["initial_noise"]),
])
def test_the_public_api_keeps_its_names(module, names):
    import importlib
    loaded = importlib.import_module(module)
    assert [n for n in names if not hasattr(loaded, n)] == []
