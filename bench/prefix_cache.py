"""Prefix cache: what a hit saves (the time-to-first-token signal that cache salts hide from
other tenants), and what the SHA-256 block digests cost next to Python's builtin hash.

    python bench/prefix_cache.py            # ~100M-parameter Llama, fp32 CPU, 1024-token prompts
    python bench/prefix_cache.py --quick

Writes bench/results/prefix-cache[-quick].json.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_throughput import RESULTS, make_checkpoint  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.engine.llm.block_manager import BlockManager  # noqa: E402


def ttft(llm: LLM, prompt: list[int], salt: str | None) -> tuple[float, int]:
    start = time.perf_counter()
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0), cache_salt=salt)[0]
    return time.perf_counter() - start, out.num_cached_tokens


def digest_cost(prompt: list[int], block_size: int, repeats: int = 200) -> dict:
    blocks = [prompt[i:i + block_size] for i in range(0, len(prompt) - block_size + 1, block_size)]

    def sha256_chain():
        parent = None
        for tokens in blocks:
            parent = BlockManager.chain_hash(parent, tokens)

    def builtin_chain():
        parent = None
        for tokens in blocks:
            parent = hash((parent, tuple(tokens)))

    def per_block(fn) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / (repeats * len(blocks))

    return {"sha256_us_per_block": per_block(sha256_chain) * 1e6, "builtin_us_per_block": per_block(builtin_chain) * 1e6,
            "blocks": len(blocks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.prompt_tokens or (256 if args.quick else 1024)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(make_checkpoint(Path(tmp), args.quick), device="cpu")
        ttft(llm, [0] + [rng.randrange(3, 32000) for _ in range(n - 1)], None)  # warm-up
        cold, warm, other_salt = [], [], []
        for r in range(args.repeats):
            prompt = [0] + [rng.randrange(3, 32000) for _ in range(n - 1)]
            cold.append(ttft(llm, prompt, "victim"))
            warm.append(ttft(llm, prompt, "victim"))        # an attacker sharing the salt sees a hit
            other_salt.append(ttft(llm, prompt, "attacker"))  # under another salt: a miss, like cold
        costs = digest_cost(prompt, llm.engine.block_size)

    def median(rows):
        return statistics.median(t for t, _ in rows)

    result = {
        "prompt_tokens": n, "repeats": args.repeats,
        "ttft_cold_s": median(cold), "ttft_same_salt_s": median(warm), "ttft_other_salt_s": median(other_salt),
        "cached_tokens": {"cold": cold[-1][1], "same_salt": warm[-1][1], "other_salt": other_salt[-1][1]},
        "hit_speedup": median(cold) / median(warm), "other_salt_vs_cold": median(other_salt) / median(cold),
        **costs, "sha256_vs_builtin": costs["sha256_us_per_block"] / costs["builtin_us_per_block"],
        "digests_share_of_cold_ttft": costs["sha256_us_per_block"] * 1e-6 * costs["blocks"] / median(cold),
    }
    print(f"prompt of {n} tokens, median of {args.repeats}")
    print(f"{'case':<26}{'TTFT ms':>10}{'cached tokens':>15}")
    for name, rows, key in (("cold", cold, "cold"), ("same salt (hit)", warm, "same_salt"),
                            ("other salt", other_salt, "other_salt")):
        print(f"{name:<26}{median(rows) * 1e3:>10.1f}{result['cached_tokens'][key]:>15}")
    print(f"hit speed-up {result['hit_speedup']:.1f}x; other salt vs cold {result['other_salt_vs_cold']:.2f}x")
    print(f"block digest: SHA-256 {costs['sha256_us_per_block']:.2f} us vs builtin hash "
          f"{costs['builtin_us_per_block']:.2f} us per block ({result['sha256_vs_builtin']:.1f}x); "
          f"all digests of the prompt = {result['digests_share_of_cold_ttft'] * 100:.3f}% of a cold TTFT")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"prefix-cache{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
