"""Tiny checkpoints made on the spot: transformers model classes from small configs with random
weights, saved as Hugging Face directories, and a byte-level BPE tokenizer trained here."""

import json
from pathlib import Path

import torch

CORPUS = ["Once upon a time there was a tiny model.", "Hello world, hello pyserve!",
          "The quick brown fox jumps over the lazy dog.", "Ünïcödé text: café, naïve, 東京, emoji 🙂."] * 20
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tokenizer(out: Path, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_model(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny `arch` model (llama, mistral, qwen2, gpt2) with a tokenizer into out."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_size = len(vocab) + 3
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common, **overrides)
        cls = transformers.GPT2LMHeadModel
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **common)
        kw.update(overrides)
        cfg_cls, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger than default init so that greedy paths are not trivial
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    return out


def load_reference(model_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()
