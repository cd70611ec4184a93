"""Long-context decode with an fp32 and a bf16 KV cache (`kv_cache_dtype`), in one run.

    python bench/kv_cache.py [--model-dir DIR] [--quantization w8a8] [--rounds 2]
                             [--llama-server PATH --gguf FILE]

The ~112M-parameter benchmark Llama (10 layers, 4 KV heads of 64: 20 KiB of fp32 keys and values
per token), its weights as --quantization says. Each case prefills its prompts, then times 64 decode
steps: decode tokens/s, and the bytes a step reads (packed weights plus the KV cache it attends
over). Cases: one stream at a short and at a long context, and 8 streams at the long one, each
cache dtype in turn in rounds (best of the rounds: this machine's pace drifts). With
`--llama-server` and a GGUF file of the same weights, llama.cpp (its default f16 KV cache) decodes
the single streams' prompts (its timings of several slots count the others' prompt processing).
Writes bench/results/kv-cache.json.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_throughput import make_checkpoint  # noqa: E402
from quant import llama_cpp_completion, packed_bytes, wait_healthy  # noqa: E402
from report import write_result  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402

CASES = [(1, 128), (1, 1900), (8, 1900)]  # (streams, prompt tokens)
NEW_TOKENS = 64
CACHE_DTYPES = ("float32", "bfloat16")


def prompts(streams: int, length: int) -> list[list[int]]:
    return [[0] + [3 + (i * 7919 + j * 104729) % 31000 for j in range(length - 1)] for i in range(streams)]


def decode_rate(llm: LLM, batch: list[list[int]]) -> float:
    """Decode tokens/s of the batch once every prompt is prefilled (its first token out)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=NEW_TOKENS + 1, temperature=0, ignore_eos=True)
    for i, ids in enumerate(batch):
        engine.add_request(f"r{i}", ids, params)
    produced: dict[str, int] = {}
    while len(produced) < len(batch) or min(produced.values()) < 1:
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(batch) * NEW_TOKENS / (time.perf_counter() - start)


def llama_cpp_rate(server: Path, gguf: Path, ids: list[int], port: int = 8790) -> float:
    """llama.cpp's decode tokens/s on one prompt, from its own timings."""
    proc = wait_healthy(subprocess.Popen([str(server), "-m", str(gguf), "--port", str(port), "-t", "2", "-c", "2048",
                                          "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                        port, "llama-server")
    try:
        return llama_cpp_completion(ids, NEW_TOKENS, port)["timings"]["predicted_per_second"]
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a checkpoint (default: make one)")
    parser.add_argument("--quantization", default="w8a8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, default=None)
    parser.add_argument("--gguf", type=Path, default=None, help="the same weights for llama.cpp")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model_dir or make_checkpoint(Path(tmp.name), False)
    llms = {dtype: LLM(model_dir, device="cpu", quantization=args.quantization, kv_cache_dtype=dtype,
                       kv_cache_memory=2**30) for dtype in CACHE_DTYPES}
    spec = llms["float32"].engine.model.spec
    values_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim  # keys and values
    kv_bytes_per_token = {"float32": 4 * values_per_token, "bfloat16": 2 * values_per_token}
    weight_bytes = packed_bytes(model_dir, args.quantization)
    spread = {f"{s}x{n}": {dtype: [] for dtype in CACHE_DTYPES} for s, n in CASES}
    for _ in range(args.rounds):
        for streams, length in CASES:
            for dtype, llm in llms.items():
                spread[f"{streams}x{length}"][dtype].append(decode_rate(llm, prompts(streams, length)))
    rows = []
    for streams, length in CASES:
        key = f"{streams}x{length}"
        best = {dtype: max(spread[key][dtype]) for dtype in CACHE_DTYPES}
        row = {"streams": streams, "prompt_tokens": length,
               **{f"{dtype}_tokens_per_s": best[dtype] for dtype in CACHE_DTYPES},
               "bf16_vs_fp32": best["bfloat16"] / best["float32"],
               # the mean context over the timed steps
               **{f"{dtype}_kv_mib_read_per_step": streams * (length + NEW_TOKENS // 2) * per_token / 2**20
                  for dtype, per_token in kv_bytes_per_token.items()}}
        if args.llama_server and args.gguf and streams == 1:
            row["llama_cpp_tokens_per_s"] = llama_cpp_rate(args.llama_server, args.gguf, prompts(1, length)[0])
            row["bf16_vs_llama_cpp"] = best["bfloat16"] / row["llama_cpp_tokens_per_s"]
        rows.append(row)
    result = {"quantization": args.quantization, "weight_mib_read_per_step": weight_bytes / 2**20,
              "new_tokens": NEW_TOKENS, "cases": rows, "rounds": spread}
    print(f"{args.quantization} weights ({result['weight_mib_read_per_step']:.1f} MiB a step), {NEW_TOKENS} "
          "decode steps after the prefill")
    print(f"{'streams':>7} {'context':>7} {'KV MiB fp32/bf16':>17} {'fp32 cache tok/s':>17} {'bf16 cache tok/s':>17} "
          f"{'bf16/fp32':>9} {'llama.cpp (f16)':>16}")
    for row in rows:
        theirs = (f"{row['llama_cpp_tokens_per_s']:.1f} ({row['bf16_vs_llama_cpp']:.2f}x)"
                  if "llama_cpp_tokens_per_s" in row else "")
        print(f"{row['streams']:>7} {row['prompt_tokens']:>7} {row['float32_kv_mib_read_per_step']:>8.0f}/"
              f"{row['bfloat16_kv_mib_read_per_step']:<8.0f} {row['float32_tokens_per_s']:>17.1f} "
              f"{row['bfloat16_tokens_per_s']:>17.1f} {row['bf16_vs_fp32']:>8.2f}x {theirs:>16}")
    write_result("kv-cache", result)


if __name__ == "__main__":
    main()
