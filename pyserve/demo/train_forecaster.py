"""Train the demo forecaster on synthetic seasonal series.

    python -m pyserve.demo.train_forecaster [--out pyserve/demo/models/seasonal-forecaster]

The `forecaster` plugin's CausalForecaster learns next-bin prediction over windows of synthetic
monthly-like series (level, trend, a 12-step season, noise; pyserve.demo.data.seasonal_series),
each window scaled as the plugin scales a request's history. Held-out series are forecast with
the plugin's own sampling loop; the script reports MASE of the median forecast against the
seasonal-naive forecast (< 1 beats it), and writes the checkpoint in the plugin's format,
`training.png` and `forecast.png` (a held-out series with its 10-90% band).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pyserve_plugins.forecaster.model import Binning, CausalForecaster

from ..engine import load_engine, run_engine
from ..engine.batch import TensorRequest

from .data import seasonal_series
from .plots import Chart, running_mean
from .quality import mase, seasonal_naive

DEFAULT_OUT = Path(__file__).parent / "models" / "seasonal-forecaster"
PERIOD = 12
CONFIG = {"architectures": ["CausalForecaster"], "context_length": 48, "horizon": 12, "num_bins": 256,
          "bin_range": 3.0, "d_model": 128, "num_layers": 3, "num_heads": 4, "num_samples": 32,
          "quantiles": [0.1, 0.5, 0.9], "batching": {"max_batch_size": 32, "max_queue_delay_s": 0.002}}


def evaluate(model_dir: Path, series: np.ndarray) -> dict:
    """MASE of the served model's median forecast (through pyserve's engine) and of seasonal-naive
    on each series' last horizon, with what a plot needs."""
    config = json.loads((model_dir / "config.json").read_text())
    context, horizon = config["context_length"], config["horizon"]
    history, actual = series[:, -horizon - context: -horizon], series[:, -horizon:]
    request = TensorRequest({"history": np.ascontiguousarray(history), "seed": np.arange(len(series))})
    quantiles = run_engine(load_engine(model_dir, device="cpu"), {"f": request})["f"].outputs["quantiles"]
    return {"mase_model": mase(quantiles[:, 1], actual, history, PERIOD),
            "mase_seasonal_naive": mase(seasonal_naive(history, horizon, PERIOD), actual, history, PERIOD),
            "history": history, "actual": actual, "quantiles": quantiles}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    c = CONFIG
    train = torch.from_numpy(seasonal_series(4000, 120, PERIOD, seed=args.seed))
    module = CausalForecaster(c["num_bins"], c["context_length"], c["d_model"], c["num_layers"], c["num_heads"])
    binning = Binning(c["num_bins"], c["bin_range"])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps)
    curve = []
    for step in range(args.steps):
        rows = torch.randint(0, len(train), (128,))
        starts = torch.randint(c["horizon"], train.shape[1] - c["context_length"], (128,))
        windows = torch.stack([train[r, s: s + c["context_length"] + 1] for r, s in zip(rows, starts)])
        # Scaled as the plugin scales them: by the history the forecast started from, which is
        # the window itself only at the first step; h steps in, the window has slid h values past
        # it. (Scaling every window by itself teaches the model that a window's scaled mean is 1,
        # and its forecasts then lag any trend.)
        shifts = torch.randint(0, c["horizon"], (128,))
        history = torch.stack([train[r, s - h: s - h + c["context_length"]] for r, s, h in zip(rows, starts, shifts)])
        tokens = binning.tokens(windows, binning.scale(history))
        logits = module(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            print(f"{time.perf_counter() - started:5.0f} s  step {step:5d}  loss {np.mean(curve[-100:]):.3f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(module.eval().state_dict(), args.out / "model.safetensors")
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    held_out = seasonal_series(100, c["context_length"] + c["horizon"], PERIOD, seed=args.seed + 1)
    scores = evaluate(args.out, held_out)
    Chart("seasonal-forecaster training", "step", "cross-entropy over bins").line(
        "train (100-step mean)", range(len(curve)), running_mean(curve, 100)).save(args.out / "training.png")
    plot_forecast(scores, args.out / "forecast.png")
    result = {"steps": args.steps, "mase_model": scores["mase_model"],
              "mase_seasonal_naive": scores["mase_seasonal_naive"], "seconds": time.perf_counter() - started}
    (args.out / "training.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def plot_forecast(scores: dict, path: Path, row: int = 0) -> None:
    """One series of `evaluate`'s scores: its history, what came next, the median and 10-90% band."""
    history, actual, q = scores["history"][row], scores["actual"][row], scores["quantiles"][row]
    past, future = np.arange(len(history)), np.arange(len(history), len(history) + len(actual))
    Chart("seasonal-forecaster: a held-out series", "time step", "value").line(
        "history", past, history).line("actual", future, actual).line("median forecast", future, q[1]).band(
        "10-90% band", future, q[0], q[2]).save(path)


if __name__ == "__main__":
    main()
