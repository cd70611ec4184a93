// CUDA products over packed weights for decode-sized batches (layouts: csrc/cpu/quantized_linear.h):
// one warp per (output feature, input row); lanes stride the input features, so a warp reads 32
// consecutive packed bytes (int8) at a time; each weight is unpacked in registers and never
// written back as fp32. Larger batches go to cuBLAS on the unpacked weight (pyserve/kernels/cuda.py).
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace pyserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kGroup = 32;

template <int Format>
__device__ __forceinline__ float weight_at(const void* w, const __half* scales, long row, int c, int k) {
  if constexpr (Format == 1) {  // bf16 bits
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[row * k + c]) << 16;
    return __uint_as_float(bits);
  } else if constexpr (Format == 2) {  // int8
    return static_cast<const int8_t*>(w)[row * k + c] * __half2float(scales[row * (k / kGroup) + c / kGroup]);
  } else {  // int4: byte j % 16 of the group holds element j in its low nibble, j + 16 in its high one
    const int j = c % kGroup;
    const uint8_t byte = static_cast<const uint8_t*>(w)[row * (k / 2) + (c / kGroup) * 16 + j % 16];
    const int q = j < 16 ? byte & 0x0F : byte >> 4;
    return (q - 8) * __half2float(scales[row * (k / kGroup) + c / kGroup]);
  }
}

template <typename T, int Format>
__global__ void packed_linear_kernel(const T* x, const void* w, const __half* scales, const T* bias, T* out, int n,
                                     int k) {
  const int lane = threadIdx.x % 32;
  const long feature = static_cast<long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const long row = blockIdx.y;
  if (feature >= n) return;
  float acc = 0.0f;
  for (int c = lane; c < k; c += 32) acc += to_float(x[row * k + c]) * weight_at<Format>(w, scales, feature, c, k);
  acc = warp_sum(acc);
  if (lane == 0) out[row * n + feature] = from_float<T>(acc + (bias ? to_float(bias[feature]) : 0.0f));
}

}  // namespace

void quantized_linear(int dtype, uintptr_t x, uintptr_t w, uintptr_t scales, uintptr_t bias, uintptr_t out, int m,
                      int n, int k, int format, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid((n + kWarps - 1) / kWarps, m);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kWarps * 32, 0, s>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const void*>(w),
                                          reinterpret_cast<const __half*>(scales), reinterpret_cast<const T*>(bias),
                                          reinterpret_cast<T*>(out), n, k);
    };
    if (format == 1) launch(packed_linear_kernel<T, 1>);
    else if (format == 2) launch(packed_linear_kernel<T, 2>);
    else if (format == 3) launch(packed_linear_kernel<T, 3>);
    else throw std::invalid_argument("unknown weight format code " + std::to_string(format));
  });
  check(cudaGetLastError(), "quantized_linear");
}

}  // namespace pyserve::cuda
