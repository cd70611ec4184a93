// Decode reads every weight once per token, so fewer bytes per weight is the lever: these kernels
// stream packed weights (2, 1.0625 or 0.5625 bytes each instead of 4), widen each group of 32 to
// fp32 in registers, scale it once, and reuse it for up to eight input rows. The AVX-512 and AVX2
// paths are compiled with function target attributes and chosen at run time from the CPU's
// features, so one binary runs on CPUs with either (and falls back to scalar code without AVX2).
#include "cpu/quantized_linear.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/integer_linear.h"
#include "cpu/linear.h"  // kMaxLinearRows
#include "cpu/vec.h"  // bf16_to_float
#include "cpu/x86.h"

namespace pyserve::cpu {
namespace {

// Weight (n, c) as fp32: the reference every vector path must agree with.
inline float weight_at(const QuantizedLinearArgs& a, long n, int c) {
  const long i = n * a.k + c;
  switch (a.format) {
    case WeightFormat::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(a.w)[i]);
    case WeightFormat::kInt8:
      return static_cast<const int8_t*>(a.w)[i] * half_to_float(a.scales[n * (a.k / kQuantGroup) + c / kQuantGroup]);
    case WeightFormat::kInt4: {
      const int g = c / kQuantGroup, j = c % kQuantGroup;
      const uint8_t byte = static_cast<const uint8_t*>(a.w)[n * (a.k / 2) + g * 16 + j % 16];
      const int q = j < 16 ? byte & 0x0F : byte >> 4;
      return (q - 8) * half_to_float(a.scales[n * (a.k / kQuantGroup) + g]);
    }
  }
  return 0.0f;
}

template <int M>
void rows_scalar(const QuantizedLinearArgs& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    float sums[M] = {};
    for (int c = 0; c < a.k; ++c) {
      const float w = weight_at(a, n, c);
      for (int i = 0; i < M; ++i) sums[i] += a.x[static_cast<long>(i) * a.k + c] * w;
    }
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) a.out[static_cast<long>(i) * a.n + n] = sums[i] + b;
  }
}

#ifdef PYSERVE_X86

// ---- AVX-512: a group of 32 weights is two 16-lane vectors --------------------------------------

PYSERVE_TARGET_AVX512 inline void group_avx512(const QuantizedLinearArgs& a, long n, int g, __m512& w0, __m512& w1) {
  const long c = static_cast<long>(g) * kQuantGroup;
  if (a.format == WeightFormat::kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(a.w) + n * a.k + c;
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p + 16))), 16));
    return;
  }
  const __m512 scale = _mm512_set1_ps(_cvtsh_ss(a.scales[n * (a.k / kQuantGroup) + g]));
  if (a.format == WeightFormat::kInt8) {
    const int8_t* p = static_cast<const int8_t*>(a.w) + n * a.k + c;
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  } else {
    const uint8_t* p = static_cast<const uint8_t*>(a.w) + n * (a.k / 2) + c / 2;
    const __m128i bytes = _mm_loadu_si128((const __m128i*)p), low4 = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    w0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
    w1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
  }
  w0 = _mm512_mul_ps(w0, scale);
  w1 = _mm512_mul_ps(w1, scale);
}

// A row's FMAs go to several independent accumulators: with one, each 32-weight group waits on
// the latency of the previous group's FMAs and the kernel ran at about 24 GB/s of int8 here,
// below the memory's pace. Few input rows need more chains (many rows are chains already).
template <int M>
PYSERVE_TARGET_AVX512 void rows_avx512(const QuantizedLinearArgs& a, int n0, int n1) {
  constexpr int kChains = M <= 2 ? 4 : 2;
  const int groups = a.k / kQuantGroup;
  for (int n = n0; n < n1; ++n) {
    prefetch_ahead(a.w, a.scales, n, a.k, a.format);
    __m512 acc[M][kChains];
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < kChains; ++c) acc[i][c] = _mm512_setzero_ps();
    // GCC does not give a lambda its enclosing function's target, so it names its own: without it,
    // a build whose -march lacks AVX-512 fails here (and intrinsics in helpers would not inline)
    auto add_group = [&](int g, int chain) PYSERVE_TARGET_AVX512 {
      __m512 w0, w1;
      group_avx512(a, n, g, w0, w1);
      const float* x = a.x + static_cast<long>(g) * kQuantGroup;
      for (int i = 0; i < M; ++i) {
        acc[i][chain] = _mm512_fmadd_ps(_mm512_loadu_ps(x + static_cast<long>(i) * a.k), w0, acc[i][chain]);
        acc[i][chain + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + static_cast<long>(i) * a.k + 16), w1, acc[i][chain + 1]);
      }
    };
    int g = 0;
    if constexpr (kChains == 4)
      for (; g + 2 <= groups; g += 2) {
        add_group(g, 0);
        add_group(g + 1, 2);
      }
    for (; g < groups; ++g) add_group(g, 0);
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) {
      __m512 total = acc[i][0];
      for (int c = 1; c < kChains; ++c) total = _mm512_add_ps(total, acc[i][c]);
      float s = _mm512_reduce_add_ps(total);
      for (int c = groups * kQuantGroup; c < a.k; ++c) s += a.x[static_cast<long>(i) * a.k + c] * weight_at(a, n, c);
      a.out[static_cast<long>(i) * a.n + n] = s + b;
    }
  }
}

