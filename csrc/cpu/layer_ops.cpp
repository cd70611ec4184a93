// Per-layer elementwise steps of a decoder (see layer_ops.h). Rows run in parallel only when
// there are enough of them to repay waking the thread team: a decode step's rows are done by the
// calling thread alone.
#include "cpu/layer_ops.h"

#include <cmath>

#include "cpu/vec.h"

namespace pyserve::cpu {
namespace {

constexpr long kParallelFloats = 1 << 16;  // below this much work a row loop stays on one thread

}  // namespace

void rms_norm(const float* x, const float* residual, const float* weight, float* out, float* residual_out, int rows,
              int dim, float eps) {
#pragma omp parallel for if (static_cast<long>(rows) * dim >= kParallelFloats)
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<long>(r) * dim;
    float* o = out + static_cast<long>(r) * dim;
    float* h = residual_out ? residual_out + static_cast<long>(r) * dim : o;
    float sum = 0.0f;
    if (residual) {
      const float* rr = residual + static_cast<long>(r) * dim;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < dim; ++i) {
        h[i] = xr[i] + rr[i];
        sum += h[i] * h[i];
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < dim; ++i) {
        h[i] = xr[i];
        sum += xr[i] * xr[i];
      }
    }
    const float scale = 1.0f / std::sqrt(sum / dim + eps);
#pragma omp simd
    for (int i = 0; i < dim; ++i) o[i] = h[i] * scale * weight[i];
  }
}

void rotary(float* x, const float* cos, const float* sin, int rows, long row_stride, int rotated_heads,
            int head_dim) {
  const int half = head_dim / 2;
#pragma omp parallel for if (static_cast<long>(rows) * rotated_heads * head_dim >= kParallelFloats)
  for (int r = 0; r < rows; ++r) {
    const float* c = cos + static_cast<long>(r) * half;
    const float* s = sin + static_cast<long>(r) * half;
    for (int head = 0; head < rotated_heads; ++head) {
      float* a = x + r * row_stride + static_cast<long>(head) * head_dim;
      float* b = a + half;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = b[i];
        a[i] = x1 * c[i] - x2 * s[i];
        b[i] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

void silu_mul(const float* x, float* out, int rows, int n) {
#pragma omp parallel for if (static_cast<long>(rows) * n >= kParallelFloats)
  for (int r = 0; r < rows; ++r) {
    const float* gate = x + static_cast<long>(r) * 2 * n;
    const float* up = gate + n;
    float* o = out + static_cast<long>(r) * n;
    int i = 0;
#ifdef PYSERVE_AVX2  // std::exp does not vectorise without fast-math; exp256 does (prefill rows are many)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), top = _mm256_set1_ps(87.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      // exp256 takes arguments up to 87 (beyond, sigmoid is 0 to fp32 precision anyway)
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_min_ps(_mm256_sub_ps(zero, g), top))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

}  // namespace pyserve::cpu
