"""Low-precision weights: decode speed of the same ~112M-parameter Llama with fp32, bf16, int8 and
int4 weights, in one run, next to the machine's copy bandwidth measured in the same run.

    python bench/quant.py [--quick] [--llama-server PATH --gguf-dir DIR] [--formats none,w8a8] [--rounds N]

For each format (w8a8/w4a8: int8/int4 weights whose products quantize their inputs to int8, as
llama.cpp's do): the bytes a decode step reads (the packed linear weights), batch-1 decode
tokens/s, 64 concurrent streams' output tokens/s (each side's server over HTTP), and the bandwidth
batch-1 decode achieves (bytes per token x tokens/s) as a fraction of the copy bandwidth, two
ways: the best tokens/s over the best copy of the run, and the median over rounds of each
measurement against the copies taken just before and after it (this machine's memory pace drifts
by up to 1.5x within a minute, so a best copy and a best decode are seldom from the same moment). With `--llama-server` (a built
llama.cpp server) and `--gguf-dir` (the same weights as f32/q8_0/q4_0 .gguf files), llama.cpp runs
the same batch-1 decode for comparison, in the same rounds as pyserve's (best of the rounds,
three by default, each taking every format and file in turn; 64 streams likewise, in one round
fewer; every round's figure is kept under "rounds", and the ratios to llama.cpp are given best
against best and as the median of each round's ratio). Writes bench/results/quant.json (with
--formats, quant-<formats>.json).
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ops import copy_bandwidth_gbs  # noqa: E402
from llm_throughput import batch1_decode, make_checkpoint  # noqa: E402
from report import write_result  # noqa: E402

import torch  # noqa: E402

from pyserve import LLM  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402
from pyserve.nn import quantize_model  # noqa: E402

FORMATS = ("none", "bf16", "int8", "int4", "w8a8", "w4a8")
# the llama.cpp file each format reads the same values as
GGUF_OF = {"none": "f32", "int8": "q8_0", "w8a8": "q8_0", "int4": "q4_0", "w4a8": "q4_0"}


def stream_prompts(n: int) -> list[list[int]]:
    """The 64-stream load: n distinct 32-token prompts (no shared prefix past the first token)."""
    return [[0] + list(range(3 + i, 34 + i)) for i in range(n)]


def post_json(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def wait_healthy(proc: subprocess.Popen, port: int, what: str) -> subprocess.Popen:
    """proc, once its /health answers 200 (both servers have one)."""
    for _ in range(900):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def concurrent_tokens_per_s(send, n: int, tokens: int) -> float:
    """Output tokens/s of the n stream prompts sent at once, each by send(prompt, tokens) -> the
    tokens it generated, after one warm-up request (llama.cpp's server warms up at load; the
    first request of a fresh process pays for first-touch allocations on either side)."""
    from concurrent.futures import ThreadPoolExecutor

    send([0, 5, 6, 7], 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        generated = sum(pool.map(lambda p: send(p, tokens), stream_prompts(n)))
    return generated / (time.perf_counter() - start)


def streams(model_dir: Path, format: str, n: int, quick: bool, port: int = 8790) -> float:
    """`pyserve serve` on the model in this format: output tokens/s of n requests sent at once over
    HTTP (OpenAI completions with token-id prompts, 64 new tokens each), as llama.cpp's are."""
    proc = wait_healthy(subprocess.Popen(
        [sys.executable, "-m", "pyserve", "serve", str(model_dir), "--quantization", format, "--host", "127.0.0.1",
         "--port", str(port), "--msgpack-port", "0", "--served-model-name", "bench"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "pyserve serve")
    try:
        def send(prompt: list[int], tokens: int) -> int:
            body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            return post_json(port, "/v1/completions", body)["usage"]["completion_tokens"]
        return concurrent_tokens_per_s(send, n, 16 if quick else 64)
    finally:
        proc.terminate()
        proc.wait()


def packed_bytes(model_dir: Path, format: str) -> int:
    """Bytes of linear weights a decode step reads in this format."""
    llm = LLM(model_dir, device="cpu")
    model = llm.engine.model
    if format == "none":
        return quantize_model(model, "bf16").unpacked_bytes  # the fp32 bytes those layers held
    return quantize_model(model, format).packed_bytes


def llama_cpp_server(server: Path, gguf: Path, slots: int, port: int = 8765) -> subprocess.Popen:
    """A llama.cpp server on the file with `slots` parallel sequences, once /health answers."""
    return wait_healthy(subprocess.Popen(
        [str(server), "-m", str(gguf), "--port", str(port), "-t", "2", "-np", str(slots), "-c", str(2048 * slots),
         "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "llama-server")


def llama_cpp_completion(prompt: list[int], tokens: int, port: int = 8765) -> dict:
    return post_json(port, "/completion", {"prompt": prompt, "n_predict": tokens, "temperature": 0,
                                           "ignore_eos": True, "cache_prompt": False})


def llama_cpp_decode(port: int, tokens: int = 128) -> float:
    """One request to a running llama.cpp server: its own timing of generated tokens per second."""
    return llama_cpp_completion([0] + list(range(3, 34)), tokens, port)["timings"]["predicted_per_second"]


def llama_cpp_streams(server: Path, gguf: Path, n: int, quick: bool) -> float:
    """llama.cpp server with n slots: output tokens/s of the same n requests as `streams`, sent at once."""
    proc = llama_cpp_server(server, gguf, slots=n)
    try:
        return concurrent_tokens_per_s(lambda p, t: llama_cpp_completion(p, t)["tokens_predicted"], n,
                                       16 if quick else 64)
    finally:
        proc.terminate()
        proc.wait()


def machine() -> dict:
    """What the figures depend on: the CPU, the kernels it gets (AVX-512 VNNI or AVX2), the threads."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return {"cpu": names[0] if names else platform.processor(), "kernels": cpu.best_isa(),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama-server", type=Path, default=None)
    parser.add_argument("--gguf-dir", type=Path, default=None, help="f32.gguf, q8_0.gguf, q4_0.gguf of the model")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a checkpoint (default: make one)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated; none (fp32) is always run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of each measurement (default 3, quick 2)")
    args = parser.parse_args()
    asked = [f for f in args.formats.split(",") if f]
    if unknown := [f for f in asked if f not in FORMATS]:
        parser.error(f"--formats: unknown {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    formats = ["none"] + [f for f in FORMATS[1:] if f in asked]
    rounds = args.rounds or (2 if args.quick else 3)
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model_dir or make_checkpoint(Path(tmp.name), args.quick)
    files = {name: args.gguf_dir / f"{name}.gguf" for name in ("f32", "q8_0", "q4_0")
             if args.llama_server and args.gguf_dir and (args.gguf_dir / f"{name}.gguf").exists()
             and any(GGUF_OF.get(f) == name for f in formats)}
    # Batch 1 in rounds that take every format and every llama.cpp file in turn, best of the
    # rounds: this machine's memory pace drifts by up to 1.5x over minutes, and measuring one side
    # minutes after the other would compare the drift.
    llms = {format: LLM(model_dir, device="cpu", quantization=format) for format in formats}
    servers = {name: llama_cpp_server(args.llama_server, f, slots=1, port=8765 + i)
               for i, (name, f) in enumerate(files.items())}
    bandwidth, spread = [], {name: [] for name in [*formats, *files]}  # each round's tokens/s
    beside = {name: [] for name in spread}  # the copy bandwidth around each of those measurements
    try:
        for _ in range(rounds):
            for name in spread:
                before = copy_bandwidth_gbs()
                bandwidth.append(before)
                spread[name].append(batch1_decode(llms[name]) if name in llms else
                                    llama_cpp_decode(8765 + list(files).index(name)))
                beside[name].append((before, copy_bandwidth_gbs()))
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait()
    del llms
    decode, theirs = {f: max(spread[f]) for f in formats}, {name: max(spread[name]) for name in files}
    # 64 streams in rounds as well (one fewer: each takes longer), each side's best
    spread_64 = {name: [] for name in [*formats, *files]}
    for _ in range(max(1, rounds - 1)):
        for format in formats:
            spread_64[format].append(streams(model_dir, format, 64, args.quick))
        for name, f in files.items():
            spread_64[name].append(llama_cpp_streams(args.llama_server, f, 64, args.quick))
    ours_64, theirs_64 = {f: max(spread_64[f]) for f in formats}, {name: max(spread_64[name]) for name in files}
    nbytes = {format: packed_bytes(model_dir, format) for format in formats}
    # a llama.cpp file reads the bytes of the format holding the same values
    nbytes.update({name: nbytes[f] for name in files for f in formats if GGUF_OF.get(f) == name})
    bandwidth += [b for pairs in beside.values() for _, b in pairs]
    copy = max(bandwidth)
    paired = {name: statistics.median(tps * nbytes[name] / 1e9 / ((b0 + b1) / 2)
                                      for tps, (b0, b1) in zip(spread[name], beside[name]))
              for name in spread if name in nbytes}
    rows = {}
    for format in formats:
        rows[format] = {"weight_mib_read_per_token": nbytes[format] / 2**20, "batch1_tokens_per_s": decode[format],
                        "streams64_tokens_per_s": ours_64[format],
                        "batch1_gb_per_s": decode[format] * nbytes[format] / 1e9}
    base = rows["none"]
    for format, row in rows.items():
        row["batch1_vs_fp32"] = row["batch1_tokens_per_s"] / base["batch1_tokens_per_s"]
        row["streams64_vs_fp32"] = row["streams64_tokens_per_s"] / base["streams64_tokens_per_s"]
        row["batch1_fraction_of_copy_bandwidth"] = row["batch1_gb_per_s"] / copy
        row["batch1_fraction_of_copy_bandwidth_paired"] = paired[format]
    result = {"machine": machine(), "copy_bandwidth_gbs": bandwidth, "pyserve": rows,
              "rounds": {"batch1_tokens_per_s": spread, "batch1_copy_gbs_before_after": beside,
                         "streams64_tokens_per_s": spread_64}}
    if files:
        result["llama_cpp_batch1_tokens_per_s"] = theirs
        result["llama_cpp_streams64_tokens_per_s"] = theirs_64
        result["llama_cpp_batch1_fraction_of_copy_bandwidth_paired"] = {name: paired[name] for name in files
                                                                         if name in paired}
        # best against best, and the median of each round's ratio (the two sides measured
        # minutes apart at most: the memory pace's drift mostly cancels)
        result["vs_llama_cpp"] = {
            format: {"gguf": gguf,
                     "batch1": rows[format]["batch1_tokens_per_s"] / result["llama_cpp_batch1_tokens_per_s"][gguf],
                     "batch1_median_of_rounds": statistics.median(
                         a / b for a, b in zip(spread[format], spread[gguf])),
                     "streams64": rows[format]["streams64_tokens_per_s"]
                     / result["llama_cpp_streams64_tokens_per_s"][gguf],
                     "streams64_median_of_rounds": statistics.median(
                         a / b for a, b in zip(spread_64[format], spread_64[gguf]))}
            for format, gguf in GGUF_OF.items() if gguf in files and format in formats}
    print(f"{result['machine']}; copy bandwidth {copy:.1f} GB/s (best of {len(bandwidth)})")
    print(f"{'format':<6} {'MiB/token':>10} {'batch-1 tok/s':>14} {'vs fp32':>8} {'64 streams tok/s':>17} "
          f"{'vs fp32':>8} {'of copy bw: best':>17} {'paired':>7}")
    for name, row in rows.items():
        print(f"{name:<6} {row['weight_mib_read_per_token']:>10.1f} {row['batch1_tokens_per_s']:>14.1f} "
              f"{row['batch1_vs_fp32']:>7.2f}x {row['streams64_tokens_per_s']:>17.1f} "
              f"{row['streams64_vs_fp32']:>7.2f}x "
              f"{row['batch1_fraction_of_copy_bandwidth']:>16.0%} "
              f"{row['batch1_fraction_of_copy_bandwidth_paired']:>7.0%}")
    for name, value in result.get("llama_cpp_batch1_tokens_per_s", {}).items():
        print(f"llama.cpp {name}: batch-1 {value:.1f} tok/s ({paired.get(name, float('nan')):.0%} of copy bw, paired), "
              f"64 streams {result['llama_cpp_streams64_tokens_per_s'][name]:.1f} tok/s")
    for format, ratio in result.get("vs_llama_cpp", {}).items():
        print(f"pyserve {format} vs llama.cpp {ratio['gguf']}: batch 1 {ratio['batch1']:.2f}x "
              f"(median of rounds {ratio['batch1_median_of_rounds']:.2f}x), 64 streams {ratio['streams64']:.2f}x "
              f"({ratio['streams64_median_of_rounds']:.2f}x)")
    write_result("quant" if formats == list(FORMATS) else "quant-" + "-".join(formats), result, args.quick)


if __name__ == "__main__":
    main()
