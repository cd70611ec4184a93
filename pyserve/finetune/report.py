"""What a finished training run leaves for people: its loss curve as a PNG, its steps' metrics as
CSV (OpenAI's result file), and the evaluation (held-out loss before and after) as JSON."""

import csv
import io
import json
from pathlib import Path

from ..demo.plots import Chart
from .trainer import TrainingResult


def loss_chart(result: TrainingResult, path: Path, title: str = "fine-tuning") -> None:
    chart = Chart(f"{title}: loss by step", "step", "loss")
    if result.train_losses:
        chart.line("training", *zip(*result.train_losses))
    if result.valid_losses:
        chart.line("validation", *zip(*result.valid_losses))
    chart.save(path)


def metrics_csv(result: TrainingResult) -> bytes:
    valid = dict(result.valid_losses)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "train_loss", "valid_loss"])
    for step in sorted({s for s, _ in result.train_losses} | set(valid)):
        train = dict(result.train_losses).get(step)
        writer.writerow([step, "" if train is None else f"{train:.6f}",
                         "" if step not in valid else f"{valid[step]:.6f}"])
    return out.getvalue().encode()


def evaluation(result: TrainingResult) -> dict:
    return {"steps": result.steps, "trained_tokens": result.trained_tokens, "seconds": round(result.seconds, 3),
            "tokens_per_second": round(result.trained_tokens / result.seconds, 1) if result.seconds else None,
            "train_loss_first": result.train_losses[0][1] if result.train_losses else None,
            "train_loss_last": result.train_losses[-1][1] if result.train_losses else None,
            "valid_loss_before": result.valid_loss_before, "valid_loss_after": result.valid_loss_after,
            "stopped_early": result.stopped_early, "adapter_dir": result.adapter_dir}


def write_report(result: TrainingResult, out_dir: str | Path, title: str = "fine-tuning") -> dict[str, Path]:
    """loss.png, metrics.csv and eval.json in `out_dir`; their paths by name."""
    out_dir = Path(out_dir)
    paths = {"loss.png": out_dir / "loss.png", "metrics.csv": out_dir / "metrics.csv", "eval.json": out_dir / "eval.json"}
    loss_chart(result, paths["loss.png"], title)
    paths["metrics.csv"].write_bytes(metrics_csv(result))
    paths["eval.json"].write_text(json.dumps(evaluation(result), indent=1) + "\n")
    return paths
