"""Offline throughput: pyserve's engine vs transformers `generate` (static padded batches), same run.

    python bench/llm_throughput.py              # 128 requests on a ~100M-parameter Llama, fp32 CPU
    python bench/llm_throughput.py --requests 16 --quick

Writes bench/results/llm-throughput.json: output tokens/s of both and their ratio, plus batch-1
decode tokens/s x model bytes against the machine's measured copy bandwidth.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import train_tokenizer  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ops import copy_bandwidth_gbs  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_checkpoint(out: Path, quick: bool) -> Path:
    train_tokenizer(out)
    return save_benchmark_llama(out, quick)


def save_benchmark_llama(out: Path, quick: bool, vocab_size: int = 32000) -> Path:
    """The ~100M-parameter benchmark Llama (4 layers with `quick`), random weights, into `out`."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048,
                                   num_hidden_layers=4 if quick else 10, num_attention_heads=12,
                                   num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=0,
                                   eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def workload(n: int, seed: int = 0, quick: bool = False) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    hi_prompt, hi_out = (128, 64) if quick else (512, 256)
    return [([0] + [rng.randrange(3, 32000) for _ in range(rng.randint(32, hi_prompt) - 1)], rng.randint(16, hi_out))
            for _ in range(n)]


def run_pyserve(model_dir: Path, reqs, device: str = "cpu", dtype=None, **options) -> tuple[float, int, LLM]:
    llm = LLM(model_dir, device=device, dtype=dtype, kv_cache_memory=2 * 2**30, max_num_seqs=128,
              max_num_batched_tokens=1024, **options)
    params = [SamplingParams(max_tokens=out, temperature=0, ignore_eos=True) for _, out in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.token_ids) for o in outs), llm


def run_transformers(model_dir: Path, reqs, batch_size: int, device: str = "cpu",
                     dtype=torch.float32) -> tuple[float, int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    useful = 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        longest = max(out for _, out in batch)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                           min_new_tokens=longest,
                           do_sample=False, pad_token_id=2)
        useful += sum(out for _, out in batch)
    return time.perf_counter() - t0, useful


def batch1_decode(llm: LLM) -> float:
    prompt = [0] + list(range(3, 34))
    times = []
    for n in (1, 129):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        times.append(time.perf_counter() - t0)
    return 128 / (times[1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smaller model and shorter requests")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on cpu, bf16 on cuda)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON file goes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp), args.quick)
        reqs = workload(args.requests, quick=args.quick)
        ours_s, ours_tokens, llm = run_pyserve(model_dir, reqs, args.device, dtype)
        params = sum(p.numel() for p in llm.engine.model.module.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.module.parameters())
        print(f"model: {params / 1e6:.1f}M parameters, {model_bytes / 2**20:.0f} MiB {str(dtype)[6:]} on {args.device}")
        print(f"pyserve: {ours_tokens} tokens in {ours_s:.1f}s = {ours_tokens / ours_s:.1f} tok/s")
        decode_tps = batch1_decode(llm)
        del llm
        hf_s, hf_tokens = run_transformers(model_dir, reqs, args.hf_batch_size, args.device, dtype)
        print(f"transformers: {hf_tokens} tokens in {hf_s:.1f}s = {hf_tokens / hf_s:.1f} tok/s")
    copy_gbs = copy_bandwidth_gbs(args.device)
    achieved = decode_tps * model_bytes / 1e9
    result = dict(model_params=params, model_bytes=model_bytes, requests=args.requests, quick=args.quick,
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", dtype=str(dtype)[6:],
                  pyserve_tokens_per_s=round(ours_tokens / ours_s, 2), pyserve_seconds=round(ours_s, 2),
                  transformers_tokens_per_s=round(hf_tokens / hf_s, 2), transformers_seconds=round(hf_s, 2),
                  throughput_ratio=round((ours_tokens / ours_s) / (hf_tokens / hf_s), 3),
                  batch1_decode_tokens_per_s=round(decode_tps, 2), batch1_weight_gb_per_s=round(achieved, 2),
                  copy_bandwidth_gbs=round(copy_gbs, 1), batch1_pct_of_copy_bw=round(100 * achieved / copy_gbs, 1))
    print(json.dumps(result, indent=1))
    args.results.mkdir(parents=True, exist_ok=True)
    name = "llm-throughput" + ("-cuda" if args.device == "cuda" else "") + ("-quick" if args.quick else "")
    out = args.results / f"{name}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
