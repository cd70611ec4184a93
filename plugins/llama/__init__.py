"""pyserve plugin for Llama-family checkpoints: Llama, Mistral (sliding window), Qwen2 (QKV bias)."""

from pyserve.plugin import TEXT_GENERATION, Plugin
from pyserve.text_model import TextModel

from .model import LlamaForCausalLM


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


class LlamaPlugin(Plugin):
    name = "llama"
    task = TEXT_GENERATION
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def load(self, model_dir, *, device="cpu", dtype=None):
        def build(cfg: dict) -> LlamaForCausalLM:
            if "Qwen2ForCausalLM" in cfg.get("architectures", []):
                cfg = {**cfg, "_qkv_bias": True}
            return LlamaForCausalLM(cfg)

        return TextModel.load(model_dir, build, device=device, dtype=dtype, head_dim=_head_dim,
                              num_kv_heads=lambda c: c.get("num_key_value_heads", c["num_attention_heads"]))


plugin = LlamaPlugin()
