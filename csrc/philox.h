// Philox4x32-10, shared by the CPU and CUDA kernels (pyserve/kernels/rng.py is the reference).
// A row's stream is keyed by its 64-bit seed; the counter is (offset, step, stream, 0).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYSERVE_HD __host__ __device__ __forceinline__
#else
#define PYSERVE_HD inline
#endif

namespace pyserve {

constexpr uint32_t kSampleStream = 0;
constexpr uint32_t kNoiseStream = 1;

struct Words4 {
  uint32_t w[4];
};

PYSERVE_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

PYSERVE_HD Words4 philox(uint64_t seed, uint32_t offset, uint32_t step, uint32_t stream) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t x0 = offset, x1 = step, x2 = stream, x3 = 0;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, hi_a;
    uint32_t lo_b = mulhilo(0xCD9E8D57u, x2, &hi_b);
    uint32_t lo_a = mulhilo(0xD2511F53u, x0, &hi_a);
    x0 = hi_b ^ x1 ^ k0;
    x1 = lo_b;
    x2 = hi_a ^ x3 ^ k1;
    x3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words4{{x0, x1, x2, x3}};
}

// [0, 1) from the top 24 bits: exact in fp32 everywhere.
PYSERVE_HD float to_uniform(uint32_t w) { return static_cast<float>(w >> 8) * (1.0f / 16777216.0f); }

PYSERVE_HD float uniform(uint64_t seed, uint32_t step, uint32_t offset, uint32_t stream) {
  return to_uniform(philox(seed, offset, step, stream).w[0]);
}

// Four standard normals from one counter: two Box-Muller pairs (cos, sin), words (0,1) and (2,3).
// Element e of a row uses counter e / 4 and lane e % 4.
PYSERVE_HD void normal4(uint64_t seed, uint32_t step, uint32_t counter, uint32_t stream, float out[4]) {
  Words4 r = philox(seed, counter, step, stream);
  for (int pair = 0; pair < 2; ++pair) {
    float u1 = (static_cast<float>(r.w[2 * pair] >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    float angle = 6.283185307179586f * to_uniform(r.w[2 * pair + 1]);
    // Clamped: a fast-math log can come out just above 0 near u1 = 1, and sqrt of a negative is NaN.
    float radius = sqrtf(fmaxf(-2.0f * logf(u1), 0.0f));
    out[2 * pair] = radius * cosf(angle);
    out[2 * pair + 1] = radius * sinf(angle);
  }
}

}  // namespace pyserve
