"""Kernel benchmark: pyserve's kernels against the usual torch / diffusers baselines, in one run.

    python bench/kernel_ops.py            # full CPU table -> bench/results/kernels-cpu.json
    python bench/kernel_ops.py --quick    # a few cases per op, for a smoke run

Each row: {op, case, backend, baseline, ours_ms, baseline_ms, speedup} (+ bandwidth figures for
decode). With a CUDA device the GPU rows go to bench/results/kernels-gpu.json.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pyserve import kernels
from pyserve.engine.diffusion import noise_schedules as schedules
from pyserve.kernels.types import SamplingRow, SamplingTensors

RESULTS = Path(__file__).parent / "results"


def timeit(fn: Callable[[], object], budget_s: float = 0.4, min_runs: int = 3, sync: Callable = lambda: None) -> float:
    """Median milliseconds of fn() over at least min_runs calls and about budget_s seconds."""
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times)


def copy_bandwidth_gbs(device: str = "cpu") -> float:
    """Bytes read plus written per second by a large tensor copy."""
    n = 256 * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ms = timeit(lambda: dst.copy_(src), sync=sync)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def row(op, case, backend, baseline, ours_ms, baseline_ms, **extra):
    r = dict(op=op, case=case, backend=backend, baseline=baseline, ours_ms=round(ours_ms, 4),
             baseline_ms=round(baseline_ms, 4), speedup=round(baseline_ms / ours_ms, 3), **extra)
    print(f"{op:<18} {case:<44} {backend:<6} {ours_ms:>10.3f} {baseline_ms:>10.3f} {r['speedup']:>8.2f}x"
          + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)
    return r


# ---------------------------------------------------------------------------------------------
# Attention


def paged_inputs(batch, ctx, q_len, heads, kv_heads, dim, block, dtype=torch.float32, device="cpu"):
    blocks_per_seq = math.ceil(ctx / block)
    num_blocks = batch * blocks_per_seq
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = perm.view(batch, blocks_per_seq)
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch * q_len, heads, dim, dtype=dtype, device=device)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
    return q, k_cache, v_cache, tables, seq_lens, qsl


def gather_then_sdpa(q, k_cache, v_cache, tables, ctx):
    """The torch baseline for paged decode: gather each sequence's blocks, then SDPA."""
    batch = tables.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    k = k_cache[tables.long()].transpose(1, 2).reshape(batch, kv_heads, -1, dim)[:, :, :ctx]
    v = v_cache[tables.long()].transpose(1, 2).reshape(batch, kv_heads, -1, dim)[:, :, :ctx]
    qb = q.view(batch, -1, heads, dim).transpose(1, 2)
    return F.scaled_dot_product_attention(qb, k, v, enable_gqa=True)


def bench_prefill(quick, device="cpu", backend="cpu", dtype=torch.float32, sync=lambda: None):
    rows = []
    heads = 8
    cases = [(512, 64), (512, 128), (2048, 64), (2048, 128)]
    for length, dim in cases[:2] if quick else cases:
        q, kc, vc, tables, seq_lens, qsl = paged_inputs(1, length, length, heads, heads, dim, 16, dtype, device)
        dense = [torch.randn(1, heads, length, dim, dtype=dtype, device=device) for _ in range(3)]
        base = timeit(lambda: F.scaled_dot_product_attention(*dense, is_causal=True), sync=sync)
        ours_paged = timeit(lambda: kernels.paged_attention(q, kc, vc, tables, seq_lens, qsl, backend=backend),
                            sync=sync)
        ours_dense = timeit(lambda: kernels.dense_attention(*dense, causal=True, backend=backend), sync=sync)
        flops = 4 * heads * length * length * dim / 2  # causal: half of QK^T and PV
        case = f"causal L={length} D={dim} H={heads} {str(dtype)[6:]}"
        rows.append(row("prefill_paged", case, backend, "torch_sdpa", ours_paged, base,
                        gflops=round(flops / ours_paged / 1e6, 1)))
        rows.append(row("prefill_dense", case, backend, "torch_sdpa", ours_dense, base,
                        gflops=round(flops / ours_dense / 1e6, 1)))
    return rows


