"""pyserve plugin for Llama-family checkpoints: Llama, Mistral (sliding window), Qwen2 (QKV bias)."""

from pathlib import Path

from pyserve.plugin import TEXT_GENERATION, Plugin
from pyserve.text_model import TextModel
from pyserve.weights import load_tensors

from . import gguf_file
from .model import LlamaForCausalLM


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def num_kv_heads(cfg: dict) -> int:
    return cfg.get("num_key_value_heads", cfg["num_attention_heads"])


class LlamaPlugin(Plugin):
    """Hugging Face directories, and llama.cpp GGUF files of the llama architecture."""

    name = "llama"
    task = TEXT_GENERATION
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def matches(self, model_dir, config: dict) -> bool:
        return config.get("gguf_architecture") == "llama" or super().matches(model_dir, config)

    def load(self, model_dir, *, device="cpu", dtype=None):
        if gguf_file.is_gguf(Path(model_dir)):
            return self.load_gguf(Path(model_dir), device=device, dtype=dtype)
        return TextModel.load(model_dir, LlamaForCausalLM, device=device, dtype=dtype, head_dim=head_dim,
                              num_kv_heads=num_kv_heads)

    def load_gguf(self, path: Path, *, device="cpu", dtype=None) -> TextModel:
        cfg, tensors, tokenizer_meta, weight_format, others = gguf_file.read(path)

        def fill(module, buffers):
            load_tensors(module, ((name, lambda t=t: t) for name, t in tensors.items()), path, optional=buffers,
                         packed=module.packed_modules_mapping)
        model = TextModel.assemble(cfg, LlamaForCausalLM, fill, gguf_file.tokenizer_from(tokenizer_meta), device=device,
                                   dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim)
        model.weight_format = weight_format  # Q8_0/Q4_0 files are packed again as w8a8/w4a8 by default
        # A matrix the file holds in another type (the Q6_K output layer of llama.cpp's Q4_0 files)
        # would lose precision packed as the rest: it stays unpacked.
        for name in others:
            owner = name.rsplit(".", 1)[0]
            if owner == "model.embed_tokens":  # a tied head reads it: the head stays unpacked
                model.module.keep_unpacked = True
            elif owner in {n for n, _ in model.module.named_modules()}:  # not q/k/v, gate/up: fused since
                model.module.get_submodule(owner).keep_unpacked = True
        return model


plugin = LlamaPlugin()
