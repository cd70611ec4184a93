"""Fairness of the diffusion engine: latency of small image requests while one request of the
largest cost the model admits runs beside them, against their latency alone, in one run.

    python bench/image_fairness.py           # 16 small requests per phase
    python bench/image_fairness.py --quick   # 6

The model is a Stable-Diffusion-style pipeline with random weights made for 64x64 images. Small
requests are 64x64, 4 steps, one at a time from one client; the large one is 128x128 at 50
steps (4x the native pixels at 50 steps: the default `max_image_cost`). The engine runs on its
driver thread as in the server. Writes bench/results/image-fairness.json with p50/p99 of each
phase and their ratios (the target: p99 beside the large request <= 3x p99 alone).
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import latency_ratios, print_latency_ratios, quick_flag, write_result  # noqa: E402
from tiny_models import make_sd_pipeline  # noqa: E402

from pyserve.engine import load_engine  # noqa: E402
from pyserve.engine.diffusion import ImageRequest  # noqa: E402
from pyserve.engine.driver import EngineDriver  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402

SMALL = dict(prompt="a small red fox", num_inference_steps=4, height=64, width=64)
LARGE = dict(prompt="a wide mountain valley", num_inference_steps=50, height=128, width=128)


async def finish(driver: EngineDriver, request_id: str, request: ImageRequest) -> float:
    start = time.perf_counter()
    async for out in driver.submit(request_id, request):
        if out.error:
            raise RuntimeError(out.error)
    return time.perf_counter() - start


async def small_latencies(driver: EngineDriver, count: int, tag: str) -> list[float]:
    return [await finish(driver, f"{tag}{i}", ImageRequest(seed=i, **SMALL)) for i in range(count)]


async def measure(model_dir: Path, count: int) -> dict:
    driver = EngineDriver(load_engine(model_dir, device="cpu"))
    try:
        await small_latencies(driver, 2, "warm")  # traces for the small latent size
        await finish(driver, "warm-large", ImageRequest(seed=0, **{**LARGE, "num_inference_steps": 1}))
        alone = await small_latencies(driver, count, "alone")
        large = asyncio.create_task(finish(driver, "large", ImageRequest(seed=1, **LARGE)))
        await asyncio.sleep(1.0)  # the large request is in its loop
        beside = await small_latencies(driver, count, "beside")
        large_running = not large.done()
        large.cancel()  # its client leaves: the engine drops it (its own time is not measured here)
    finally:
        driver.shutdown()
    return {**latency_ratios(alone, beside), "large_was_running_throughout": large_running}


def main() -> None:
    quick = quick_flag(__doc__)
    count = 6 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_sd_pipeline(Path(tmp) / "sd64", sample_size=32)  # 32x32 latents: 64x64 images
        row = asyncio.run(measure(model_dir, count))
    print_latency_ratios(row, "64x64, 4 steps, alone", "beside a 128x128x50 request")
    print(f"(target p99 ratio <= 3x; the large request was running throughout: {row['large_was_running_throughout']})")
    write_result("image-fairness", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(), "small_requests": count,
                                    "small": SMALL, "large": LARGE, **row}, quick=quick)


if __name__ == "__main__":
    main()