def bench_encoder(quick, device="cpu", backend="cpu", dtype=torch.float32, sync=lambda: None):
    """Non-causal attention of an encoder batch of mixed lengths (embeddings, rerankers): ours over
    the packed tokens against torch SDPA over the padded batch with a key mask (as transformers'
    BERT runs it), BERT-base heads."""
    rows = []
    heads, dim = 12, 64
    g = torch.Generator().manual_seed(0)
    cases = [(32, 16, 256), (32, 128, 512), (1, 512, 512)]
    for batch, shortest, longest in cases[:2] if quick else cases:
        lengths = torch.randint(shortest, longest + 1, (batch,), generator=g).tolist()
        total = sum(lengths)
        q, k, v = (torch.randn(total, heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        width = max(lengths)
        padded = [torch.zeros(batch, heads, width, dim, dtype=dtype, device=device) for _ in range(3)]
        for i, (start, n) in enumerate(zip(cu.tolist(), lengths)):
            for p, x in zip(padded, (q, k, v)):
                p[i, :, :n] = x[start:start + n].transpose(0, 1)
        mask = (torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])
        mask = mask[:, None, None, :]
        base = timeit(lambda: F.scaled_dot_product_attention(*padded, attn_mask=mask), sync=sync)
        ours = timeit(lambda: kernels.varlen_attention(q, k, v, cu, max_seqlen=width, backend=backend), sync=sync)
        flops = 4 * heads * sum(n * n for n in lengths) * dim
        case = f"{batch} seqs L={shortest}-{longest} D={dim} H={heads} {str(dtype)[6:]}"
        rows.append(row("encoder_varlen", case, backend, "sdpa_padded", ours, base,
                        gflops=round(flops / ours / 1e6, 1), padded_fraction=round(1 - total / (batch * width), 3)))
    return rows


def bench_decode(quick, copy_gbs, device="cpu", backend="cpu", dtype=torch.float32, sync=lambda: None):
    rows = []
    heads, kv_heads, dim, block = 32, 8, 128, 16
    cases = [(1, 512), (1, 2048), (1, 8192), (8, 2048), (8, 8192), (64, 512), (64, 2048)]
    for batch, ctx in cases[:3] if quick else cases:
        q, kc, vc, tables, seq_lens, qsl = paged_inputs(batch, ctx, 1, heads, kv_heads, dim, block, dtype, device)
        base = timeit(lambda: gather_then_sdpa(q, kc, vc, tables, ctx), sync=sync)
        ours = timeit(lambda: kernels.paged_attention(q, kc, vc, tables, seq_lens, qsl, backend=backend), sync=sync)
        kv_bytes = 2 * batch * ctx * kv_heads * dim * kc.element_size()
        gbs = kv_bytes / (ours * 1e-3) / 1e9
        rows.append(row("paged_decode", f"batch={batch} ctx={ctx} H={heads}/{kv_heads} D={dim}", backend,
                        "gather+sdpa", ours, base, gb_per_s=round(gbs, 1),
                        pct_of_copy_bw=round(100 * gbs / copy_gbs, 1)))
    return rows


# ---------------------------------------------------------------------------------------------
# Sampling


def sort_based_sampler(logits, prompt, output, top_k, top_p, rep, pres, freq, gen):
    """The usual logits-processor chain: penalties, temperature, top-k, top-p by full sort, multinomial."""
    x = logits.clone()
    if rep != 1.0:
        seen = torch.cat([prompt, output], dim=1)
        picked = x.gather(1, seen)
        x.scatter_(1, seen, torch.where(picked > 0, picked / rep, picked * rep))
    if pres or freq:
        counts = torch.zeros_like(x).scatter_add_(1, output, torch.ones_like(output, dtype=x.dtype))
        x = x - freq * counts - pres * (counts > 0).to(x.dtype)
    kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, idx = torch.sort(x, descending=False, dim=-1)
    cum = sorted_x.softmax(-1).cumsum(-1)
    remove = cum <= 1 - top_p
    remove[:, -1] = False
    x = x.scatter(1, idx, sorted_x.masked_fill(remove, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1, generator=gen)


def bench_sampling(quick, device="cpu", backend="cpu", sync=lambda: None):
    rows = []
    batches = [1, 8, 64]
    vocabs = [32000, 128256, 151936]
    for vocab in vocabs[:1] if quick else vocabs:
        for batch in batches[::2] if quick else batches:
            for penalties in (False, True):
                logits = torch.randn(batch, vocab, device=device) * 4
                prompt = torch.randint(0, vocab, (batch, 256), device=device)
                output = torch.randint(0, vocab, (batch, 64), device=device)
                rep, pres, freq = (1.1, 0.5, 0.5) if penalties else (1.0, 0.0, 0.0)
                params = SamplingTensors.from_rows([
                    SamplingRow(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=rep, presence_penalty=pres,
                                frequency_penalty=freq, seed=i, step=7,
                                prompt_tokens=prompt[i].tolist() if penalties else (),
                                output_tokens=output[i].tolist() if penalties else ())
                    for i in range(batch)], device)
                gen = torch.Generator(device=device).manual_seed(0)
                base = timeit(lambda: sort_based_sampler(logits, prompt, output, 50, 0.9, rep, pres, freq, gen),
                              sync=sync)
                ours = timeit(lambda: kernels.sample(logits, params, backend=backend), sync=sync)
                case = f"batch={batch} vocab={vocab} top_k=50 top_p=0.9" + (" +penalties" if penalties else "")
                rows.append(row("sampling", case, backend, "sort_chain", ours, base))
    return rows


def bench_masked_sampling(quick, device="cpu", backend="cpu", sync=lambda: None):
    """Structured output's cost in the sampler: every row masked (random bits) vs no mask."""
    rows = []
    for batch, vocab in [(64, 128256)] if quick else [(8, 32000), (64, 32000), (64, 128256)]:
        logits = torch.randn(batch, vocab, device=device) * 3
        params = SamplingTensors.from_rows([SamplingRow(temperature=0.8, seed=i) for i in range(batch)], device)
        bits = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32, device=device)
        masked = params.with_allowed(bits, torch.arange(batch, dtype=torch.int32, device=device))
        plain = timeit(lambda: kernels.sample(logits, params, backend=backend), sync=sync)
        ours = timeit(lambda: kernels.sample(logits, masked, backend=backend), sync=sync)
        rows.append(row("sampling_masked", f"batch={batch} vocab={vocab} every row masked", backend, "unmasked",
                        ours, plain))
    return rows


# ---------------------------------------------------------------------------------------------
# Linear layers over packed weights


def bench_linear(quick, copy_gbs, device="cpu", backend="cpu", dtype=torch.float32, sync=lambda: None):
    """Decode-sized products: each packed format against torch's product on the unpacked weight, with
    the bytes the packed weight reads per call as a share of the measured copy bandwidth."""
    rows = []
    # Weights larger than the last-level cache, so each call reads memory, as a decode step does.
    for n, k in [(14336, 4096)] if quick else [(14336, 4096), (4096, 14336)]:
        w = torch.randn(n, k, device=device) * 0.02
        dense = w.to(dtype)
        for m in (1, 8, 64):  # 64: a decode step under load
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = timeit(lambda: torch.nn.functional.linear(x, dense), sync=sync)
            for fmt in kernels.WEIGHT_FORMATS:
                packed = kernels.quantize(w, fmt)
                ours = timeit(lambda: kernels.linear(x, packed, backend=backend), sync=sync)
                gbs = packed.nbytes / (ours * 1e-3) / 1e9
                rows.append(row("linear", f"{fmt} m={m} {n}x{k}", backend, f"torch_{str(dtype)[6:]}", ours, base,
                                gb_s=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1)))
    return rows


