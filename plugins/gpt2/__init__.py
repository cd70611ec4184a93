"""pyserve plugin for GPT-2 checkpoints (GPT2LMHeadModel)."""

from pyserve.plugin import TEXT_GENERATION, Plugin
from pyserve.text_model import TextModel

from .model import GPT2LMHeadModel


def _checkpoint_name(name, tensor):
    # Some exports omit the "transformer." prefix; the lm_head is tied to the embedding.
    if not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name
    return name, tensor


class GPT2Plugin(Plugin):
    name = "gpt2"
    task = TEXT_GENERATION
    architectures = ("GPT2LMHeadModel",)

    def load(self, model_dir, *, device="cpu", dtype=None):
        return TextModel.load(model_dir, GPT2LMHeadModel, device=device, dtype=dtype,
                              num_kv_heads=lambda c: c["n_head"], head_dim=lambda c: c["n_embd"] // c["n_head"],
                              transform=_checkpoint_name, ignore_prefixes=("lm_head.",),
                              ignore_suffixes=(".attn.bias", ".attn.masked_bias"))


plugin = GPT2Plugin()
