// CPU batched LoRA (Punica's BGMV: each row gathers its own adapter), fp32:
//   y[t] += scale[i] * B[i][:, :rank[i]] (A[i][:rank[i]] x[t])   for i = index[t] >= 0.
#pragma once
#include <cstdint>

namespace pyserve::cpu {

struct LoraArgs {
  float* y;              // [T, N], added to in place
  const float* x;        // [T, K]
  const float* a;        // [L, R, K] shrink weights (rows past an adapter's rank unused)
  const float* b;        // [L, N, R] expand weights
  const int32_t* index;  // [T]: the row's adapter, -1 for none
  const int32_t* rank;   // [L]
  const float* scale;    // [L]
  int tokens, n, k, max_rank;
};

void lora(const LoraArgs& args);

}  // namespace pyserve::cpu
