// See lora.h. Rows are independent; each shrinks its input to the adapter's rank (a few dot
// products of length K), then expands back over N. Decode batches are small, so the expand is
// also split over output columns when there are few rows.
#include "cpu/lora.h"

#include <vector>

namespace pyserve::cpu {

void lora(const LoraArgs& a) {
  std::vector<float> shrunk(static_cast<long>(a.tokens) * a.max_rank);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < a.tokens; ++t) {
    const int i = a.index[t];
    if (i < 0) continue;
    const float* x = a.x + static_cast<long>(t) * a.k;
    for (int r = 0; r < a.rank[i]; ++r) {
      const float* row = a.a + (static_cast<long>(i) * a.max_rank + r) * a.k;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int c = 0; c < a.k; ++c) sum += row[c] * x[c];
      shrunk[static_cast<long>(t) * a.max_rank + r] = sum * a.scale[i];
    }
  }
  constexpr int kColumns = 256;  // output columns a task expands
  const int blocks = (a.n + kColumns - 1) / kColumns;
#pragma omp parallel for collapse(2) schedule(static)
  for (int t = 0; t < a.tokens; ++t)
    for (int blk = 0; blk < blocks; ++blk) {
      const int i = a.index[t];
      if (i < 0) continue;
      const float* s = shrunk.data() + static_cast<long>(t) * a.max_rank;
      float* y = a.y + static_cast<long>(t) * a.n;
      const int end = (blk + 1) * kColumns < a.n ? (blk + 1) * kColumns : a.n;
      for (int col = blk * kColumns; col < end; ++col) {
        const float* row = a.b + (static_cast<long>(i) * a.n + col) * a.max_rank;
        float sum = 0.0f;
        for (int r = 0; r < a.rank[i]; ++r) sum += row[r] * s[r];
        y[col] += sum;
      }
    }
}

}  // namespace pyserve::cpu
