// CUDA fused scheduler step: each thread takes four consecutive elements, one Philox counter.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "denoise_coef.h"
#include "philox.h"

namespace pyserve::cuda {
namespace {


template <typename T>
__global__ void denoise_kernel(const T* x, const T* cond, const T* uncond, const T* prev_x0, const float* coef,
                               const int64_t* seed, const int64_t* step, T* x_next, T* x0_out, long numel) {
  const int row = blockIdx.y;
  const long group = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group * 4 >= numel) return;
  const float* c = coef + row * NUM_COEF;
  float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c[NOISE] != 0.0f)
    normal4(static_cast<uint64_t>(seed[row]), static_cast<uint32_t>(step[row]), static_cast<uint32_t>(group),
            kNoiseStream, z);
  const long base = row * numel;
  for (int lane = 0; lane < 4; ++lane) {
    const long i = group * 4 + lane;
    if (i >= numel) break;
    const long e = base + i;
    float out = to_float(cond[e]);
    if (uncond) {
      const float u = to_float(uncond[e]);
      out = u + c[GUIDANCE] * (out - u);
    }
    const float xv = to_float(x[e]);
    float x0 = c[X0_X] * xv + c[X0_OUT] * out;
    if (c[CLIP] > 0.0f) x0 = fminf(fmaxf(x0, -c[CLIP]), c[CLIP]);
    const float eps = c[EPS_X] * xv + c[EPS_OUT] * out;
    float next = c[NEXT_X] * xv + c[NEXT_X0] * x0 + c[NEXT_EPS] * eps + c[NOISE] * z[lane];
    if (prev_x0) next += c[NEXT_PREV_X0] * to_float(prev_x0[e]);
    x_next[e] = from_float<T>(next);
    x0_out[e] = from_float<T>(x0);
  }
}

}  // namespace

void denoise_step(int dtype, uintptr_t x, uintptr_t cond, uintptr_t uncond, uintptr_t prev_x0, uintptr_t coef,
                  uintptr_t seed, uintptr_t step, uintptr_t x_next, uintptr_t x0, int batch, long numel,
                  uintptr_t stream) {
  if (batch == 0 || numel == 0) return;
  const int threads = 256;
  const dim3 grid((numel / 4 + threads) / threads, batch);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    denoise_kernel<T><<<grid, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(cond), reinterpret_cast<const T*>(uncond),
        reinterpret_cast<const T*>(prev_x0), reinterpret_cast<const float*>(coef),
        reinterpret_cast<const int64_t*>(seed), reinterpret_cast<const int64_t*>(step), reinterpret_cast<T*>(x_next),
        reinterpret_cast<T*>(x0), numel);
  });
  check(cudaGetLastError(), "denoise_step");
}

}  // namespace pyserve::cuda