# ---------------------------------------------------------------------------------------------
# Denoising


SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, steps_offset=1, set_alpha_to_one=False, timestep_spacing="linspace")
DIFFUSERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
             "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def bench_denoise(quick, device="cpu", backend="cpu", sync=lambda: None):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # step() without scale_model_input() is intended here
    rows = []
    steps, index, guidance = 30, 10, 7.5
    for name, cls_name in DIFFUSERS.items():
        for batch in ((1, 16) if quick else (1, 4, 16)):
            shape = (batch, 4, 64, 64)
            x, cond, uncond, prev = (torch.randn(shape, device=device) for _ in range(4))
            theirs = getattr(diffusers, cls_name).from_config(SD_CONFIG)
            theirs.set_timesteps(steps, device=device)
            t = theirs.timesteps[index]
            kwargs = {"eta": 1.0} if name == "ddim" else {}
            ours_sched = (schedules.DDIM(SD_CONFIG, steps, eta=1.0) if name == "ddim"
                          else schedules.NOISE_SCHEDULES[name](SD_CONFIG, steps))
            coef = torch.tensor([ours_sched.coefficients(index, guidance)] * batch, device=device)
            seed = torch.arange(batch, device=device)
            step = torch.full((batch,), index, device=device)

            def baseline():
                theirs._step_index = index
                if name == "dpmpp_2m":
                    theirs.model_outputs = [prev, prev]
                    theirs.lower_order_nums = 1
                guided = uncond + guidance * (cond - uncond)
                return theirs.step(guided, t, x, **kwargs).prev_sample

            base = timeit(baseline, sync=sync)
            ours = timeit(lambda: kernels.denoise_step(x, cond, coef, seed, step, uncond=uncond,
                                                       prev_x0=prev if ours_sched.uses_prev_x0 else None,
                                                       backend=backend), sync=sync)
            rows.append(row("denoise_step", f"{name} batch={batch} 4x64x64 cfg", backend, "diffusers_step", ours,
                            base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases per op")
    parser.add_argument("--ops", default="prefill,encoder,decode,sampling,denoise,linear")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU rows (scripts/gpu-check.sh)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go")
    args = parser.parse_args()
    ops = args.ops.split(",")
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.gpu_only:
        bench_cpu(args, ops)
    if torch.cuda.is_available():
        bench_gpu(args, ops)


def matmul_peak_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    """The card's dense matmul rate in this dtype, measured: the ceiling attention is held against."""
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda") for _ in range(2))
    ms = timeit(lambda: a @ b, sync=torch.cuda.synchronize)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_cpu(args, ops) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    copy_gbs = copy_bandwidth_gbs()
    print(f"measured CPU copy bandwidth: {copy_gbs:.1f} GB/s (read + write)")
    print(f"{'op':<18} {'case':<44} {'backend':<6} {'ours_ms':>10} {'base_ms':>10} {'speedup':>9}")
    rows = []
    if "prefill" in ops:
        rows += bench_prefill(args.quick)
    if "encoder" in ops:
        rows += bench_encoder(args.quick)
    if "decode" in ops:
        rows += bench_decode(args.quick, copy_gbs)
    if "sampling" in ops:
        rows += bench_sampling(args.quick) + bench_masked_sampling(args.quick)
    if "denoise" in ops:
        rows += bench_denoise(args.quick)
    if "linear" in ops:
        rows += bench_linear(args.quick, copy_gbs)
    out = args.results / "kernels-cpu.json"
    out.write_text(json.dumps(dict(copy_bandwidth_gbs=round(copy_gbs, 1), threads=torch.get_num_threads(),
                                   rows=rows), indent=1))
    print(f"wrote {out}")


def bench_gpu(args, ops) -> None:
    sync = torch.cuda.synchronize
    gpu_copy = copy_bandwidth_gbs("cuda")
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {gpu_copy:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s (measured)")
    rows = []
    for backend in [b for b in ("cuda", "triton") if b in kernels.available()]:
        if "prefill" in ops:
            prefill = bench_prefill(args.quick, "cuda", backend, torch.bfloat16, sync)
            for r in prefill:
                r["pct_of_bf16_peak"] = round(100 * r["gflops"] / 1e3 / peak, 2)
            rows += prefill
        if "encoder" in ops:
            rows += bench_encoder(args.quick, "cuda", backend, torch.bfloat16, sync)
        if "decode" in ops:
            rows += bench_decode(args.quick, gpu_copy, "cuda", backend, torch.bfloat16, sync)
        if "sampling" in ops:
            rows += bench_sampling(args.quick, "cuda", backend, sync)
            rows += bench_masked_sampling(args.quick, "cuda", backend, sync)
        if "denoise" in ops:
            rows += bench_denoise(args.quick, "cuda", backend, sync)
        if "linear" in ops:
            rows += bench_linear(args.quick, gpu_copy, "cuda", backend, torch.bfloat16, sync)
    out = args.results / "kernels-gpu.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bandwidth_gbs=round(gpu_copy, 1),
                                   bf16_matmul_tflops=round(peak, 1), rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
