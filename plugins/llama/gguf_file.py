"""Llama-architecture models from llama.cpp's GGUF files: the config, tokenizer and chat template
from the file's metadata, the tensors (F32, F16, BF16, Q8_0, Q4_0, and whatever else the `gguf`
package can unpack, such as the Q6_K output layer llama.cpp's Q4_0 files keep) unpacked and
renamed to the Hugging Face layout the model loads.

llama.cpp's converter reorders the rows of the query and key projections (its rotary embedding
pairs neighbouring values, Hugging Face's pairs the two halves of a head); reading undoes that.
A file of Q8_0 or Q4_0 weights says so in `weight_format` (w8a8 or w4a8), and its weights are packed
again into pyserve's int8 or int4 layout, which hold the same values: the scale of each group of 32 is again
its largest magnitude over 127 (Q8_0) or its extreme over -8 (Q4_0), as llama.cpp chose it.
"""

from pathlib import Path

import numpy as np
import torch

NAMES = {  # GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# w8a8/w4a8: the values of int8/int4, multiplied as llama.cpp multiplies these files (inputs
# quantized to int8 on CPUs), which is also the faster of the two there
PACKED_FORMATS = {"Q8_0": "w8a8", "Q4_0": "w4a8"}


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _reader(path: Path):
    from gguf import GGUFReader  # the `gguf` extra, needed only for these files
    return GGUFReader(str(path))


def _field(reader, name: str, default=None):
    field = reader.fields.get(name)
    if field is None or not field.data:
        return default
    values = [field.parts[i] for i in field.data]
    if field.types[0].name == "STRING":
        return bytes(values[0]).decode("utf-8")
    if field.types[0].name == "ARRAY":
        if field.types[-1].name == "STRING":
            return [bytes(v).decode("utf-8", errors="replace") for v in values]
        return [v.tolist()[0] for v in values]
    return values[0].tolist()[0]


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for a query or key projection [heads * head_dim, hidden]."""
    rows, cols = weight.shape
    # llama.cpp stores each head's rows as (half, pair) interleaved: [h, d/2, 2]; ours are [h, 2, d/2].
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, str | None, list[str]]:
    """(config as Hugging Face names it, fp32 tensors by Hugging Face name, tokenizer metadata,
    the packed weight format most of the file's matrices hold or None, and the Hugging Face names
    of the matrices held in another type, which should stay unpacked)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not served by the llama plugin")

    def meta(key, default=None):
        return _field(reader, f"llama.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    heads, kv_heads = meta("attention.head_count"), meta("attention.head_count_kv", meta("attention.head_count"))
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": meta("embedding_length"),
           "intermediate_size": meta("feed_forward_length"), "num_hidden_layers": meta("block_count"),
           "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "max_position_embeddings": meta("context_length", 2048), "rope_theta": meta("rope.freq_base", 10000.0),
           "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-6), "vocab_size": meta("vocab_size", len(tokens)),
           "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    tensors, formats, kinds = {}, {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
        try:
            values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} is {kind}, which the gguf package cannot unpack") from None
        values = values.reshape(shape)
        stem, _, suffix = t.name.rpartition(".")
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            name = f"model.layers.{layer}.{NAMES[part]}.{suffix}"
            if part in ("attn_q", "attn_k"):
                values = unpermute(values, heads if part == "attn_q" else kv_heads)
        else:
            name = f"{TOP_NAMES[stem]}.{suffix}"
        tensors[name] = values
        if values.ndim == 2:
            formats[kind] = formats.get(kind, 0) + 1
            kinds[name] = kind
    tokenizer = {"model": _field(reader, "tokenizer.ggml.model"), "tokens": tokens,
                 "merges": _field(reader, "tokenizer.ggml.merges", []),
                 "scores": _field(reader, "tokenizer.ggml.scores", []) or [0.0] * len(tokens),
                 "token_type": _field(reader, "tokenizer.ggml.token_type", []) or [NORMAL] * len(tokens),
                 "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                 "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token", False),
                 "chat_template": _field(reader, "tokenizer.chat_template")}
    main = max(formats, key=formats.get) if formats else None  # llama.cpp keeps a few layers in other types
    others = [name for name, kind in kinds.items() if kind != main] if main in PACKED_FORMATS else []
    return cfg, tensors, tokenizer, PACKED_FORMATS.get(main), others


# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from(meta: dict):
    """A pyserve Tokenizer from GGUF tokenizer metadata: byte-level BPE (llama.cpp's "gpt2"
    model) or SentencePiece BPE with byte fallback (its "llama" model)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, processors

    from pyserve.tokenizer import Tokenizer

    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    if meta["model"] not in builders:
        raise ValueError(f"GGUF tokenizer model {meta['model']!r} is not supported yet "
                         f"(byte-level BPE 'gpt2' and SentencePiece 'llama' are)")
    backend: HFTokenizer = builders[meta["model"]](meta)
    types = meta["token_type"]
    backend.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(meta["tokens"], types)
                                if kind == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(meta["tokens"], types)
                        if kind == USER_DEFINED])
    bos = meta["tokens"][meta["bos_token_id"]] if meta["bos_token_id"] is not None else None
    eos = meta["tokens"][meta["eos_token_id"]] if meta["eos_token_id"] is not None else None
    if meta["add_bos_token"] and bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, meta["bos_token_id"])])
    return Tokenizer(backend, bos, eos, [meta["eos_token_id"]] if meta["eos_token_id"] is not None else [],
                     meta["chat_template"])


def _byte_level_bpe(meta: dict):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict):
    """SentencePiece BPE merges the adjacent pair whose merged piece scores highest; a BPE whose
    merge ranks follow those scores does the same. Spaces are U+2581 with one in front of the
    text; bytes without a piece fall back to their <0xXX> tokens."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    tokens, types, scores = meta["tokens"], meta["token_type"], meta["scores"]
    vocab = {token: i for i, token in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind == NORMAL}
    merges = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend
