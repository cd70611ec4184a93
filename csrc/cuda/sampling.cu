// CUDA fused sampler, one thread block per row (the same algorithm as the Triton kernel):
// penalties and bias scattered into per-row buffers, top-k / top-p thresholds by bisection over
// order-preserving integer keys of the logits (no sort), and an inverse-CDF draw in token order.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "philox.h"

namespace pyserve::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Every thread gets op over the block. `sh` holds kWarpsPerBlock values.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V* sh) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  v = sh[0];
  for (int w = 1; w < kWarpsPerBlock; ++w) v = op(v, sh[w]);
  __syncthreads();
  return v;
}

// Inclusive prefix sum over the block in thread order; `total` gets the block's sum.
__device__ float block_scan(float v, float* sh, float* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 1; o < 32; o <<= 1) {
    float up = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += up;
  }
  if (lane == 31) sh[warp] = v;
  __syncthreads();
  float before = 0.0f, all = 0.0f;
  for (int w = 0; w < kWarpsPerBlock; ++w) {
    if (w < warp) before += sh[w];
    all += sh[w];
  }
  __syncthreads();
  *total = all;
  return v + before;
}

struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct SumF { __device__ float operator()(float a, float b) const { return a + b; } };
struct SumI { __device__ int operator()(int a, int b) const { return a + b; } };
struct MinI { __device__ int operator()(int a, int b) const { return min(a, b); } };
struct MaxI { __device__ int operator()(int a, int b) const { return max(a, b); } };

__device__ __forceinline__ long long order_key(float x) {
  int bits = __float_as_int(x);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

__global__ void scatter_kernel(const int* tokens, const int* offsets, const float* values, float* dst, int vocab,
                               int mode) {
  const int row = blockIdx.x;
  for (int i = offsets[row] + threadIdx.x; i < offsets[row + 1]; i += blockDim.x) {
    float* d = dst + static_cast<long>(row) * vocab + tokens[i];
    if (mode == 0) *d = 1.0f;                   // seen
    else if (mode == 1) atomicAdd(d, 1.0f);     // count
    else atomicAdd(d, values[i]);               // bias
  }
}

struct RowParams {
  const float *temperature, *top_p, *min_p, *repetition, *presence, *frequency;
  const int* top_k;
  const int64_t *seed, *step;
  const unsigned* allowed_bits;  // [M, ceil(V / 32)] packed masks, or null
  const int* allowed_row;        // [B]: -1 for an unmasked row; null when no row is masked
};

template <typename T>
__global__ void sample_kernel(const T* logits, float* x_all, const float* seen_all, const float* count_all,
                              const float* bias_all, int vocab, long row_stride, RowParams p, int num_logprobs,
                              int64_t* tokens, float* logprobs, int64_t* top_tokens, float* top_logprobs) {
  __shared__ float shf[kWarpsPerBlock];
  __shared__ int shi[kWarpsPerBlock];
  const int row = blockIdx.x;
  const T* src = logits + row * row_stride;
  const long base = static_cast<long>(row) * vocab;
  float* x = x_all + base;
  const float rep = p.repetition[row], pres = p.presence[row], freq = p.frequency[row];
  const int mask_row = p.allowed_row ? p.allowed_row[row] : -1;
  const unsigned* allowed = mask_row >= 0 ? p.allowed_bits + static_cast<long>(mask_row) * ((vocab + 31) / 32) : nullptr;

  float raw_max = -INFINITY, x_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float raw = to_float(src[i]);
    float v = seen_all[base + i] > 0.0f ? (raw > 0.0f ? raw / rep : raw * rep) : raw;
    const float count = count_all[base + i];
    v = v - freq * count - (count > 0.0f ? pres : 0.0f) + bias_all[base + i];
    if (allowed && !((allowed[i >> 5] >> (i & 31)) & 1u)) v = -INFINITY;
    if (isnan(v)) v = -INFINITY;  // never chosen: a NaN maximum would leave the greedy token at vocab
    x[i] = v;
    raw_max = fmaxf(raw_max, raw);
    x_max = fmaxf(x_max, v);
  }
  raw_max = block_reduce(raw_max, MaxOp(), shf);
  x_max = block_reduce(x_max, MaxOp(), shf);
  float raw_sum = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += kThreads) raw_sum += __expf(to_float(src[i]) - raw_max);
  const float raw_lse = raw_max + __logf(block_reduce(raw_sum, SumF(), shf));

  int token;
  const float temp = p.temperature[row];
  if (temp <= 0.0f) {
    int best = vocab;
    for (int i = threadIdx.x; i < vocab; i += kThreads)
      if (x[i] == x_max) best = min(best, i);
    token = block_reduce(best, MinI(), shi);
  } else {
    const float inv_t = 1.0f / temp;
    long long thr = -(1LL << 31);
    const int k = p.top_k[row];
    if (k > 0 && k < vocab) {  // largest key K with count(x >= K) >= k
      long long lo = order_key(-3.4e38f), hi = order_key(x_max) + 1;
      while (hi - lo > 1) {
        const long long mid = lo + (hi - lo) / 2;
        int cnt = 0;
        for (int i = threadIdx.x; i < vocab; i += kThreads) cnt += order_key(x[i]) >= mid;
        if (block_reduce(cnt, SumI(), shi) >= k) lo = mid; else hi = mid;
      }
      thr = lo;
    }
    const float top_p = p.top_p[row];
    if (top_p < 1.0f) {  // smallest key K with mass(x > K) < top_p * total
      float total = 0.0f;
      for (int i = threadIdx.x; i < vocab; i += kThreads)
        if (order_key(x[i]) >= thr) total += __expf((x[i] - x_max) * inv_t);
      total = block_reduce(total, SumF(), shf);
      long long lo = max(thr - 1, order_key(-3.4e38f) - 1), hi = order_key(x_max);
      while (hi - lo > 1) {
        const long long mid = lo + (hi - lo) / 2;
        float mass = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += kThreads) {
          const long long key = order_key(x[i]);
          if (key > mid && key >= thr) mass += __expf((x[i] - x_max) * inv_t);
        }
        if (block_reduce(mass, SumF(), shf) < top_p * total) hi = mid; else lo = mid;
      }
      thr = max(thr, hi);
    }
    const float min_p = p.min_p[row];
    if (min_p > 0.0f) thr = max(thr, order_key(x_max + __logf(min_p) * temp));
    float total = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += kThreads)
      if (order_key(x[i]) >= thr) total += __expf((x[i] - x_max) * inv_t);
    total = block_reduce(total, SumF(), shf);
    const float target =
        uniform(static_cast<uint64_t>(p.seed[row]), static_cast<uint32_t>(p.step[row]), 0, kSampleStream) * total;
    float cdf = 0.0f;
    int found = vocab, last_kept = 0;
    for (int start = 0; start < vocab; start += kThreads) {
      const int i = start + threadIdx.x;
      const bool kept = i < vocab && order_key(x[i]) >= thr;
      float chunk;
      const float run = cdf + block_scan(kept ? __expf((x[i] - x_max) * inv_t) : 0.0f, shf, &chunk);
      if (kept && run > target) found = min(found, i);
      if (kept) last_kept = i;
      cdf += chunk;
    }
    found = block_reduce(found, MinI(), shi);
    last_kept = block_reduce(last_kept, MaxI(), shi);
    token = found < vocab ? found : last_kept;
  }
  if (threadIdx.x == 0) {
    tokens[row] = token;
    logprobs[row] = to_float(src[token]) - raw_lse;
  }

  // Top-n raw logprobs: the best entry ordered strictly after the previous one, n times.
  float prev_val = INFINITY;
  int prev_idx = -1;
  for (int n = 0; n < num_logprobs; ++n) {
    float best = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float raw = to_float(src[i]);
      if (raw < prev_val || (raw == prev_val && i > prev_idx)) best = fmaxf(best, raw);
    }
    best = block_reduce(best, MaxOp(), shf);
    int idx = vocab;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float raw = to_float(src[i]);
      if (raw == best && (raw < prev_val || i > prev_idx)) idx = min(idx, i);
    }
    idx = block_reduce(idx, MinI(), shi);
    if (threadIdx.x == 0) {
      top_tokens[static_cast<long>(row) * num_logprobs + n] = idx;
      top_logprobs[static_cast<long>(row) * num_logprobs + n] = best - raw_lse;
    }
    prev_val = best;
    prev_idx = idx;
  }
}

}  // namespace

