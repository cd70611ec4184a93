// CPU fused scheduler step: guidance, x0/eps prediction, clipping, the update and seeded noise in
// one pass over memory, with every coefficient per row.
#include "cpu/denoise.h"

#include <algorithm>

#include "philox.h"

namespace pyserve::cpu {

namespace C {  // columns of the coefficient table, as pyserve.kernels.types.Coef
enum { GUIDANCE, X0_X, X0_OUT, EPS_X, EPS_OUT, CLIP, NEXT_X, NEXT_X0, NEXT_EPS, NEXT_PREV_X0, NOISE };
}

void denoise_step(const DenoiseArgs& a) {
  constexpr long kChunk = 4096;  // elements per task; a multiple of 4 keeps noise counters whole
  const long chunks = (a.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (long task = 0; task < a.batch * chunks; ++task) {
    const int row = task / chunks;
    const long begin = (task % chunks) * kChunk, end = std::min(a.numel, begin + kChunk);
    const float* c = a.coef + row * kNumCoef;
    const long base = row * a.numel;
    const float g = c[C::GUIDANCE], clip = c[C::CLIP], noise = c[C::NOISE];
    float z[4] = {0, 0, 0, 0};
    for (long i = begin; i < end; ++i) {
      const long e = base + i;
      float out = a.cond[e];
      if (a.uncond) out = a.uncond[e] + g * (out - a.uncond[e]);
      const float x = a.x[e];
      float x0 = c[C::X0_X] * x + c[C::X0_OUT] * out;
      if (clip > 0.0f) x0 = std::min(std::max(x0, -clip), clip);
      const float eps = c[C::EPS_X] * x + c[C::EPS_OUT] * out;
      float next = c[C::NEXT_X] * x + c[C::NEXT_X0] * x0 + c[C::NEXT_EPS] * eps;
      if (a.prev_x0) next += c[C::NEXT_PREV_X0] * a.prev_x0[e];
      if (noise != 0.0f) {
        if (i % 4 == 0 || i == begin)
          normal4(a.seed[row], static_cast<uint32_t>(a.step[row]), static_cast<uint32_t>(i / 4), kNoiseStream, z);
        next += noise * z[i % 4];
      }
      a.x_next[e] = next;
      if (a.x0) a.x0[e] = x0;
    }
  }
}

}  // namespace pyserve::cpu
