// CUDA batched LoRA (see pyserve.kernels.lora): shrink with one block per row (a warp per rank
// entry in turn: lanes stride the input), then expand with one thread per output column of a row.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace pyserve::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void shrink_kernel(const T* x, const T* a, const int* index, const int* rank, const float* scale,
                              float* shrunk, int k, int max_rank) {
  const int t = blockIdx.x, i = index[t];
  if (i < 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rank[i]; r += kThreads / 32) {
    const T* row = a + (static_cast<long>(i) * max_rank + r) * k;
    float sum = 0.0f;
    for (int c = lane; c < k; c += 32) sum += to_float(row[c]) * to_float(x[static_cast<long>(t) * k + c]);
    sum = warp_sum(sum);
    if (lane == 0) shrunk[static_cast<long>(t) * max_rank + r] = sum * scale[i];
  }
}

template <typename T>
__global__ void expand_kernel(T* y, const T* b, const int* index, const int* rank, const float* shrunk, int n,
                              int max_rank) {
  const int t = blockIdx.x, i = index[t];
  const long col = static_cast<long>(blockIdx.y) * kThreads + threadIdx.x;
  if (i < 0 || col >= n) return;
  const T* row = b + (static_cast<long>(i) * n + col) * max_rank;
  const float* s = shrunk + static_cast<long>(t) * max_rank;
  float sum = 0.0f;
  for (int r = 0; r < rank[i]; ++r) sum += to_float(row[r]) * s[r];
  T* out = y + static_cast<long>(t) * n + col;
  *out = from_float<T>(to_float(*out) + sum);
}

}  // namespace

void lora(int dtype, uintptr_t y, uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t index, uintptr_t rank,
          uintptr_t scale, uintptr_t shrunk, int tokens, int n, int k, int max_rank, uintptr_t stream) {
  if (tokens == 0 || n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto ints = [](uintptr_t p) { return reinterpret_cast<const int*>(p); };
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    shrink_kernel<T><<<tokens, kThreads, 0, s>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(a),
                                                 ints(index), ints(rank), reinterpret_cast<const float*>(scale),
                                                 reinterpret_cast<float*>(shrunk), k, max_rank);
    expand_kernel<T><<<dim3(tokens, (n + kThreads - 1) / kThreads), kThreads, 0, s>>>(
        reinterpret_cast<T*>(y), reinterpret_cast<const T*>(b), ints(index), ints(rank),
        reinterpret_cast<const float*>(shrunk), n, max_rank);
  });
  check(cudaGetLastError(), "lora");
}

}  // namespace pyserve::cuda
