"""The plugin API: how a model architecture joins pyserve without touching the core.

A plugin says which task it serves, which model directories it recognises and how to load one.
pyserve finds plugins through the entry-point group `pyserve.plugins` (how packages, including
the first-party ones in `plugins/`, register) and in plugin folders (`--plugin-dir` or the
PYSERVE_PLUGIN_PATH environment variable, `os.pathsep`-separated). A plugin that fails to import
is recorded with its error and skipped.

Example, a drop-in file `my_plugins/echo.py`:

    from pyserve.plugin import Plugin

    class EchoPlugin(Plugin):
        name = "echo"
        task = "tensor"
        architectures = ("EchoModel",)

        def load(self, model_dir, *, device="cpu", dtype=None):
            ...

    plugin = EchoPlugin()
"""

import importlib.util
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .tasks import EMBEDDING, IMAGE_GENERATION, TASKS, TENSOR, TEXT_GENERATION  # noqa: F401 - re-exported for plugins

ENTRY_POINT_GROUP = "pyserve.plugins"
PATH_ENV_VAR = "PYSERVE_PLUGIN_PATH"


class Plugin:
    """Base class of plugins; subclasses set the class attributes and implement `load`."""

    name: str = ""
    task: str = ""  # one of pyserve.tasks.TASKS
    architectures: tuple[str, ...] = ()  # values of config.json "architectures" this plugin serves

    def matches(self, model_dir: Path, config: dict) -> bool:
        """Whether this plugin serves the model in model_dir (config is its config.json, or {})."""
        explicit = config.get("pyserve", {}).get("plugin")
        if explicit is not None:
            return explicit == self.name
        return any(arch in self.architectures for arch in config.get("architectures", []))

    def load(self, model_dir: Path, *, device: str = "cpu", dtype: Any = None) -> Any:
        """Load the model; the object returned follows the protocol of `task` (see pyserve.tasks)."""
        raise NotImplementedError


@dataclass
class PluginInfo:
    plugin: Plugin
    source: str  # "entry point <name>" or the file it came from


@dataclass
class PluginFailure:
    source: str
    error: str


class ModelNotRecognised(LookupError):
    pass


@dataclass
class PluginRegistry:
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    @classmethod
    def discover(cls, plugin_dirs: list[str | Path] | None = None, *, use_entry_points: bool = True) -> "PluginRegistry":
        registry = cls()
        if use_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                registry._add_from(lambda ep=ep: ep.load(), f"entry point {ep.name} ({ep.value})")
        dirs = list(plugin_dirs or [])
        dirs += [d for d in os.environ.get(PATH_ENV_VAR, "").split(os.pathsep) if d]
        for folder in dirs:
            for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
                if path.suffix == ".py" or (path / "__init__.py").exists():
                    registry._add_from(lambda path=path: _import_file(path), str(path))
        return registry

    def _add_from(self, load, source: str) -> None:
        try:
            obj = load()
            found = _plugins_in(obj)
            if not found:
                raise TypeError("defines no Plugin (expected a `plugin` or `plugins` attribute or a Plugin)")
        except Exception:  # noqa: BLE001 - a broken plugin must not take the server down
            error = traceback.format_exc(limit=3).strip().splitlines()[-1]
            self.failures.append(PluginFailure(source, error))
            return
        for plugin in found:
            if any(p.plugin.name == plugin.name for p in self.plugins):
                self.failures.append(PluginFailure(source, f"duplicate plugin name {plugin.name!r}, skipped"))
                continue
            self.plugins.append(PluginInfo(plugin, source))

    def get(self, name: str) -> Plugin:
        for info in self.plugins:
            if info.plugin.name == name:
                return info.plugin
        raise KeyError(f"no plugin named {name!r}; discovered: {', '.join(self.names()) or 'none'}")

    def names(self) -> list[str]:
        return [info.plugin.name for info in self.plugins]

    def for_model(self, model_dir: str | Path) -> Plugin:
        """The plugin that serves model_dir, chosen from its config.json or model_index.json."""
        model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        for info in self.plugins:
            if info.plugin.matches(model_dir, config):
                return info.plugin
        looked_for = (f"architectures {config.get('architectures')}" if "architectures" in config
                      else f"diffusers class {config.get('_class_name')!r}" if "_class_name" in config
                      else f"GGUF architecture {config.get('gguf_architecture')!r}" if "gguf_architecture" in config
                      else "config.json 'architectures', model_index.json '_class_name' or a 'pyserve' field")
        raise ModelNotRecognised(f"no plugin serves {model_dir}: looked for {looked_for}; "
                                 f"plugins: {', '.join(self.names()) or 'none'}")


def read_model_config(model_dir: Path) -> dict:
    """config.json or model_index.json; for a llama.cpp GGUF file, its architecture."""
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        from gguf import GGUFReader  # the `gguf` extra
        field = GGUFReader(str(model_dir)).fields.get("general.architecture")
        return {"gguf_architecture": bytes(field.parts[field.data[0]]).decode() if field else None}
    for name in ("config.json", "model_index.json"):
        path = model_dir / name
        if path.exists():
            return json.loads(path.read_text())
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    return {}


def _import_file(path: Path) -> Any:
    module_name = f"pyserve_plugin_{path.stem}"
    target = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(module_name, target,
                                                  submodule_search_locations=[str(path)] if path.is_dir() else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _plugins_in(obj: Any) -> list[Plugin]:
    if isinstance(obj, Plugin):
        return [obj]
    if isinstance(obj, type) and issubclass(obj, Plugin):
        return [obj()]
    found = []
    for attr in ("plugin", "plugins"):
        value = getattr(obj, attr, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                found += _plugins_in(item)
    return found
