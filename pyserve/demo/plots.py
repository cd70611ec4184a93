"""Small PNG figures drawn with Pillow (training curves, sample grids, forecasts), so training and
the README need no plotting library."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
MARGIN = (56, 44, 16, 36)  # left, top, right, bottom


def running_mean(values: list[float], window: int) -> np.ndarray:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[lo]) / (np.arange(1, len(values) + 1) - lo)


@dataclass
class Chart:
    """A line chart: add series (x and y lists) and optional shaded bands, then save."""

    title: str
    xlabel: str
    ylabel: str
    size: tuple[int, int] = (640, 360)
    series: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    bands: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def line(self, label: str, x, y) -> "Chart":
        self.series.append((label, np.asarray(x, float), np.asarray(y, float)))
        return self

    def band(self, label: str, x, low, high) -> "Chart":
        self.bands.append((label, np.asarray(x, float), np.asarray(low, float), np.asarray(high, float)))
        return self

    def save(self, path: Path) -> None:
        image = Image.new("RGB", self.size, "white")
        draw = ImageDraw.Draw(image)
        xs = np.concatenate([s[1] for s in self.series] + [b[1] for b in self.bands])
        ys = np.concatenate([s[2] for s in self.series] + [v for b in self.bands for v in b[2:]])
        ys = ys[np.isfinite(ys)]
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        pad = (y1 - y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
        left, top, right, bottom = MARGIN[0], MARGIN[1], self.size[0] - MARGIN[2], self.size[1] - MARGIN[3]

        def at(x, y):
            return (left + (x - x0) / ((x1 - x0) or 1) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

        draw.rectangle((left, top, right, bottom), outline="black")
        for frac in (0, 0.5, 1):
            y = y0 + frac * (y1 - y0)
            draw.text((4, at(x0, y)[1] - 6), f"{y:.3g}", fill="black")
            x = x0 + frac * (x1 - x0)
            draw.text((at(x, y0)[0] - 10, bottom + 4), f"{x:.4g}", fill="black")
        draw.text((left, 4), self.title, fill="black")
        draw.text(((left + right) // 2 - 20, self.size[1] - 16), self.xlabel, fill="black")
        draw.text((4, top - 16), self.ylabel, fill="black")
        legend = []
        for i, (label, x, low, high) in enumerate(self.bands):
            color = tuple(c // 2 + 127 for c in PALETTE[(i + len(self.series)) % len(PALETTE)])
            draw.polygon([at(a, b) for a, b in zip(x, high)] + [at(a, b) for a, b in zip(x[::-1], low[::-1])], fill=color)
            legend.append((label, color))
        for i, (label, x, y) in enumerate(self.series):
            color = PALETTE[i % len(PALETTE)]
            ok = np.isfinite(y)
            draw.line([at(a, b) for a, b in zip(x[ok], y[ok])], fill=color, width=2)
            legend.append((label, color))
        for i, (label, color) in enumerate(legend):
            draw.rectangle((right - 150, top + 8 + 14 * i, right - 140, top + 16 + 14 * i), fill=color)
            draw.text((right - 135, top + 5 + 14 * i), label, fill="black")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)


def image_grid(rows: list[list[np.ndarray]], path: Path, scale: int = 2, labels: list[str] | None = None) -> None:
    """A grid of uint8 images ([H, W] or [H, W, C]), one list per row, optional row labels."""
    tiles = [[Image.fromarray(np.squeeze(t)).convert("RGB") for t in row] for row in rows]
    h, w = tiles[0][0].height * scale, tiles[0][0].width * scale
    label_w = 110 if labels else 0
    grid = Image.new("RGB", (label_w + w * max(map(len, tiles)) + 2 * max(map(len, tiles)), (h + 2) * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(tiles):
        if labels:
            draw.text((4, r * (h + 2) + h // 2 - 6), labels[r], fill="black")
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.NEAREST), (label_w + c * (w + 2), r * (h + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