void sample(int dtype, uintptr_t logits, uintptr_t scratch, int batch, int vocab, long row_stride,
            uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t repetition,
            uintptr_t presence, uintptr_t frequency, uintptr_t seed, uintptr_t step, uintptr_t prompt,
            uintptr_t prompt_off, uintptr_t output, uintptr_t output_off, uintptr_t bias_tok, uintptr_t bias_off,
            uintptr_t bias_val, uintptr_t allowed_bits, uintptr_t allowed_row, int num_logprobs, uintptr_t tokens, uintptr_t logprobs, uintptr_t top_tokens,
            uintptr_t top_logprobs, uintptr_t stream) {
  if (batch == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // scratch: four zeroed [batch, vocab] float buffers: processed logits, seen, counts, bias.
  float* x = reinterpret_cast<float*>(scratch);
  const long plane = static_cast<long>(batch) * vocab;
  float *seen = x + plane, *counts = x + 2 * plane, *bias = x + 3 * plane;
  auto ints = [](uintptr_t a) { return reinterpret_cast<const int*>(a); };
  auto floats = [](uintptr_t a) { return reinterpret_cast<const float*>(a); };
  scatter_kernel<<<batch, 128, 0, s>>>(ints(prompt), ints(prompt_off), nullptr, seen, vocab, 0);
  scatter_kernel<<<batch, 128, 0, s>>>(ints(output), ints(output_off), nullptr, seen, vocab, 0);
  scatter_kernel<<<batch, 128, 0, s>>>(ints(output), ints(output_off), nullptr, counts, vocab, 1);
  scatter_kernel<<<batch, 128, 0, s>>>(ints(bias_tok), ints(bias_off), floats(bias_val), bias, vocab, 2);
  RowParams params{floats(temperature), floats(top_p), floats(min_p), floats(repetition), floats(presence),
                   floats(frequency), ints(top_k), reinterpret_cast<const int64_t*>(seed),
                   reinterpret_cast<const int64_t*>(step), reinterpret_cast<const unsigned*>(allowed_bits),
                   ints(allowed_row)};
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sample_kernel<T><<<batch, kThreads, 0, s>>>(
        reinterpret_cast<const T*>(logits), x, seen, counts, bias, vocab, row_stride, params, num_logprobs,
        reinterpret_cast<int64_t*>(tokens), reinterpret_cast<float*>(logprobs),
        reinterpret_cast<int64_t*>(top_tokens), reinterpret_cast<float*>(top_logprobs));
  });
  check(cudaGetLastError(), "sample");
}

}  // namespace pyserve::cuda
