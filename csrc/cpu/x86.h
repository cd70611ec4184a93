// What the x86 kernels chosen at run time share: the target attributes their functions carry (one
// binary runs on CPUs with or without AVX2 and AVX-512, whatever the compiler's own target), and
// the helpers they call, with the narrowest target that all of their callers include.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYSERVE_X86 1

#define PYSERVE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYSERVE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define PYSERVE_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace pyserve::cpu {

// The sum of a vector's 8 lanes.
PYSERVE_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace pyserve::cpu
#endif
