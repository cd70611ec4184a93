// Decode-time linear layers are matrix-vector products bound by reading the weights once; BLAS
// GEMV reaches about half the machine's read bandwidth here, so this streams each weight row
// through AVX2 for up to eight input rows at once, with the rows split among threads.
#include "cpu/linear.h"

#include "cpu/vec.h"

namespace pyserve::cpu {
namespace {

template <int M>
void rows_times_weights(const LinearArgs& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const float* w = a.w + static_cast<long>(n) * a.k;
    float sums[M];
#ifdef PYSERVE_AVX2
    // Two accumulators for one or two rows: a single chain waits on each FMA's latency.
    constexpr int kChains = M <= 2 ? 2 : 1;
    __m256 acc[M][kChains];
    for (int i = 0; i < M; ++i)
      for (int ch = 0; ch < kChains; ++ch) acc[i][ch] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 * kChains <= a.k; c += 8 * kChains)
      for (int ch = 0; ch < kChains; ++ch) {
        const __m256 wv = _mm256_loadu_ps(w + c + 8 * ch);
        for (int i = 0; i < M; ++i)
          acc[i][ch] = _mm256_fmadd_ps(_mm256_loadu_ps(a.x + static_cast<long>(i) * a.k + c + 8 * ch), wv, acc[i][ch]);
      }
    for (; c + 8 <= a.k; c += 8) {
      const __m256 wv = _mm256_loadu_ps(w + c);
      for (int i = 0; i < M; ++i)
        acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.x + static_cast<long>(i) * a.k + c), wv, acc[i][0]);
    }
    for (int i = 0; i < M; ++i) {
      __m256 total = acc[i][0];
      for (int ch = 1; ch < kChains; ++ch) total = _mm256_add_ps(total, acc[i][ch]);
      sums[i] = hsum(total);
      for (int t = c; t < a.k; ++t) sums[i] += a.x[static_cast<long>(i) * a.k + t] * w[t];
    }
#else
    for (int i = 0; i < M; ++i) sums[i] = dot(a.x + static_cast<long>(i) * a.k, w, a.k);
#endif
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) a.out[static_cast<long>(i) * a.n + n] = sums[i] + b;
  }
}

using RowsFn = void (*)(const LinearArgs&, int, int);
constexpr RowsFn kRows[kMaxLinearRows] = {rows_times_weights<1>, rows_times_weights<2>, rows_times_weights<3>,
                                          rows_times_weights<4>, rows_times_weights<5>, rows_times_weights<6>,
                                          rows_times_weights<7>, rows_times_weights<8>};

}  // namespace

void linear(const LinearArgs& a) {
  // 64 weight rows a task: small enough to stay in cache across passes
  in_row_passes(a, 64, [](const LinearArgs& part, int n0, int n1) { kRows[part.m - 1](part, n0, n1); });
}

}  // namespace pyserve::cpu
