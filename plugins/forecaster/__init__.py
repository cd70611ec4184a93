"""pyserve plugin for autoregressive time-series forecasters: a small causal transformer over
binned, mean-scaled values (the approach of tokenizing forecasters such as Chronos).

Directory format:
    config.json        {"architectures": ["CausalForecaster"], "context_length": 64, "horizon": 16,
                        "num_bins": 128, "bin_range": 5.0, "d_model": 64, "num_layers": 2,
                        "num_heads": 4, "num_samples": 32, "quantiles": [0.1, 0.5, 0.9],
                        "batching": {...} (optional)}
    model.safetensors  the state dict of plugins/forecaster/model.py's CausalForecaster

Inputs per item: `history` (float32 [context_length]; NaN marks missing values, e.g. left
padding) and `seed` (int64). Outputs: `mean` [horizon], `quantiles` [len(quantiles), horizon]
and `samples` [num_samples, horizon] (float32). Sample paths are drawn with pyserve's fused
sampler keyed by (seed, path, step), so a forecast never depends on its batch."""

from pathlib import Path

from pyserve.plugin import TENSOR, Plugin, read_model_config


class ForecasterPlugin(Plugin):
    name = "forecaster"
    task = TENSOR
    architectures = ("CausalForecaster",)

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .model import ForecasterModel
        return ForecasterModel.load(Path(model_dir), read_model_config(Path(model_dir)), device=device)


plugin = ForecasterPlugin()
