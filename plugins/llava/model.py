"""LLaVA-style vision-language model: a CLIP vision tower, a two-layer projector, and the llama
plugin's language model, in one file. Parameter names follow Hugging Face checkpoints."""

import torch
import torch.nn.functional as F
from torch import nn

from pyserve import kernels
from pyserve.tasks import StepImages
from pyserve.text_model import TextModule
from pyserve_plugins.llama.model import LlamaForCausalLM

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, patch = cfg["hidden_size"], cfg["patch_size"]
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], hidden, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(hidden))
        self.position_embedding = nn.Embedding((cfg["image_size"] // patch) ** 2 + 1, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape

        def heads(t):
            return t.view(n, length, self.heads, hidden // self.heads).transpose(1, 2)

        out = kernels.dense_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, hidden))


class VisionLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden, cfg["intermediate_size"])
        self.mlp.fc2 = nn.Linear(cfg["intermediate_size"], hidden)
        self.act = ACTIVATIONS[cfg["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])  # (sic) the checkpoints' name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])  # unused by LLaVA

    def hidden_state(self, pixels: torch.Tensor, index: int) -> torch.Tensor:
        """Hidden state `index` of (embeddings, layer 1 output, ...), as transformers numbers them."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[:index]:
            x = layer(x)
        return x


class LlavaForConditionalGeneration(TextModule):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping  # the language model's
    fused_decode = True

    def __init__(self, cfg: dict, text_cfg: dict):
        super().__init__()
        vision = cfg["vision_config"]
        self.vision_tower = VisionTower(vision)
        layer = cfg["vision_feature_layer"]
        self.feature_index = layer if layer >= 0 else vision["num_hidden_layers"] + 1 + layer
        self.keep_cls = cfg["vision_feature_select_strategy"] == "full"
        bias = cfg["multimodal_projector_bias"]
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(vision["hidden_size"], text_cfg["hidden_size"], bias=bias)
        self.multi_modal_projector.linear_2 = nn.Linear(text_cfg["hidden_size"], text_cfg["hidden_size"], bias=bias)
        self.projector_act = ACTIVATIONS[cfg["projector_hidden_act"]]
        self.language_model = LlamaForCausalLM(text_cfg)

    def reset_buffers(self) -> None:
        self.language_model.reset_buffers()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> [N, tokens per image, text hidden]."""
        features = self.vision_tower.hidden_state(pixels, self.feature_index)
        if not self.keep_cls:
            features = features[:, 1:]
        projector = self.multi_modal_projector
        return projector.linear_2(self.projector_act(projector.linear_1(features)))

    def forward(self, input_ids, positions, meta, cache, images: StepImages | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, cache, images)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def decode(self, batch, cache) -> kernels.DecodeOutput | None:
        return self.language_model.decode(batch, cache)
