"""Serving benchmark: the server under streaming load over HTTP (OpenAI API) and msgpack, against
the offline engine on the same requests, in one run.

    python bench/serve.py              # ~100M-parameter Llama (random weights), 256 requests, 64 streams
    python bench/serve.py --quick

Writes bench/results/serve.json: output tokens/s, time to first token and inter-token latency
(each request's time per output token after the first; p50/p99 over requests) per protocol, server
throughput as a fraction of offline, the round-trip time of a tiny request over msgpack vs HTTP, and
the latency of /health and of a one-token request while the HTTP load runs (p50/p99), next to the
same probes on the idle server.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_throughput import make_checkpoint  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.client import AsyncClient  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n: int, quick: bool) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    hi_prompt, hi_out = (96, 32) if quick else (256, 128)
    return [([0] + [rng.randrange(3, 32000) for _ in range(rng.randint(32, hi_prompt) - 1)], rng.randint(16, hi_out))
            for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else float("nan")


def summary(name: str, elapsed: float, tokens: int, ttfts: list[float], itls: list[float]) -> dict:
    row = dict(protocol=name, seconds=round(elapsed, 2), output_tokens=tokens, tokens_per_s=round(tokens / elapsed, 2),
               ttft_p50_ms=round(pct(ttfts, 0.5), 1), ttft_p99_ms=round(pct(ttfts, 0.99), 1),
               itl_p50_ms=round(pct(itls, 0.5), 1), itl_p99_ms=round(pct(itls, 0.99), 1))
    print(json.dumps(row))
    return row


async def drive(reqs, concurrency: int, one) -> tuple[float, int, list[float], list[float]]:
    sem = asyncio.Semaphore(concurrency)
    ttfts, itls, tokens = [], [], [0]

    async def run(prompt, out_len):
        async with sem:
            t0 = time.perf_counter()
            stamps = await one(prompt, out_len)
            ttfts.append(stamps[0] - t0)
            if out_len > 1:  # streamed text arrives in pieces, not per token: use time per output token
                itls.append((stamps[-1] - stamps[0]) / (out_len - 1))
            tokens[0] += out_len

    t0 = time.perf_counter()
    await asyncio.gather(*(run(p, n) for p, n in reqs))
    return time.perf_counter() - t0, tokens[0], ttfts, itls


async def http_run(base: str, reqs, concurrency: int):
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(prompt, out_len):
            stamps = []
            body = {"model": "bench", "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        stamps.append(time.perf_counter())
            return stamps
        return await drive(reqs, concurrency, one)


async def msgpack_run(port: int, reqs, concurrency: int):
    async with await AsyncClient.connect("127.0.0.1", port) as c:
        async def one(prompt, out_len):
            return [time.perf_counter() async for _ in c.stream("bench", prompt, max_tokens=out_len, temperature=0,
                                                                ignore_eos=True)]
        return await drive(reqs, concurrency, one)


async def tiny_rtt(base: str, port: int, n: int = 50) -> tuple[float, float]:
    prompt = [0, 5, 6]
    async with httpx.AsyncClient(base_url=base, timeout=60) as h, await AsyncClient.connect("127.0.0.1", port) as m:
        http_times, mp_times = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            (await h.post("/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 1})).raise_for_status()
            http_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await m.generate("bench", prompt, max_tokens=1)
            mp_times.append(time.perf_counter() - t0)
    return statistics.median(http_times) * 1e3, statistics.median(mp_times) * 1e3


class Probe(threading.Thread):
    """From its own thread: GET /health every 50 ms and a one-token completion every 250 ms."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.stop, self.health, self.one_token = base, threading.Event(), [], []

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            while not self.stop.is_set():
                for _ in range(5):
                    t0 = time.perf_counter()
                    c.get("/health").raise_for_status()
                    self.health.append(time.perf_counter() - t0)
                    time.sleep(0.05)
                t0 = time.perf_counter()
                c.post("/v1/completions", json={"model": "bench", "prompt": [0, 5, 6], "max_tokens": 1}).raise_for_status()
                self.one_token.append(time.perf_counter() - t0)

    def measure(self, seconds: float | None = None, during=None) -> dict:
        self.start()
        result = during() if during is not None else time.sleep(seconds)
        self.stop.set()
        self.join()
        self.result = result
        return {"health_p50_ms": round(pct(self.health, 0.5), 2), "health_p99_ms": round(pct(self.health, 0.99), 2),
                "one_token_p50_ms": round(pct(self.one_token, 0.5), 2),
                "one_token_p99_ms": round(pct(self.one_token, 0.99), 2), "probes": len(self.health)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reqs = workload(args.requests, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench"
        model_dir.mkdir()
        make_checkpoint(model_dir, args.quick)
        llm = LLM(model_dir, device="cpu", max_num_seqs=args.concurrency)
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs],
                            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in reqs])
        offline_s = time.perf_counter() - t0
        offline = dict(protocol="offline", seconds=round(offline_s, 2),
                       tokens_per_s=round(sum(len(o.token_ids) for o in outs) / offline_s, 2))
        print(json.dumps(offline))
        del llm
        http_port, mp_port = free_port(), free_port()
        server = subprocess.Popen([sys.executable, "-m", "pyserve.cli", "--log-level", "WARNING", "serve", str(model_dir),
                                   "--served-model-name", "bench", "--port", str(http_port), "--msgpack-port",
                                   str(mp_port), "--max-num-seqs", str(args.concurrency),
                                   "--data-dir", str(Path(tmp) / "data")],
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = f"http://127.0.0.1:{http_port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            rows = [offline, summary("http", *asyncio.run(http_run(base, reqs, args.concurrency))),
                    summary("msgpack", *asyncio.run(msgpack_run(mp_port, reqs, args.concurrency)))]
            # The probes load the same two cores, so they run on their own, after the throughput runs.
            idle = Probe(base).measure(seconds=5)
            loaded = Probe(base).measure(during=lambda: asyncio.run(http_run(base, reqs[:128], args.concurrency)))
            print(json.dumps({"probes_idle": idle, "probes_under_load": loaded}))
            http_rtt, mp_rtt = asyncio.run(tiny_rtt(base, mp_port))
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = dict(requests=args.requests, concurrency=args.concurrency, quick=args.quick, rows=rows,
                  http_vs_offline=round(rows[1]["tokens_per_s"] / offline["tokens_per_s"], 3),
                  msgpack_vs_offline=round(rows[2]["tokens_per_s"] / offline["tokens_per_s"], 3),
                  tiny_request_rtt_ms={"http": round(http_rtt, 2), "msgpack": round(mp_rtt, 2)},
                  probes_idle=idle, probes_under_load=loaded)
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("serve-quick.json" if args.quick else "serve.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
