"""Tiny checkpoints made on the spot: transformers model classes from small configs with random
weights, saved as Hugging Face directories, and a byte-level BPE tokenizer trained here."""

import json
from pathlib import Path

import torch

from pyserve.demo.train_digits import write_char_clip_tokenizer

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
    return save_sharpened(cls(cfg).eval(), out)


def save_sharpened(model, out: Path) -> Path:
    """Save a transformers model whose matrices are scaled up from the default init, so that greedy
    paths are not trivial, with a generation config naming its BOS and EOS."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    return out


def load_reference(model_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def make_sd_pipeline(out: Path, seed: int = 0, prediction_type: str = "epsilon",
                     scheduler: str = "DDIMScheduler", sample_size: int = 8) -> Path:
    """A tiny Stable-Diffusion-style pipeline (CLIP text encoder, conditional UNet, KL VAE) with
    random weights, saved in diffusers format."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=sample_size * 2)
    write_char_clip_tokenizer(out / "tokenizer-files")
    tokenizer = transformers.CLIPTokenizer(str(out / "tokenizer-files" / "vocab.json"),
                                           str(out / "tokenizer-files" / "merges.txt"), model_max_length=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    schedule = getattr(diffusers, scheduler)(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, timestep_spacing="linspace", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False) if scheduler != "DPMSolverMultistepScheduler" else diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, timestep_spacing="linspace", steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=schedule, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def make_vae(out: Path, seed: int = 0, sample_size: int = 16) -> Path:
    """A tiny AutoencoderKL (factor 4, 4 latent channels, a mid-block attention) with random weights."""
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=sample_size)
    vae.save_pretrained(out)
    return out


def make_ddpm_pipeline(out: Path, seed: int = 0, sample_size: int = 16) -> Path:
    """A tiny unconditional pixel-space pipeline (UNet2DModel + DDPMScheduler), diffusers format."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    schedule = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=schedule).save_pretrained(out)
    return out


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_gan(out: Path, seed: int = 0, num_classes: int = 10, image_size: int = 16, channels: int = 1,
             base_channels: int = 8) -> Path:
    """A tiny DCGAN generator with random weights in pyserve's documented GAN directory format."""
    import sys
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from plugins.gan.model import DCGANGenerator

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = {"architectures": ["DCGANGenerator"], "latent_dim": 16, "image_size": image_size,
              "channels": channels, "base_channels": base_channels, "num_classes": num_classes,
              "class_names": DIGITS[:num_classes], "batching": {"max_batch_size": 16, "max_queue_delay_s": 0.005}}
    module = DCGANGenerator(16, image_size, channels, base_channels, num_classes)
    for m in module.modules():  # non-trivial running statistics, so eval mode is really tested
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    save_file(module.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


def make_forecaster(out: Path, seed: int = 0, context_length: int = 32, horizon: int = 6) -> Path:
    """A tiny causal-transformer forecaster with random weights in the plugin's directory format."""
    import sys
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from plugins.forecaster.model import CausalForecaster

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = {"architectures": ["CausalForecaster"], "context_length": context_length, "horizon": horizon,
              "num_bins": 64, "bin_range": 4.0, "d_model": 32, "num_layers": 2, "num_heads": 4,
              "num_samples": 8, "quantiles": [0.1, 0.5, 0.9], "batching": {"max_batch_size": 16}}
    module = CausalForecaster(64, context_length, 32, 2, 4)
    save_file(module.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


LLAVA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}"
                  "{{ m['content'] }}{% else %}{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>"
                  "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_llava_tokenizer(out: Path):
    """The tiny BPE tokenizer with an <image> token and a chat template with image parts; returns it."""
    from tokenizers import AddedToken, Tokenizer

    train_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": LLAVA_TEMPLATE}))
    return tok


def make_llava(out: Path, seed: int = 0, feature_layer: int = -2, strategy: str = "default") -> Path:
    """A tiny LLaVA (CLIP vision tower 30x30 pixels in 6x6 patches, projector, Llama) with a
    tokenizer that knows <image>, a chat template with image parts, and a CLIP processor config."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = write_llava_tokenizer(out)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=30, patch_size=6)
    text = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 2, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                                   image_seq_length=25 + (strategy == "full"), vision_feature_layer=feature_layer,
                                   vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    save_sharpened(transformers.LlavaForConditionalGeneration(cfg).eval(), out)
    transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(out)
    return out


def write_wordpiece_tokenizer(out: Path) -> None:
    """A BERT WordPiece tokenizer over the corpus's words and characters: [CLS] A [SEP] (B [SEP])."""
    from transformers import BertTokenizerFast

    words = sorted({w.strip(".,!:").lower() for line in CORPUS for w in line.split()} - {""})
    chars = sorted({c.lower() for line in CORPUS for c in line if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words, *(f"##{c}" for c in chars)]
    vocab = list(dict.fromkeys(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(out / "vocab.txt")).save_pretrained(str(out))


ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")


def make_encoder(out: Path, family: str = "bert", seed: int = 0, scorer: bool = False) -> Path:
    """A tiny BERT-family checkpoint (the bare model, or a one-label sequence classifier: a
    cross-encoder) with a WordPiece tokenizer; padding id 0, so RoBERTa positions start at 1."""
    import transformers

    write_wordpiece_tokenizer(out)
    vocab = len((out / "vocab.txt").read_text().split())
    torch.manual_seed(seed)
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                               max_position_embeddings=128, pad_token_id=0, num_labels=1)
    else:
        name = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[family]
        config = getattr(transformers, f"{name}Config")(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=128,
                                                        max_position_embeddings=130, pad_token_id=0, num_labels=1,
                                                        type_vocab_size=2 if family == "bert" else 1)
    prefix = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert"}[family]
    model = getattr(transformers, f"{prefix}{'ForSequenceClassification' if scorer else 'Model'}")(config).eval()
    with torch.no_grad():  # larger than the init's, so tokens and pairs make visibly different outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


def make_sentence_transformer(out: Path, family: str = "bert", pooling: str = "mean", dense: int = 0,
                              normalize: bool = True, seed: int = 0, prompts: dict | None = None) -> Path:
    """A sentence-transformers directory over a tiny encoder: Pooling, optional Dense and Normalize."""
    from sentence_transformers import SentenceTransformer, models

    base = make_encoder(out.parent / f"{out.name}-base", family, seed)
    transformer = models.Transformer(str(base), max_seq_length=120)
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        torch.manual_seed(seed + 1)
        modules.append(models.Dense(modules[-1].get_embedding_dimension(), dense))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu").save(str(out))
    return out
