// Small vector helpers for the CPU kernels: AVX2/FMA when the compiler targets it, plain loops
// otherwise (the results agree to rounding).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include "cpu/x86.h"  // hsum
#define PYSERVE_AVX2 1
#endif

namespace pyserve::cpu {

#ifdef PYSERVE_AVX2
// exp for x <= 0 (softmax arguments), rel. error ~1e-7; very negative x gives 0.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

inline float dot(const float* a, const float* b, int n) {
  int i = 0;
  float s = 0.0f;
#ifdef PYSERVE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = a * y + b * x
inline void scale_add(float* y, float a, float b, const float* x, int n) {
  int i = 0;
#ifdef PYSERVE_AVX2
  __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vb, _mm256_loadu_ps(x + i), _mm256_mul_ps(va, _mm256_loadu_ps(y + i))));
#endif
  for (; i < n; ++i) y[i] = a * y[i] + b * x[i];
}

// y[i] = exp(x[i] - m) in place, returning the sum.
inline float exp_sub_sum(float* x, float m, int n) {
  int i = 0;
  float s = 0.0f;
#ifdef PYSERVE_AVX2
  __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  s = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// A bf16 value (the top half of an fp32 one) as fp32.
inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bf16 values widened to fp32.
inline void bf16_to_f32(const uint16_t* x, float* y, int n) {
  int i = 0;
#ifdef PYSERVE_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  }
#endif
  for (; i < n; ++i) y[i] = bf16_to_float(x[i]);
}

// fp32 values rounded to the nearest bf16, ties to even, as torch's conversion (NaN stays NaN).
inline void f32_to_bf16(const float* x, uint16_t* y, int n) {
  for (int i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) {
      y[i] = static_cast<uint16_t>((bits >> 16) | 0x40);
      continue;
    }
    y[i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

inline float max_of(const float* x, int n) {
  float m = -INFINITY;
  int i = 0;
#ifdef PYSERVE_AVX2
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  alignas(32) float t[8];
  _mm256_store_ps(t, vm);
  for (float v : t) m = v > m ? v : m;
#endif
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum of exp((x[i] - m) * scale) over the entries with x[i] >= threshold (m >= those entries).
inline float sum_exp_above(const float* x, int n, float m, float scale, float threshold) {
  int i = 0;
  float s = 0.0f;
#ifdef PYSERVE_AVX2
  __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(threshold);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(v, vm), vs));
    acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_cmp_ps(v, vt, _CMP_GE_OQ)));
  }
  s = hsum(acc);
#endif
  for (; i < n; ++i)
    if (x[i] >= threshold) s += std::exp((x[i] - m) * scale);
  return s;
}

}  // namespace pyserve::cpu
