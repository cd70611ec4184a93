// CPU fused scheduler step: guidance, x0/eps prediction, clipping, the update and seeded noise in
// one pass over memory, with every coefficient per row. Noise is made a chunk at a time in L1
// (Philox words, then Box-Muller over plain arrays so the compiler vectorises the math), and the
// update loop is specialised on which inputs are present so that it vectorises too.
#include "cpu/denoise.h"

#include <algorithm>
#include <cmath>

#include "philox.h"

namespace pyserve::cpu {
namespace {


constexpr long kChunk = 4096;  // elements per task; a multiple of 4 keeps noise counters whole

// Two normals (cos, sin) per pair of Philox words.
void box_muller(const uint32_t* __restrict a, const uint32_t* __restrict b, float* __restrict cos_out,
                float* __restrict sin_out, long n) {
#pragma omp simd
  for (long g = 0; g < n; ++g) {
    const float u1 = (static_cast<float>(static_cast<int>(a[g] >> 8)) + 1.0f) * (1.0f / 16777216.0f);
    const float angle = 6.283185307179586f * (static_cast<float>(static_cast<int>(b[g] >> 8)) * (1.0f / 16777216.0f));
    const float radius = sqrtf(std::max(-2.0f * logf(u1), 0.0f));
    cos_out[g] = radius * cosf(angle);
    sin_out[g] = radius * cosf(angle - 1.5707963267948966f);  // sinf would fuse into sincosf, which has no vector form
  }
}

// z[0, n) = the standard normals of elements begin .. begin + n of a row (begin % 4 == 0).
void noise_chunk(uint64_t seed, uint32_t step, long begin, long n, float* z) {
  const long groups = (n + 3) / 4;
  alignas(64) uint32_t w[4][kChunk / 4];
  for (long g = 0; g < groups; ++g) {
    Words4 r = philox(seed, static_cast<uint32_t>(begin / 4 + g), step, kNoiseStream);
    for (int i = 0; i < 4; ++i) w[i][g] = r.w[i];
  }
  alignas(64) float z0[kChunk / 4], z1[kChunk / 4], z2[kChunk / 4], z3[kChunk / 4];
  box_muller(w[0], w[1], z0, z1, groups);
  box_muller(w[2], w[3], z2, z3, groups);
  for (long g = 0; g < groups; ++g) {
    float* dst = z + 4 * g;
    dst[0] = z0[g], dst[1] = z1[g], dst[2] = z2[g], dst[3] = z3[g];
  }
}

template <bool kUncond, bool kPrev, bool kNoise>
void update(const DenoiseArgs& a, int row, long begin, long end, const float* __restrict z) {
  const float* c = a.coef + row * NUM_COEF;
  const float g = c[GUIDANCE], clip = c[CLIP];
  const float x0_x = c[X0_X], x0_out = c[X0_OUT], eps_x = c[EPS_X], eps_out = c[EPS_OUT];
  const float nx = c[NEXT_X], nx0 = c[NEXT_X0], neps = c[NEXT_EPS], nprev = c[NEXT_PREV_X0], noise = c[NOISE];
  const long base = row * a.numel;
  const float* __restrict x = a.x + base;
  const float* __restrict cond = a.cond + base;
  const float* __restrict uncond = kUncond ? a.uncond + base : nullptr;
  const float* __restrict prev = kPrev ? a.prev_x0 + base : nullptr;
  float* __restrict next = a.x_next + base;
  float* __restrict x0_out_ptr = a.x0 + base;
  const float lo = clip > 0.0f ? -clip : -INFINITY, hi = clip > 0.0f ? clip : INFINITY;
#pragma omp simd
  for (long i = begin; i < end; ++i) {
    float out = cond[i];
    if constexpr (kUncond) out = uncond[i] + g * (out - uncond[i]);
    const float xv = x[i];
    const float x0 = std::min(std::max(x0_x * xv + x0_out * out, lo), hi);
    const float eps = eps_x * xv + eps_out * out;
    float v = nx * xv + nx0 * x0 + neps * eps;
    if constexpr (kPrev) v += nprev * prev[i];
    if constexpr (kNoise) v += noise * z[i - begin];
    next[i] = v;
    x0_out_ptr[i] = x0;
  }
}

using UpdateFn = void (*)(const DenoiseArgs&, int, long, long, const float*);
constexpr UpdateFn kUpdates[8] = {update<false, false, false>, update<false, false, true>,
                                  update<false, true, false>,  update<false, true, true>,
                                  update<true, false, false>,  update<true, false, true>,
                                  update<true, true, false>,   update<true, true, true>};

}  // namespace

void denoise_step(const DenoiseArgs& a) {
  const long chunks = (a.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (long task = 0; task < a.batch * chunks; ++task) {
    const int row = task / chunks;
    const long begin = (task % chunks) * kChunk, end = std::min(a.numel, begin + kChunk);
    const bool noisy = a.coef[row * NUM_COEF + NOISE] != 0.0f;
    alignas(64) float z[kChunk];
    if (noisy) noise_chunk(a.seed[row], static_cast<uint32_t>(a.step[row]), begin, end - begin, z);
    kUpdates[(a.uncond ? 4 : 0) + (a.prev_x0 ? 2 : 0) + (noisy ? 1 : 0)](a, row, begin, end, z);
  }
}

}  // namespace pyserve::cpu
