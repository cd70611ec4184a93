// CPU kernels for the small per-layer steps of a transformer decoder (fp32): each replaces a
// chain of torch calls whose dispatch costs more than the arithmetic at decode sizes.
#pragma once
#include <cstdint>

namespace pyserve::cpu {

// h = x (+ residual when given); out = h / rms(h) * weight; residual_out = h when given.
// Rows are `dim` floats apart.
void rms_norm(const float* x, const float* residual, const float* weight, float* out, float* residual_out, int rows,
              int dim, float eps);

// Rotates, in place, the first `rotated_heads` heads of each row of x [rows, row_stride]
// (head_dim floats each, half-split layout) by that row's angles: cos/sin [rows, head_dim / 2].
void rotary(float* x, const float* cos, const float* sin, int rows, long row_stride, int rotated_heads,
            int head_dim);

// out [rows, n] = silu(x[:, :n]) * x[:, n:], for x [rows, 2n].
void silu_mul(const float* x, float* out, int rows, int n);

}  // namespace pyserve::cpu
