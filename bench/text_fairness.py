"""Fairness of the LLM engine: latency of short completions (4 tokens) while one request with
n=128 and 500 tokens runs beside them, against their latency alone, in one run, on the demo chat
model (pydoc-chat) behind its engine driver, as the server runs it.

    python bench/text_fairness.py            # 12 short requests per phase
    python bench/text_fairness.py --quick    # 5

Writes bench/results/text-fairness.json: p50/p99 of each phase and their ratios.
"""

import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import latency_ratios, print_latency_ratios, quick_flag, write_result  # noqa: E402

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
    row = {**latency_ratios(alone, beside), "large_was_running_throughout": running}
    return row


def main() -> None:
    quick = quick_flag(__doc__)
    count = 5 if quick else 12
    row = asyncio.run(measure(count))
    print_latency_ratios(row, "4 tokens, alone", "beside n=128 x 500 tokens")
    print(f"(the large request was running throughout: {row['large_was_running_throughout']})")
    write_result("text-fairness", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(), "short_requests": count,
                                   **row}, quick=quick)


if __name__ == "__main__":
    main()
