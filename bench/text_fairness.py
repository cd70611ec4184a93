"""Fairness of the LLM engine: latency of short completions (4 tokens) while one request with
n=128 and 500 tokens runs beside them, against their latency alone, in one run, on the demo chat
model (pydoc-chat) behind its engine driver, as the server runs it.

    python bench/text_fairness.py            # 12 short requests per phase
    python bench/text_fairness.py --quick    # 5

Writes bench/results/text-fairness.json: p50/p99 of each phase and their ratios.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_result  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.demo import demo_model_dirs  # noqa: E402
from pyserve.engine.llm import AsyncLLMEngine  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402

SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
LARGE = SamplingParams(max_tokens=500, n=128, temperature=1.0, seed=1, ignore_eos=True)


async def latency(engine: AsyncLLMEngine, prompt: str, params: SamplingParams) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params):
        pass
    return time.perf_counter() - start


async def measure(count: int) -> dict:
    engine = AsyncLLMEngine(LLM(demo_model_dirs()["pydoc-chat"], device="cpu").engine)
    try:
        await latency(engine, "warm up", SHORT)
        alone = [await latency(engine, f"The os module {i}", SHORT) for i in range(count)]
        large = asyncio.create_task(latency(engine, "Tell me about json.dumps.", LARGE))
        await asyncio.sleep(1.0)  # its 128 sequences are running
        beside = [await latency(engine, f"The os module {i}", SHORT) for i in range(count)]
        running = not large.done()
        large.cancel()
    finally:
        engine.shutdown()
    p99 = lambda xs: sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]  # noqa: E731
    row = {"short_p50_alone_s": statistics.median(alone), "short_p99_alone_s": p99(alone),
           "short_p50_beside_s": statistics.median(beside), "short_p99_beside_s": p99(beside),
           "large_was_running_throughout": running}
    row["p99_ratio"] = row["short_p99_beside_s"] / row["short_p99_alone_s"]
    row["p50_ratio"] = row["short_p50_beside_s"] / row["short_p50_alone_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 5 if args.quick else 12
    row = asyncio.run(measure(count))
    print(f"{'phase':<34}{'p50 s':>10}{'p99 s':>10}")
    print(f"{'4 tokens, alone':<34}{row['short_p50_alone_s']:>10.3f}{row['short_p99_alone_s']:>10.3f}")
    print(f"{'beside n=128 x 500 tokens':<34}{row['short_p50_beside_s']:>10.3f}{row['short_p99_beside_s']:>10.3f}")
    print(f"p99 ratio {row['p99_ratio']:.2f}x, p50 ratio {row['p50_ratio']:.2f}x; the large request was running "
          f"throughout: {row['large_was_running_throughout']}")
    write_result("text-fairness", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(), "short_requests": count,
                                   **row}, quick=args.quick)


if __name__ == "__main__":
    main()