// ---- AVX2: a group of 32 weights is four 8-lane vectors -----------------------------------------

PYSERVE_TARGET_AVX2 inline void group_avx2(const QuantizedLinearArgs& a, long n, int g, __m256* w) {
  const long c = static_cast<long>(g) * kQuantGroup;
  if (a.format == WeightFormat::kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(a.w) + n * a.k + c;
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 8 * j))), 16));
    return;
  }
  const __m256 scale = _mm256_set1_ps(_cvtsh_ss(a.scales[n * (a.k / kQuantGroup) + g]));
  if (a.format == WeightFormat::kInt8) {
    const int8_t* p = static_cast<const int8_t*>(a.w) + n * a.k + c;
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * j))));
  } else {
    const uint8_t* p = static_cast<const uint8_t*>(a.w) + n * (a.k / 2) + c / 2;
    const __m128i bytes = _mm_loadu_si128((const __m128i*)p), low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[j]), eight));
  }
  for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(w[j], scale);
}


template <int M>
PYSERVE_TARGET_AVX2 void rows_avx2(const QuantizedLinearArgs& a, int n0, int n1) {
  constexpr int kChains = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // as the AVX-512 path; 16 registers here
  const int groups = a.k / kQuantGroup;
  for (int n = n0; n < n1; ++n) {
    prefetch_ahead(a.w, a.scales, n, a.k, a.format);
    __m256 acc[M][kChains];
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < kChains; ++c) acc[i][c] = _mm256_setzero_ps();
    for (int g = 0; g < groups; ++g) {
      __m256 w[4];
      group_avx2(a, n, g, w);
      const float* x = a.x + static_cast<long>(g) * kQuantGroup;
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < 4; ++j)
          acc[i][j % kChains] =
              _mm256_fmadd_ps(_mm256_loadu_ps(x + static_cast<long>(i) * a.k + 8 * j), w[j], acc[i][j % kChains]);
    }
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) {
      __m256 total = acc[i][0];
      for (int c = 1; c < kChains; ++c) total = _mm256_add_ps(total, acc[i][c]);
      float s = hsum(total);
      for (int c = groups * kQuantGroup; c < a.k; ++c) s += a.x[static_cast<long>(i) * a.k + c] * weight_at(a, n, c);
      a.out[static_cast<long>(i) * a.n + n] = s + b;
    }
  }
}

#endif  // PYSERVE_X86

template <template <int> class Kernel>
using Table = RowKernels<QuantizedLinearArgs, Kernel>;

template <int M> struct Scalar { static void run(const QuantizedLinearArgs& a, int n0, int n1) { rows_scalar<M>(a, n0, n1); } };
#ifdef PYSERVE_X86
template <int M> struct AVX512 { static void run(const QuantizedLinearArgs& a, int n0, int n1) { rows_avx512<M>(a, n0, n1); } };
template <int M> struct AVX2 { static void run(const QuantizedLinearArgs& a, int n0, int n1) { rows_avx2<M>(a, n0, n1); } };
#endif

}  // namespace

namespace {

Isa cpu_isa() {
#ifdef PYSERVE_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAVX2;
#endif
  return Isa::kScalar;
}

std::atomic<int> isa_limit{static_cast<int>(Isa::kAVX512)};

}  // namespace

Isa best_isa() {
  static const Isa cpu = cpu_isa();
  return static_cast<Isa>(std::min(static_cast<int>(cpu), isa_limit.load(std::memory_order_relaxed)));
}

void set_isa_limit(Isa limit) {
  isa_limit.store(limit == Isa::kAuto ? static_cast<int>(Isa::kAVX512) : static_cast<int>(limit));
}

Isa resolve_isa(Isa isa) {
  const Isa best = best_isa();
  return isa == Isa::kAuto || static_cast<int>(isa) > static_cast<int>(best) ? best : isa;
}

void quantized_linear(const QuantizedLinearArgs& a, Isa isa) {
  if (a.int8_activations && a.format != WeightFormat::kBF16) return integer_linear(a, isa);
  isa = resolve_isa(isa);
  auto fns = Table<Scalar>::fns;
#ifdef PYSERVE_X86
  if (isa == Isa::kAVX512) fns = Table<AVX512>::fns;
  if (isa == Isa::kAVX2) fns = Table<AVX2>::fns;
#endif
  // 32 weight rows a task: their packed bytes stay in cache across passes
  in_row_passes(a, 32, [fns](const QuantizedLinearArgs& part, int n0, int n1) { fns[part.m - 1](part, n0, n1); });
}

}  // namespace pyserve::cpu
