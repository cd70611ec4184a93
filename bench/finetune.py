"""Training beside serving: `pyserve serve` of the demo chat model (a subprocess, as deployed) is
measured idle and while a fine-tuning job trains in its worker process, in one run:

- serving: p50/p99 latency of /health and of short chat completions (16 tokens), idle and during
  training, and their ratios (the target: p99 during training <= 1.5x idle);
- training: tokens per second of the job beside serving, and of the same training alone (the
  trainer in this process, no server), with the job's threads.

    python bench/finetune.py            # 60 chat requests and 300 /health probes per phase
    python bench/finetune.py --quick    # 20 and 100

Writes bench/results/finetune.json.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import latency_ratios, print_latency_ratios, quick_flag, write_result  # noqa: E402

from pyserve.demo import demo_model_dirs  # noqa: E402
from pyserve.finetune import TrainingConfig, TrainingSpec, train  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402

FACTS = Path(__file__).resolve().parent.parent / "examples" / "finetune" / "facts.jsonl"
HYPERPARAMETERS = {"n_epochs": 40, "batch_size": 4, "learning_rate": 2e-3, "rank": 16, "alpha": 32}
THREADS = 1


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(url: str, chats: int, probes: int) -> tuple[list[float], list[float]]:
    """Latencies of `chats` chat completions (one after another) and, meanwhile, of /health probes
    every 20 ms, up to `probes` of them."""
    health: list[float] = []
    done = threading.Event()

    def probe():
        while not done.is_set() and len(health) < probes:
            health.append(timed(lambda: call(url + "/health")))
            time.sleep(0.02)
    prober = threading.Thread(target=probe)
    prober.start()
    chat = [timed(lambda i=i: call(url + "/v1/chat/completions", {
        "model": "pydoc-chat", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"What is json.dumps? ({i})"}]})) for i in range(chats)]
    done.set()
    prober.join()
    return chat, health


def upload(url: str, path: Path) -> str:
    boundary = "pyservebench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/files", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["id"]


def main() -> None:
    quick = quick_flag(__doc__)
    chats, probes = (20, 100) if quick else (60, 300)
    chat_dir = demo_model_dirs()["pydoc-chat"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen([sys.executable, "-m", "pyserve", "--log-level", "WARNING", "serve", str(chat_dir), "--served-model-name",
                                   "pydoc-chat", "--port", str(port), "--msgpack-port", "0", "--data-dir", data_dir,
                                   "--finetune-threads", str(THREADS)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    call(url + "/health")
                    break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                    time.sleep(0.2)
            measure(url, 3, 3)  # warm up
            idle_chat, idle_health = measure(url, chats, probes)
            job = call(url + "/v1/fine_tuning/jobs", {
                "model": "pydoc-chat", "training_file": upload(url, FACTS),
                "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}}})
            while call(f"{url}/v1/fine_tuning/jobs/{job['id']}")["status"] != "running":
                time.sleep(0.1)
            time.sleep(8.0)  # past the worker's start (imports, loading the weights): into the steps
            busy_chat, busy_health = measure(url, chats, probes)
            during = call(f"{url}/v1/fine_tuning/jobs/{job['id']}")["status"] == "running"
            while (finished := call(f"{url}/v1/fine_tuning/jobs/{job['id']}"))["status"] == "running":
                time.sleep(0.5)
            assert finished["status"] == "succeeded", finished["error"]
            events = call(f"{url}/v1/fine_tuning/jobs/{job['id']}/events?limit=1")["data"]
            seconds = float(events[0]["message"].rpartition(" in ")[2].split()[0])
            beside = finished["trained_tokens"] / seconds
        finally:
            server.terminate()
            server.wait(timeout=60)

    torch.set_num_threads(THREADS)  # the same training alone, in this process
    with tempfile.TemporaryDirectory() as out:
        alone = train(TrainingSpec(str(chat_dir), str(FACTS), out,
                                   TrainingConfig.from_request({"type": "supervised", "supervised": {
                                       "hyperparameters": HYPERPARAMETERS}})))
    rows = {"chat": latency_ratios(idle_chat, busy_chat), "health": latency_ratios(idle_health, busy_health)}
    print("-- chat completions (16 tokens)")
    print_latency_ratios(rows["chat"], "idle", "while a job trains")
    print("-- /health")
    print_latency_ratios(rows["health"], "idle", "while a job trains")
    training = {"tokens_per_second_beside_serving": beside,
                "tokens_per_second_alone": alone.trained_tokens / alone.seconds,
                "steps": alone.steps, "trained_tokens": alone.trained_tokens}
    training["ratio_beside_over_alone"] = training["tokens_per_second_beside_serving"] / training["tokens_per_second_alone"]
    print(f"training: {beside:.0f} tok/s beside serving, {training['tokens_per_second_alone']:.0f} tok/s alone "
          f"({training['ratio_beside_over_alone']:.2f}x); the job was running throughout: {during}")
    write_result("finetune", {"isa": cpu.best_isa(), "cpus": os.cpu_count(), "finetune_threads": THREADS,
                              "hyperparameters": HYPERPARAMETERS, "job_running_throughout": during, **rows,
                              "training": training}, quick=quick)


if __name__ == "__main__":
    main()
