"""Fairness of the LLM engine: latency of short completions (4 tokens) while one request with
n=128 and 500 tokens runs beside them, against their latency alone, in one run, on the demo chat
model (pydoc-chat): at the engine driver (the engine's own share of the latency), and as a
client sees it, with the `openai` SDK against the server's /v1/completions.

    python bench/text_fairness.py            # 12 short requests per phase
    python bench/text_fairness.py --quick    # 5

Writes bench/results/text-fairness.json: p50/p99 of each phase and their ratios.
"""

import asyncio
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import latency_ratios, print_latency_ratios, quick_flag, write_result  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.demo import demo_model_dirs  # noqa: E402
from pyserve.engine.llm import AsyncLLMEngine  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402
from pyserve.server import start_in_thread  # noqa: E402

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


def measure_http(count: int) -> dict:
    import openai
    server = start_in_thread({"pydoc-chat": AsyncLLMEngine(LLM(demo_model_dirs()["pydoc-chat"], device="cpu").engine)})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def short(i: int) -> float:
        start = time.perf_counter()
        client.completions.create(model="pydoc-chat", prompt=f"The os module {i}", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
        return time.perf_counter() - start
    try:
        short(0)
        alone = [short(i) for i in range(count)]
        large = threading.Thread(target=lambda: client.completions.create(
            model="pydoc-chat", prompt="Tell me about json.dumps.", max_tokens=500, n=128, temperature=1.0, seed=1,
            extra_body={"ignore_eos": True}), daemon=True)
        large.start()
        time.sleep(1.0)
        beside = [short(i) for i in range(count)]
        running = large.is_alive()
    finally:
        server.stop()  # the large request ends with the server
    return {**latency_ratios(alone, beside), "large_was_running_throughout": running}


def main() -> None:
    quick = quick_flag(__doc__)
    count = 5 if quick else 12
    rows = {"engine": asyncio.run(measure(count)), "http": measure_http(count)}
    for where, row in rows.items():
        print(f"-- at the {'engine driver' if where == 'engine' else 'client, over HTTP'}")
        print_latency_ratios(row, "4 tokens, alone", "beside n=128 x 500 tokens")
        print(f"(the large request was running throughout: {row['large_was_running_throughout']})")
    write_result("text-fairness", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(), "short_requests": count,
                                   **rows}, quick=quick)


if __name__ == "__main__":
    main()
