// Decode-time linear layers are matrix-vector products bound by reading the weights once; BLAS
// GEMV reaches about half the machine's read bandwidth here, so this streams each weight row
// through AVX2 for up to eight input rows at once, with the rows split among threads.
#include "cpu/linear.h"

#include <cmath>

#include "cpu/vec.h"

namespace pyserve::cpu {
namespace {

#ifdef PYSERVE_AVX2
// The sums of G <= 4 input rows with one weight row. Every row's sum is made the same way,
// whatever G and whatever the call's M: two interleaved 8-wide chains (one chain waits on each
// FMA's latency), an 8-wide step into the first, the scalar tail. So a row's result never
// depends on how many rows share its call (batch invariance), and four rows' eight accumulators
// fit AVX2's sixteen registers.
template <int G>
inline void group_sums(const float* x, long k, const float* w, float* sums) {
  __m256 acc[G][2];
  for (int i = 0; i < G; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  long c = 0;
  for (; c + 16 <= k; c += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + c), w1 = _mm256_loadu_ps(w + c + 8);
    for (int i = 0; i < G; ++i) {
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + c), w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + c + 8), w1, acc[i][1]);
    }
  }
  if (c + 8 <= k) {
    const __m256 w0 = _mm256_loadu_ps(w + c);
    for (int i = 0; i < G; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + c), w0, acc[i][0]);
    c += 8;
  }
  for (int i = 0; i < G; ++i) {
    sums[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
    // fused on purpose: left to the compiler, the tail may be contracted in one instantiation
    // and not in another, and the rows' results would differ by G after all
    for (long t = c; t < k; ++t) sums[i] = std::fma(x[i * k + t], w[t], sums[i]);
  }
}
#endif

template <int M>
void rows_times_weights(const LinearArgs& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const float* w = a.w + static_cast<long>(n) * a.k;
    float sums[M];
#ifdef PYSERVE_AVX2
    constexpr int kFirst = M < 4 ? M : 4;  // rows 0-3, then 4-7 over the same (now cached) weight row
    group_sums<kFirst>(a.x, a.k, w, sums);
    if constexpr (M > 4) group_sums<M - 4>(a.x + 4L * a.k, a.k, w, sums + 4);
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
