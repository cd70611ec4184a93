// CPU matrix-vector products for decode-sized batches: y[m] = W x[m] + b (fp32).
#pragma once

namespace pyserve::cpu {

constexpr int kMaxLinearRows = 8;  // rows in registers at once; more rows take more passes

struct LinearArgs {
  const float* x;     // [M, K]
  const float* w;     // [N, K]
  const float* bias;  // [N] or null
  float* out;         // [M, N]
  int m, n, k;
};

void linear(const LinearArgs& args);

}  // namespace pyserve::cpu
