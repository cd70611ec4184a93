"""BERT-family encoders over packed sequences: BERT, RoBERTa, XLM-RoBERTa and DistilBERT
checkpoints (Hugging Face directories), with sentence-transformers' modules on top (pooling,
Dense, Normalize) or a sequence-classification head (cross-encoders).

One forward runs every input of a step at once with no padding: embeddings, then per layer a
fused QKV product, `kernels.varlen_attention` (non-causal, each input attends within itself), the
output product and the post-norm residuals; then each input is pooled over its own tokens.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pyserve import kernels
from pyserve.tasks import EMBED, SCORE, EncoderSpec
from pyserve.tokenizer import Tokenizer

# sentence-transformers' pooling modes, in the order it concatenates them; its configs name them by
# these (pooling_mode: "mean", or a list) or, before version 6, by booleans pooling_mode_{key}_tokens
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
OLD_POOLING_KEYS = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens",
                    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "lasttoken": "lasttoken"}
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "silu": F.silu, "swish": F.silu}
# sentence-transformers Dense modules name their activation by its torch class
DENSE_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": torch.tanh, "torch.nn.modules.linear.Identity": lambda x: x,
                     "torch.nn.modules.activation.ReLU": F.relu, "torch.nn.modules.activation.GELU": F.gelu}


@dataclass
class Layer:
    qkv: torch.Tensor  # [3 x hidden, hidden]: query, key and value products in one
    qkv_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor]  # after attention (weight, bias)
    up: torch.Tensor
    up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor]  # after the MLP


@dataclass
class Head:
    """What turns the token states into the output: sentence-transformers pooling and modules, or
    a classification head over the first token."""

    pooling: tuple[str, ...] = ("cls_token",)
    dense: tuple[tuple[torch.Tensor, torch.Tensor | None, object], ...] = ()  # (weight, bias, activation)
    normalize: bool = False
    classifier: tuple[tuple[torch.Tensor, torch.Tensor, object], ...] = ()  # a scorer's layers, in order


class Encoder:
    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None):
        config = json.loads((model_dir / "config.json").read_text())
        self.family = config.get("model_type", "bert")
        self.device, self.dtype = torch.device(device), dtype or torch.float32
        tensors = _read_weights(model_dir)
        distil = self.family == "distilbert"
        self.hidden = config["dim"] if distil else config["hidden_size"]
        self.heads = config["n_heads"] if distil else config["num_attention_heads"]
        self.eps = 1e-12 if distil else config.get("layer_norm_eps", 1e-12)
        self.act = ACTIVATIONS[config.get("activation" if distil else "hidden_act", "gelu")]
        # RoBERTa counts positions from the padding id + 1
        self.position_offset = config.get("pad_token_id", 1) + 1 if self.family in ("roberta", "xlm-roberta") else 0
        prefix = _prefix(tensors)
        w = {k.removeprefix(prefix): v.to(self.device, self.dtype) for k, v in tensors.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w.get("embeddings.token_type_embeddings.weight")
        self.embed_norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = [_distil_layer(w, i) if distil else _bert_layer(w, i)
                       for i in range(config["n_layers"] if distil else config["num_hidden_layers"])]
        self.max_positions = self.position.shape[0] - self.position_offset
        self.head, kind, dimensions = _head(model_dir, config, tensors, self.hidden, self.device, self.dtype)
        # sentence-transformers truncates at max_seq_length (model_max_length since its version 6)
        limit = (_read_json(model_dir / "sentence_bert_config.json").get("max_seq_length")
                 or _read_json(model_dir / "tokenizer_config.json").get("model_max_length") or self.max_positions)
        max_len = min(self.max_positions, int(limit))
        st_config = _read_json(model_dir / "config_sentence_transformers.json")
        self.spec = EncoderSpec(kind, dimensions, max_len, self.head.normalize, self.device, self.dtype,
                                MappingProxyType(dict(st_config.get("prompts") or {})),
                                st_config.get("default_prompt_name"))
        self.tokenizer = Tokenizer.from_dir(model_dir)

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long()
        positions = torch.arange(input_ids.shape[0], device=self.device) - torch.repeat_interleave(starts, lengths)
        x = self.word[input_ids] + self.position[positions + self.position_offset]
        if self.token_type is not None:  # RoBERTa's table has one row: every token is of type 0
            pair = token_type_ids is not None and self.token_type.shape[0] > 1
            x = x + self.token_type[token_type_ids if pair else torch.zeros_like(input_ids)]
        x = F.layer_norm(x, (self.hidden,), *self.embed_norm, self.eps)
        head_dim = self.hidden // self.heads
        for layer in self.layers:
            q, k, v = F.linear(x, layer.qkv, layer.qkv_bias).view(-1, 3, self.heads, head_dim).unbind(1)
            attended = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen)
            x = F.layer_norm(x + F.linear(attended.reshape(-1, self.hidden), layer.out, layer.out_bias),
                             (self.hidden,), *layer.norm1, self.eps)
            mlp = F.linear(self.act(F.linear(x, layer.up, layer.up_bias)), layer.down, layer.down_bias)
            x = F.layer_norm(x + mlp, (self.hidden,), *layer.norm2, self.eps)
        return self._output(x.float(), starts, lengths)

    def _output(self, x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.head.classifier:
            y = x[starts].to(self.dtype)
            for weight, bias, activation in self.head.classifier:
                y = activation(F.linear(y, weight, bias))
            return y.float()
        pooled = [_pool(x, starts, lengths, mode) for mode in self.head.pooling]
        y = torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]
        for weight, bias, activation in self.head.dense:
            y = activation(F.linear(y, weight.float(), None if bias is None else bias.float()))
        return F.normalize(y, dim=-1) if self.head.normalize else y


def _pool(x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per input from its own tokens' states."""
    if mode == "cls":
        return x[starts]
    if mode == "lasttoken":
        return x[starts + lengths - 1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    if mode == "max":
        out = torch.full((len(lengths), x.shape[1]), float("-inf"), device=x.device)
        return out.scatter_reduce_(0, segment[:, None].expand_as(x), x, "amax")
    sums = torch.zeros(len(lengths), x.shape[1], device=x.device).index_add_(0, segment, x)
    if mode == "mean_sqrt_len_tokens":
        return sums / lengths.float().sqrt()[:, None]
    return sums / lengths.float()[:, None]


def _bert_layer(w: dict, i: int) -> Layer:
    p = f"encoder.layer.{i}."
    qkv = [w[f"{p}attention.self.{n}.weight"] for n in ("query", "key", "value")]
    qkv_bias = [w[f"{p}attention.self.{n}.bias"] for n in ("query", "key", "value")]
    return Layer(torch.cat(qkv), torch.cat(qkv_bias), w[f"{p}attention.output.dense.weight"],
                 w[f"{p}attention.output.dense.bias"],
                 (w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"]),
                 w[f"{p}intermediate.dense.weight"], w[f"{p}intermediate.dense.bias"], w[f"{p}output.dense.weight"],
                 w[f"{p}output.dense.bias"], (w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"]))


def _distil_layer(w: dict, i: int) -> Layer:
    p = f"transformer.layer.{i}."
    qkv = [w[f"{p}attention.{n}_lin.weight"] for n in ("q", "k", "v")]
    qkv_bias = [w[f"{p}attention.{n}_lin.bias"] for n in ("q", "k", "v")]
    return Layer(torch.cat(qkv), torch.cat(qkv_bias), w[f"{p}attention.out_lin.weight"], w[f"{p}attention.out_lin.bias"],
                 (w[f"{p}sa_layer_norm.weight"], w[f"{p}sa_layer_norm.bias"]), w[f"{p}ffn.lin1.weight"],
                 w[f"{p}ffn.lin1.bias"], w[f"{p}ffn.lin2.weight"], w[f"{p}ffn.lin2.bias"],
                 (w[f"{p}output_layer_norm.weight"], w[f"{p}output_layer_norm.bias"]))


def _head(model_dir: Path, config: dict, tensors: dict, hidden: int, device, dtype) -> tuple[Head, str, int]:
    """The output head, the model's kind (EMBED or SCORE) and its output size."""
    to = {"device": device, "dtype": dtype}
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures", [])):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
        if "classifier.out_proj.weight" in tensors:  # RoBERTa's head: dense + tanh + projection, on <s>
            layers = ((tensors["classifier.dense.weight"], tensors["classifier.dense.bias"], torch.tanh),
                      (tensors["classifier.out_proj.weight"], tensors["classifier.out_proj.bias"], _identity))
        elif "pre_classifier.weight" in tensors:  # DistilBERT's: pre-classifier + ReLU + classifier
            layers = ((tensors["pre_classifier.weight"], tensors["pre_classifier.bias"], F.relu),
                      (tensors["classifier.weight"], tensors["classifier.bias"], _identity))
        else:  # BERT's: the pooler (dense + tanh on [CLS]) + classifier
            prefix = _prefix(tensors)
            layers = ((tensors[f"{prefix}pooler.dense.weight"], tensors[f"{prefix}pooler.dense.bias"], torch.tanh),
                      (tensors["classifier.weight"], tensors["classifier.bias"], _identity))
        layers = tuple((w.to(**to), b.to(**to), act) for w, b, act in layers)
        return Head(classifier=layers), SCORE, labels
    modules = _read_json(model_dir / "modules.json", [])
    pooling, dense, normalize, size = ("mean",), [], False, hidden  # a bare encoder: mean, as sentence-transformers
    for module in modules:
        kind, path = module.get("type", ""), model_dir / module.get("path", "")
        if kind.endswith("Pooling"):
            pooling = _pooling_modes(model_dir, _read_json(path / "config.json"))
            size = hidden * len(pooling)
        elif kind.endswith("Dense"):
            cfg = _read_json(path / "config.json")
            weights = _read_weights(path)
            activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
            if activation not in DENSE_ACTIVATIONS:
                raise ValueError(f"{model_dir}: a Dense module's activation {activation} is not served")
            bias = weights.get("linear.bias")
            dense.append((weights["linear.weight"].to(device), None if bias is None else bias.to(device),
                          DENSE_ACTIVATIONS[activation]))
            size = cfg["out_features"]
        elif kind.endswith("Normalize"):
            normalize = True
    return Head(pooling=pooling, dense=tuple(dense), normalize=normalize), EMBED, size


def _pooling_modes(model_dir: Path, cfg: dict) -> tuple[str, ...]:
    if cfg.get("include_prompt") is False:
        raise ValueError(f"{model_dir}: pooling that leaves out the prompt's tokens is not served")
    named = cfg.get("pooling_mode")
    if named is not None:
        named = {named} if isinstance(named, str) else set(named)
    else:
        named = {mode for mode, key in OLD_POOLING_KEYS.items() if cfg.get(f"pooling_mode_{key}")}
        named |= {"weightedmean"} if cfg.get("pooling_mode_weightedmean_tokens") else set()
    unknown = named - set(POOLING_MODES)
    if unknown or not named:
        raise ValueError(f"{model_dir}: pooling {sorted(unknown) or 'none'} is not served "
                         f"(served: {', '.join(POOLING_MODES)})")
    return tuple(m for m in POOLING_MODES if m in named)


def _identity(x):
    return x


def _prefix(tensors: dict) -> str:
    """The base model's key prefix in a checkpoint of a head model ("bert.", "roberta.", ...)."""
    for key in tensors:
        if key.endswith("embeddings.word_embeddings.weight"):
            return key.removesuffix("embeddings.word_embeddings.weight")
    raise ValueError("not a BERT-family checkpoint: no embeddings.word_embeddings.weight")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model.bin weights")


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else ({} if default is None else default)

