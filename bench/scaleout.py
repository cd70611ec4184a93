"""Scale-out on Ray Serve: throughput of 1 vs 2 replicas on this machine (one thread each, so each
replica has a core), and what the Ray path adds to a request over `pyserve serve`, in one run.
Also tensor parallelism: the same model split over 2 CPU ranks (one thread each) against one
process with both threads, offline.

    python bench/scaleout.py [--quick]

The same requests (random token prompts, greedy, EOS ignored) go through the openai SDK from 16
concurrent clients. The overhead is the median round trip of a one-token completion, sent one
at a time. Writes bench/results/scaleout.json.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llm_throughput import save_benchmark_llama  # noqa: E402
from report import write_result  # noqa: E402
from conftest import free_port  # noqa: E402


def requests(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 32000) for _ in range(rng.randint(32, 64))] for _ in range(n)]


def throughput(url: str, prompts, new_tokens: int, clients: int = 16) -> float:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(prompt):
        out = client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, prompts))
    return tokens / (time.perf_counter() - start)


def round_trip(url: str, count: int) -> float:
    """Median seconds for a one-token completion, one request at a time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    times = []
    for i in range(count + 2):
        start = time.perf_counter()
        client.completions.create(model="bench", prompt=[0, 5 + i % 100, 7], max_tokens=1, temperature=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def tensor_parallel(model_dir: Path, prompts, new_tokens: int) -> dict:
    from pyserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    torch.set_num_threads(2)
    figures = {}
    for ranks in (1, 2):
        llm = LLM(model_dir, device="cpu", tensor_parallel_size=ranks)
        llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0))
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        figures[f"tp_{ranks}_tokens_per_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        if ranks > 1:
            llm.engine.model.close()
    figures["tp_2_vs_1"] = figures["tp_2_tokens_per_s"] / figures["tp_1_tokens_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, new_tokens, trips = (16, 16, 20) if args.quick else (64, 48, 50)
    import ray
    from ray import serve

    from pyserve.engine import EngineDriver, load_engine
    from pyserve.ray import APP_NAME, RayOptions, build_application
    from pyserve.server import start_in_thread

    prompts = requests(n)
    options = {"device": "cpu", "kv_cache_memory": 2**30}
    result = {"requests": n, "new_tokens": new_tokens, "cores": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_benchmark_llama(Path(tmp), quick=True)

        torch.set_num_threads(1)  # as each replica runs: one thread
        local = start_in_thread({"bench": EngineDriver(load_engine(model_dir, **options))})
        throughput(local.url, prompts[:4], 4)
        result["pyserve_serve_round_trip_ms"] = 1e3 * round_trip(local.url, trips)
        local.stop()

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 logging_level="ERROR", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        try:
            for replicas in (1, 2):
                serve.run(build_application({"bench": str(model_dir)},
                                            RayOptions(replicas=replicas, cpus_per_replica=1, engine_options=options)),
                          name=APP_NAME, route_prefix="/")
                throughput(url, prompts[:4], 4)  # warm-up
                result[f"replicas_{replicas}_tokens_per_s"] = throughput(url, prompts, new_tokens)
                if replicas == 1:
                    result["ray_round_trip_ms"] = 1e3 * round_trip(url, trips)
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
        result.update(tensor_parallel(model_dir, prompts, new_tokens))
    result["two_vs_one_replica"] = result["replicas_2_tokens_per_s"] / result["replicas_1_tokens_per_s"]
    result["ray_overhead_ms"] = result["ray_round_trip_ms"] - result["pyserve_serve_round_trip_ms"]
    print(f"{n} requests x {new_tokens} tokens, 16 clients")
    print(f"1 replica  {result['replicas_1_tokens_per_s']:8.1f} tokens/s")
    print(f"2 replicas {result['replicas_2_tokens_per_s']:8.1f} tokens/s  ({result['two_vs_one_replica']:.2f}x)")
    print(f"one-token round trip: pyserve serve {result['pyserve_serve_round_trip_ms']:.1f} ms, "
          f"Ray Serve {result['ray_round_trip_ms']:.1f} ms (+{result['ray_overhead_ms']:.1f} ms)")
    print(f"tensor parallel, offline: 1 process (2 threads) {result['tp_1_tokens_per_s']:.1f} tokens/s, "
          f"2 ranks (1 thread each) {result['tp_2_tokens_per_s']:.1f} ({result['tp_2_vs_1']:.2f}x)")
    write_result("scaleout", result, args.quick)


if __name__ == "__main__":
    main()
