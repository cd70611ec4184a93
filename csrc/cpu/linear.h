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

// The blocking both decode-sized products share: weight rows in chunks of `chunk` split among
// threads, and within a chunk up to kMaxLinearRows input rows a pass (their accumulators live in
// registers); more rows take more passes over the same, now cached, weight rows.
// rows(part, n0, n1) computes part.m <= kMaxLinearRows rows of outputs [n0, n1).
//
// A few input rows make a product bound by reading the weights: each thread streams one
// contiguous share of them (static). More make it bound by arithmetic, and on a machine whose
// cores the server's other threads also use, a thread that loses its core for a while would hold
// the other at the end of every product: threads take chunks as they come free (dynamic). Both
// measured on 2 cores: dynamic costs batch 1 ~10% and gains 64 rows 1.1x to 1.2x under HTTP load.
constexpr int kDynamicFromRows = 2 * kMaxLinearRows;

template <typename Args, typename Rows>
void in_row_passes(const Args& a, int chunk, Rows rows) {
  const int chunks = (a.n + chunk - 1) / chunk;
  auto pass = [&](int c) {
    const int n0 = c * chunk, n1 = n0 + chunk < a.n ? n0 + chunk : a.n;
    for (int r = 0; r < a.m; r += kMaxLinearRows) {
      Args part = a;
      part.x = a.x + static_cast<long>(r) * a.k;
      part.out = a.out + static_cast<long>(r) * a.n;
      part.m = a.m - r < kMaxLinearRows ? a.m - r : kMaxLinearRows;
      rows(part, n0, n1);
    }
  };
  if (a.m >= kDynamicFromRows) {
#pragma omp parallel for schedule(dynamic)
    for (int c = 0; c < chunks; ++c) pass(c);
  } else {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; ++c) pass(c);
  }
}

// A family of row kernels as a table indexed by input rows - 1: Kernel<M>::run(args, n0, n1)
// computes outputs [n0, n1) of M <= kMaxLinearRows input rows.
template <typename Args, template <int> class Kernel>
struct RowKernels {
  using Fn = void (*)(const Args&, int, int);
  static constexpr Fn fns[kMaxLinearRows] = {Kernel<1>::run, Kernel<2>::run, Kernel<3>::run, Kernel<4>::run,
                                             Kernel<5>::run, Kernel<6>::run, Kernel<7>::run, Kernel<8>::run};
};

}  // namespace pyserve::cpu
