"""What batch-invariant mode (`--batch-invariant`, PYSERVE_BATCH_INVARIANT=1) costs: prompt
processing, batch-1 decode and a 16-sequence decode of the ~100M benchmark Llama
(bench/llm_throughput.py), with the mode off and on, alternating, in one run.

    python bench/batch_invariance.py           # 10 layers, 512-token prompt
    python bench/batch_invariance.py --quick   # 4 layers, 256-token prompt

Writes bench/results/batch-invariance.json: tokens/s of each and on / off ratios.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_throughput import save_benchmark_llama  # noqa: E402
from report import quick_flag, write_result  # noqa: E402
from tiny_models import train_tokenizer  # noqa: E402

from pyserve import LLM, SamplingParams, kernels  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402


def timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def measure(llm: LLM, prompt_len: int) -> dict:
    prompt = [0] + [(7 * i) % 31000 + 3 for i in range(prompt_len - 1)]
    prefill = min(timed(llm, [prompt], 1) for _ in range(3))
    one = min(timed(llm, [[0, 5, 6]], 65) - timed(llm, [[0, 5, 6]], 1) for _ in range(2))
    many = min(timed(llm, [[0, 5, 6, i] for i in range(16)], 33) - timed(llm, [[0, 5, 6, i] for i in range(16)], 1)
               for _ in range(2))
    return {"prefill_tok_s": prompt_len / prefill, "decode_b1_tok_s": 64 / one, "decode_b16_tok_s": 16 * 32 / many}


def main() -> None:
    quick = quick_flag(__doc__)
    prompt_len = 256 if quick else 512
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp), vocab_size=300)
        model_dir = save_benchmark_llama(Path(tmp), quick)
        llm = LLM(model_dir, device="cpu", max_num_batched_tokens=1024, enable_prefix_caching=False)
        runs = {"off": [], "on": []}
        for mode in ("off", "on", "off", "on"):  # alternating: the machine's drift hits both
            kernels.set_batch_invariant(mode == "on")
            runs[mode].append(measure(llm, prompt_len))
        kernels.set_batch_invariant(False)
    best = {mode: {k: max(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    print(f"{'tokens/s':<18}{'off':>10}{'on':>10}{'on/off':>9}")
    ratios = {}
    for key in best["off"]:
        ratios[key] = best["on"][key] / best["off"][key]
        print(f"{key:<18}{best['off'][key]:>10.1f}{best['on'][key]:>10.1f}{ratios[key]:>8.2f}x")
    write_result("batch-invariance", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(),
                                      "prompt_tokens": prompt_len, "off": best["off"], "on": best["on"],
                                      "on_over_off": ratios}, quick=quick)


if __name__ == "__main__":
    main()
