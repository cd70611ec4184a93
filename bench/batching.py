"""Dynamic batching of one-shot models: 512 requests from 32 concurrent msgpack clients against
a served model, with the batch engine's dynamic batching and with batches of one, in one run.

    python bench/batching.py             # a conditional DCGAN (32x32 RGB) and a forecaster, random weights
    python bench/batching.py --quick

Prints throughput, p50/p99 latency and the mean batch fill ratio (mean batch / max batch size),
and the fill ratio under saturation: the same 512 requests from 128 clients, four times the max
batch, so a full batch can always be waiting; writes bench/results/batching.json.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_result  # noqa: E402
from pyserve.demo.data import seasonal_series  # noqa: E402
from tiny_models import make_forecaster, make_gan  # noqa: E402

from pyserve.client import AsyncClient  # noqa: E402
from pyserve.engine import EngineDriver, load_engine  # noqa: E402
from pyserve.server import start_in_thread  # noqa: E402



HISTORIES = seasonal_series(64, 32, seed=3)


def gan_inputs(i: int) -> dict:
    return {"seed": np.array([i], dtype=np.int64), "class_label": np.array([i % 10], dtype=np.int64)}


def forecaster_inputs(i: int) -> dict:
    return {"history": HISTORIES[i % len(HISTORIES)][None], "seed": np.array([i], dtype=np.int64)}


async def clients(port: int, inputs, num_clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []

    async def one(c: int):
        async with await AsyncClient.connect("127.0.0.1", port) as client:
            for i in range(per_client):
                start = time.perf_counter()
                await client.infer("model", inputs(c * per_client + i))
                latencies.append(time.perf_counter() - start)
    await asyncio.gather(*(one(c) for c in range(num_clients)))
    return latencies


def run(model_dir: Path, inputs, max_batch_size: int, num_clients: int, per_client: int) -> dict:
    engine = load_engine(model_dir, device="cpu", max_batch_size=max_batch_size, max_queue_delay_s=0.002)
    sizes: list[int] = []
    engine.step_observers.append(lambda requests, items: sizes.append(items))  # each batch's items
    server = start_in_thread({"model": EngineDriver(engine)})
    try:
        asyncio.run(clients(server.msgpack_port, inputs, 2, 4))  # warm-up
        sizes.clear()
        start = time.perf_counter()
        latencies = asyncio.run(clients(server.msgpack_port, inputs, num_clients, per_client))
        elapsed = time.perf_counter() - start
    finally:
        server.stop()
    latencies.sort()
    return {"max_batch_size": max_batch_size, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": 1e3 * latencies[len(latencies) // 2], "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
            "mean_batch": statistics.mean(sizes), "fill_ratio": statistics.mean(sizes) / max_batch_size,
            "batches": len(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    num_clients, per_client = (8, 8) if args.quick else (32, 16)
    result = {"clients": num_clients, "requests": num_clients * per_client, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"gan (conditional DCGAN, 32x32 RGB)": (make_gan(Path(tmp) / "gan", image_size=32, channels=3,
                                                                  base_channels=32), gan_inputs),
                  "forecaster (2-layer transformer, 8 paths x 6 steps)": (make_forecaster(Path(tmp) / "fc"),
                                                                          forecaster_inputs)}
        for name, (model_dir, inputs) in models.items():
            dynamic = run(model_dir, inputs, 32, num_clients, per_client)
            single = run(model_dir, inputs, 1, num_clients, per_client)
            saturated = run(model_dir, inputs, 32, 4 * num_clients, per_client // 4)
            result["models"][name] = {"dynamic": dynamic, "batch_size_1": single, "saturation": saturated,
                                      "throughput_ratio": dynamic["requests_per_s"] / single["requests_per_s"],
                                      "p99_ratio": single["p99_ms"] / dynamic["p99_ms"]}
    print(f"{result['requests']} requests from {num_clients} clients over msgpack")
    print(f"{'':<60}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}{'fill':>7}")
    for name, m in result["models"].items():
        for label, r in (("dynamic (max 32)", m["dynamic"]), ("batch size 1", m["batch_size_1"])):
            print(f"{name + ', ' + label:<60}{r['requests_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r['mean_batch']:>12.1f}{r['fill_ratio']:>7.0%}")
        print(f"  throughput {m['throughput_ratio']:.2f}x, p99 {m['p99_ratio']:.2f}x lower; under saturation "
              f"({4 * num_clients} clients) mean batch {m['saturation']['mean_batch']:.1f}, "
              f"fill {m['saturation']['fill_ratio']:.0%}")
    write_result("batching", result, args.quick)


if __name__ == "__main__":
    main()
