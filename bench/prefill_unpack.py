"""Prefill-sized products on packed CPU weights: the weight unpacked in blocks of rows
(`pyserve.kernels.quantize.unpacked_linear`, UNPACK_BLOCK_BYTES at a time) against unpacked whole, as
before. Peak resident memory above the start (Linux's VmHWM, reset just before) and time of one
product, each way in its own process, in alternating rounds.

    python bench/prefill_unpack.py [--quick] [--rounds N]

The default shape is a Llama 3 8B output layer (128256 x 4096, int8) and 65 input rows, the
smallest batch that leaves the decode-sized kernels. Writes bench/results/prefill-unpack.json.
"""

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_result  # noqa: E402


def measure(n: int, k: int, rows: int, whole: bool) -> dict:
    """One product in this process: peak resident MiB above the start, and seconds."""
    import torch
    from pyserve.kernels import QuantizedWeight, cpu

    quantize = importlib.import_module("pyserve.kernels.quantize")  # the module (pyserve.kernels exports a function)
    if whole:
        quantize.UNPACK_WHOLE_BYTES = 1 << 62
    weight = QuantizedWeight("int8", torch.randint(-127, 128, (n, k), dtype=torch.int8),
                             (torch.rand(n, k // 32) / 100).half(), (n, k))
    x = torch.randn(rows, k)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from now
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    cpu.quantized_linear(x, weight)
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds}


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 32000 x 4096 weight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["whole", "blocks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, k, rows = (32000 if args.quick else 128256), 4096, 65
    if args.child:
        print(json.dumps(measure(n, k, rows, args.child == "whole")))
        return
    runs = {"whole": [], "blocks": []}
    for _ in range(args.rounds):
        for way in runs:
            cmd = [sys.executable, __file__, "--child", way] + (["--quick"] if args.quick else [])
            runs[way].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    best = {way: {"peak_mib": min(r["peak_mib"] for r in rs), "seconds": min(r["seconds"] for r in rs)}
            for way, rs in runs.items()}
    print(f"int8 weight {n} x {k}, {rows} input rows, best of {args.rounds} rounds")
    print(f"{'unpacked':<10} {'peak MiB':>10} {'seconds':>9}")
    for way, b in best.items():
        print(f"{way:<10} {b['peak_mib']:>10.0f} {b['seconds']:>9.2f}")
    memory = best["whole"]["peak_mib"] / max(best["blocks"]["peak_mib"], 1)
    speed = best["whole"]["seconds"] / best["blocks"]["seconds"]
    print(f"blocks: {memory:.0f}x less peak memory, {speed:.2f}x the speed")
    write_result("prefill-unpack", {"shape": [n, k], "rows": rows, "format": "int8", "best": best, "runs": runs,
                                    "peak_memory_ratio": round(memory, 1), "speedup": round(speed, 2)}, args.quick)


if __name__ == "__main__":
    main()
