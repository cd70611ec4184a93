// CPU fused denoising step (see pyserve.kernels.denoise_step and pyserve.kernels.types.Coef).
#pragma once
#include <cstdint>

#include "denoise_coef.h"

namespace pyserve::cpu {

struct DenoiseArgs {
  const float* x;        // [B, N]
  const float* cond;     // [B, N] model output (conditional)
  const float* uncond;   // [B, N] or null: no classifier-free guidance
  const float* prev_x0;  // [B, N] or null
  const float* coef;     // [B, NUM_COEF] (denoise_coef.h)
  const int64_t *seed, *step;
  float* x_next;         // [B, N]
  float* x0;             // [B, N] or null
  int batch;
  long numel;            // N
};

void denoise_step(const DenoiseArgs& args);

}  // namespace pyserve::cpu
