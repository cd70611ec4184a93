"""A causal transformer forecaster over binned values, and the sampling loop that turns it into
forecasts: scale each history by its mean absolute value, bin it, and draw sample paths one step
at a time with the kernel core's sampler."""

import dataclasses
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pyserve import kernels
from pyserve.kernels import rng
from pyserve.errors import InvalidParameter
from pyserve.kernels.types import SamplingRow, SamplingTensors
from pyserve.tasks import DEFAULT_OPERATION, TensorModel, TensorSpec

class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = kernels.dense_attention(q, k, v, causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CausalForecaster(nn.Module):
    """Next-bin logits for every position of a token sequence (bins, plus one token for missing)."""

    def __init__(self, num_bins: int, context_length: int, d_model: int, num_layers: int, num_heads: int):
        super().__init__()
        self.num_bins = num_bins
        self.embed = nn.Embedding(num_bins + 1, d_model)
        self.position = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads) for _ in range(num_layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, num_bins)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Binning:
    """Mean-absolute scaling and uniform bins over [-bin_range, bin_range] of the scaled values."""

    def __init__(self, num_bins: int, bin_range: float):
        self.num_bins, self.range = num_bins, bin_range
        self.centers = torch.linspace(-bin_range, bin_range, num_bins)

    def scale(self, history: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(history)
        total = torch.where(known, history.abs(), 0).sum(-1)
        return (total / known.sum(-1).clamp_min(1)).clamp_min(1e-6)

    def tokens(self, history: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = (history / scale[:, None]).clamp(-self.range, self.range)
        ids = ((x + self.range) / (2 * self.range) * (self.num_bins - 1)).round().long()
        return torch.where(torch.isnan(history), self.num_bins, ids)  # num_bins: the missing token

    def values(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.centers.to(ids.device)[ids] * scale


def forecast(module: CausalForecaster, binning: Binning, history: torch.Tensor, seeds: torch.Tensor,
             horizon: int, num_samples: int, backend: str | None = None) -> torch.Tensor:
    """Sample paths [B, num_samples, horizon]; path p of item i draws step h from (seed_i + p*golden, h)."""
    b, context = history.shape
    scale = binning.scale(history)
    tokens = binning.tokens(history, scale).repeat_interleave(num_samples, dim=0)  # [B*S, context]
    rows = [SamplingRow(seed=rng.row_seed(int(s), p)) for s in seeds.tolist() for p in range(num_samples)]
    params = SamplingTensors.from_rows(rows, tokens.device)  # built once; only the step changes
    drawn = []
    for h in range(horizon):
        logits = module(tokens)[:, -1].float()
        params = dataclasses.replace(params, step=torch.full_like(params.step, h))
        step = kernels.sample(logits, params, backend=backend).tokens
        drawn.append(step)
        tokens = torch.cat([tokens[:, 1:], step[:, None]], dim=1)
    ids = torch.stack(drawn, dim=1)  # [B*S, horizon]
    return binning.values(ids, scale.repeat_interleave(num_samples)[:, None]).view(b, num_samples, horizon)


class ForecasterModel(TensorModel):
    """The `tensor` task protocol over a CausalForecaster."""

    def __init__(self, module: CausalForecaster, config: dict, device: str):
        self.module, self.device, self.config = module.eval(), device, config
        self.binning = Binning(config["num_bins"], config["bin_range"])
        self.horizon, self.num_samples = config["horizon"], config["num_samples"]
        self.quantile_levels = torch.tensor(config.get("quantiles", [0.1, 0.5, 0.9]))
        self.inputs = [TensorSpec("history", "float32", (config["context_length"],)), TensorSpec("seed", "int64", ())]
        q = len(self.quantile_levels)
        self.outputs = [TensorSpec("mean", "float32", (self.horizon,)),
                        TensorSpec("quantiles", "float32", (q, self.horizon)),
                        TensorSpec("samples", "float32", (self.num_samples, self.horizon))]
        self.batching = config.get("batching", {})
        self.max_batch_size = self.batching.get("max_batch_size", 32)

    @classmethod
    def load(cls, model_dir: Path, config: dict, device: str = "cpu") -> "ForecasterModel":
        module = CausalForecaster(config["num_bins"], config["context_length"], config["d_model"],
                                  config["num_layers"], config["num_heads"])
        module.load_state_dict(load_file(model_dir / "model.safetensors"))
        return cls(module.to(device), config, device)

    def check(self, inputs: dict[str, np.ndarray], operation: str = DEFAULT_OPERATION) -> None:
        history = inputs["history"]
        if np.isinf(history).any():
            raise InvalidParameter("history", "must be finite (NaN marks a missing value)")
        if np.isnan(history).all(axis=1).any():
            raise InvalidParameter("history", "needs at least one known value")

    def run(self, batch: dict[str, torch.Tensor], operation: str = DEFAULT_OPERATION) -> dict[str, torch.Tensor]:
        paths = forecast(self.module, self.binning, batch["history"].to(self.device), batch["seed"],
                         self.horizon, self.num_samples)
        quantiles = torch.quantile(paths, self.quantile_levels.to(paths.device), dim=1).transpose(0, 1)
        return {"mean": paths.mean(dim=1), "quantiles": quantiles.contiguous(), "samples": paths}

