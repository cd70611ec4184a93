"""Plugin discovery: entry points, plugin folders, broken plugins, model recognition, the CLI."""

import json
import subprocess
import sys

import pytest

from pyserve.plugin import ModelNotRecognised, PluginRegistry

GOOD = '''
from pyserve.plugin import Plugin

class EchoPlugin(Plugin):
    name = "echo"
    task = "tensor"
    architectures = ("EchoModel",)

    def load(self, model_dir, *, device="cpu", dtype=None):
        return {"loaded": str(model_dir)}

plugin = EchoPlugin()
'''


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "echo.py").write_text(GOOD)
    (folder / "broken.py").write_text("import not_a_module_anywhere\n")
    (folder / "empty.py").write_text("x = 1\n")
    return folder


def test_first_party_plugins_register_through_entry_points():
    registry = PluginRegistry.discover()
    assert {"llama", "gpt2"} <= set(registry.names())
    sources = {info.plugin.name: info.source for info in registry.plugins}
    assert sources["llama"].startswith("entry point llama")


def test_folder_plugins_load_and_broken_ones_are_reported(plugin_dir, tmp_path, monkeypatch):
    registry = PluginRegistry.discover([plugin_dir])
    assert "echo" in registry.names() and "llama" in registry.names()
    failures = {f.source.split("/")[-1]: f.error for f in registry.failures}
    assert "ModuleNotFoundError" in failures["broken.py"] and "not_a_module_anywhere" in failures["broken.py"]
    assert "defines no Plugin" in failures["empty.py"]
    model = tmp_path / "echo-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["EchoModel"]}))
    assert registry.for_model(model).load(model) == {"loaded": str(model)}
    # The environment variable works like the flag.
    monkeypatch.setenv("PYSERVE_PLUGIN_PATH", str(plugin_dir))
    assert "echo" in PluginRegistry.discover().names()


def test_model_directories_pick_their_plugin_or_say_what_was_looked_for(tmp_path):
    registry = PluginRegistry.discover()
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "config.json").write_text(json.dumps({"architectures": ["Unknown"], "pyserve": {"plugin": "gpt2"}}))
    assert registry.for_model(explicit).name == "gpt2"
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["FancyNewLM"]}))
    with pytest.raises(ModelNotRecognised, match="FancyNewLM"):
        registry.for_model(unknown)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ModelNotRecognised, match="config.json 'architectures'"):
        registry.for_model(bare)


def test_cli_lists_plugins_and_failures(plugin_dir):
    out = subprocess.run([sys.executable, "-m", "pyserve.cli", "plugins", "--plugin-dir", str(plugin_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert "llama" in out and "LlamaForCausalLM" in out and "echo" in out
    assert "failed to load" in out and "broken.py" in out


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tiny_models import make_model
    model_dir = make_model(tmp_path / "m", "llama")
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.norm.weight"]
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.norm\.weight.*shape mismatches: "
                                         r"model\.layers\.0\.mlp\.up_proj\.weight"):
        PluginRegistry.discover().for_model(model_dir).load(model_dir)


def test_sharded_checkpoints_load(tmp_path):
    import transformers

    from pyserve import LLM, SamplingParams
    from tiny_models import load_reference, make_model
    single = make_model(tmp_path / "single", "llama")
    ref = load_reference(single)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((single / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    ids = [0, 5, 9, 40]
    a = LLM(single, device="cpu").generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    b = LLM(sharded, device="cpu").generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert a[0].token_ids == b[0].token_ids and isinstance(transformers.__version__, str)


def test_an_old_cuda_driver_is_named_not_crashed_on():
    from pyserve.kernels.cuda import driver_problem
    assert driver_problem(13000, 13000) is None and driver_problem(12080, 13010) is None
    assert "no CUDA driver" in driver_problem(13000, 0)
    message = driver_problem(13000, 12040)
    assert "built with CUDA 13.0" in message and "supports CUDA 12.4" in message
