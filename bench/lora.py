"""Many LoRA adapters over one base model: throughput of 128 requests spread over 1, 8 and 32
rank-16 adapters (every attention and MLP projection), against the base model alone and against
merging each adapter into the weights and serving its requests adapter by adapter, in one run.

    python bench/lora.py [--quick]

Writes bench/results/lora.json.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_throughput import make_checkpoint  # noqa: E402
from report import write_result  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def write_adapter(out: Path, cfg: dict, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every projection."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [p.split(".")[1] for p in PROJECTIONS]}))
    return out


def requests(n: int, new_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 32000) for _ in range(rng.randint(32, 64))] for _ in range(n)]


def run(llm: LLM, prompts, adapters, new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora=adapters)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def merged(llm: LLM, prompts, adapters, names, new_tokens: int) -> float:
    """Each adapter merged into the weights in turn (W += scale B A), its requests served, unmerged."""
    tokens, start = 0, time.perf_counter()
    for name in names:
        loaded = llm.engine.adapters.loaded[name]  # its layers as the model takes them
        deltas = []
        with torch.no_grad():
            for linear, a, b in loaded.layers:
                delta = loaded.scale * b @ a
                linear.weight.add_(delta)
                deltas.append((linear, delta))
        own = [p for p, a in zip(prompts, adapters) if a == name]
        outs = llm.generate(own, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        tokens += sum(len(o.token_ids) for o in outs)
        with torch.no_grad():
            for linear, delta in deltas:
                linear.weight.sub_(delta)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, new_tokens, counts = (32, 16, (1, 8)) if args.quick else (128, 64, (1, 8, 32))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model").mkdir()
        model_dir = make_checkpoint(Path(tmp) / "model", args.quick)
        cfg = json.loads((model_dir / "config.json").read_text())
        names = [f"a{i}" for i in range(max(counts))]
        paths = {name: write_adapter(Path(tmp) / name, cfg, 16, i) for i, name in enumerate(names)}
        options = dict(device="cpu", kv_cache_memory=2 * 2**30, max_num_seqs=128, max_num_batched_tokens=1024,
                       lora=paths, enable_prefix_caching=False)
        llm = LLM(model_dir, **options)
        prompts = requests(n, new_tokens)
        run(llm, prompts[:8], [None] * 8, 4)  # warm-up
        base = run(llm, prompts, [None] * n, new_tokens)
        result = {"requests": n, "new_tokens": new_tokens, "rank": 16, "base_tokens_per_s": base, "adapters": {}}
        print(f"base model alone: {base:.1f} tokens/s")
        for count in counts:
            chosen = [names[i % count] for i in range(n)]
            mixed = run(llm, prompts, chosen, new_tokens)
            one_by_one = merged(llm, prompts, chosen, names[:count], new_tokens)
            result["adapters"][count] = {"tokens_per_s": mixed, "vs_base": mixed / base,
                                         "merged_one_by_one_tokens_per_s": one_by_one,
                                         "vs_merged": mixed / one_by_one}
            print(f"{count:>2} adapters: {mixed:7.1f} tokens/s = {mixed / base:.2f}x base (target >= 0.7 at 32); "
                  f"merged one adapter at a time {one_by_one:7.1f} -> {mixed / one_by_one:.2f}x")
        # More adapters than slots: a quarter of them resident at a time, the rest swapped in from
        # host memory as their requests' turn comes.
        count, slots = max(counts), max(counts) // 4
        pooled = LLM(model_dir, max_loras=slots, **options)
        chosen = [names[i % count] for i in range(n)]
        run(pooled, prompts[:8], [None] * 8, 4)
        small = run(pooled, prompts, chosen, new_tokens)
        result["pool"] = {"adapters": count, "slots": slots, "tokens_per_s": small, "vs_base": small / base,
                          "vs_all_resident": small / result["adapters"][count]["tokens_per_s"],
                          "swaps": pooled.engine.adapters.swaps}
        print(f"{count} adapters through {slots} slots: {small:7.1f} tokens/s = {small / base:.2f}x base, "
              f"{result['pool']['vs_all_resident']:.2f}x all resident ({pooled.engine.adapters.swaps} swaps)")
    write_result("lora", result, args.quick)


if __name__ == "__main__":
    main()
