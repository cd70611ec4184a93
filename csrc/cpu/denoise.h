// CPU fused denoising step (see pyserve.kernels.denoise_step and pyserve.kernels.types.Coef).
#pragma once
#include <cstdint>

namespace pyserve::cpu {

constexpr int kNumCoef = 11;

struct DenoiseArgs {
  const float* x;        // [B, N]
  const float* cond;     // [B, N] model output (conditional)
  const float* uncond;   // [B, N] or null: no classifier-free guidance
  const float* prev_x0;  // [B, N] or null
  const float* coef;     // [B, kNumCoef]
  const int64_t *seed, *step;
  float* x_next;         // [B, N]
  float* x0;             // [B, N] or null
  int batch;
  long numel;            // N
};

void denoise_step(const DenoiseArgs& args);

}  // namespace pyserve::cpu
