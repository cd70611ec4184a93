// Widening every weight to fp32 costs about eight vector instructions per group of 32 (see
// quantized_linear.cpp). With the inputs in int8 as well, a group is one integer dot product
// (AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw and vpmaddwd) and one fp32 multiply-add per
// eight lanes: the same weight bytes for a third of the work. At batch 1 both kinds keep pace with
// memory on the 112M benchmark model (273 vs 270 tokens/s); where the same bytes feed many rows,
// under load, the integer kernels carried 64 streams 1.23x faster.
#include "cpu/integer_linear.h"

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYSERVE_X86 1
#endif

#include "cpu/linear.h"  // in_row_passes, RowKernels

namespace pyserve::cpu {

void quantize_row_groups(const float* x, long groups, signed char* q, float* scales) {
  for (long g = 0; g < groups; ++g) {
    const float* v = x + g * kQuantGroup;
    float amax = 0.0f;
    for (int j = 0; j < kQuantGroup; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    scales[g] = amax / 127.0f;
    for (int j = 0; j < kQuantGroup; ++j) q[g * kQuantGroup + j] = static_cast<signed char>(std::nearbyint(v[j] * inv));
  }
}

namespace {

// Quantized input rows, addressed like the fp32 rows they replace: `rows + r * k` is row r.
struct Int8Rows {
  const int8_t* q;        // [M, K]
  const float* scales;    // [M, K/32]
  const int32_t* start;   // [M, K/4]: -zero_point x the sum of each 4 inputs (see the VNNI kernel)
  Int8Rows operator+(long offset) const { return {q + offset, scales + offset / kQuantGroup, start + offset / 4}; }
};

struct IntegerArgs {
  Int8Rows x;
  const void* w;
  const uint16_t* scales;  // the weights' [N, K/32], fp16
  const float* bias;
  float* out;
  int m, n, k;
  WeightFormat format;
};

// Weight (n, j) as the integer it stands for (before its group's scale).
inline int weight_int(const IntegerArgs& a, long n, int j) {
  if (a.format == WeightFormat::kInt8) return static_cast<const int8_t*>(a.w)[n * a.k + j];
  const int g = j / kQuantGroup, e = j % kQuantGroup;
  const uint8_t byte = static_cast<const uint8_t*>(a.w)[n * (a.k / 2) + g * 16 + e % 16];
  return (e < 16 ? byte & 0x0F : byte >> 4) - 8;
}

template <int M>
void rows_scalar(const IntegerArgs& a, int n0, int n1) {
  const int groups = a.k / kQuantGroup;
  for (int n = n0; n < n1; ++n)
    for (int i = 0; i < M; ++i) {
      float s = 0.0f;
      for (int g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int j = g * kQuantGroup; j < (g + 1) * kQuantGroup; ++j)
          dot += weight_int(a, n, j) * a.x.q[static_cast<long>(i) * a.k + j];
        const float w_scale = half_to_float(a.scales[static_cast<long>(n) * groups + g]);
        s += static_cast<float>(dot) * (w_scale * a.x.scales[i * groups + g]);
      }
      a.out[static_cast<long>(i) * a.n + n] = s + (a.bias ? a.bias[n] : 0.0f);
    }
}

#ifdef PYSERVE_X86

#define PYSERVE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYSERVE_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// A group of 32 weights as bytes in element order: int8's own (signed), or int4's nibbles
// (unsigned, q + 8).
PYSERVE_TARGET_AVX2 inline __m256i group_bytes(const IntegerArgs& a, long n, int g) {
  if (a.format == WeightFormat::kInt8)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(a.w) + n * a.k + g * 32));
  const __m128i bytes =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(a.w) + n * (a.k / 2) + g * 16));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
}

PYSERVE_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The dot products of each 4 bytes of a group (8 int32 lanes), AVX2: vpmaddubsw multiplies
// unsigned by signed bytes, so int8 weights give their magnitudes and move their signs onto the
// inputs (|w| <= 127 keeps each pair's sum within int16); int4's nibbles are unsigned already,
// and the zero point's share comes back through `start`.
PYSERVE_TARGET_AVX2 inline __m256i dot4_avx2(const IntegerArgs& a, __m256i w, const int8_t* xq, const int32_t* start) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), ones = _mm256_set1_epi16(1);
  if (a.format == WeightFormat::kInt8)
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start)));
}

// VNNI's vpdpbusd adds unsigned-by-signed byte products to int32 lanes in one instruction. The
// weights are the unsigned side: int8 with its sign bit flipped is q + 128, int4's nibbles are
// q + 8, and each lane starts from -zero_point x its 4 inputs' sum to take the offset back out.
PYSERVE_TARGET_VNNI inline __m256i dot4_vnni(const IntegerArgs& a, __m256i w, const int8_t* xq, const int32_t* start) {
  if (a.format == WeightFormat::kInt8) w = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(start)), w,
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
}

// Each weight row's groups, for M input rows; two accumulator chains a row so that a group's
// multiply-add does not wait on the previous one's. A macro, not a shared template: each copy must
// be compiled under its own target attribute for its dot product (VNNI or not) to inline.
#define PYSERVE_INTEGER_ROWS(NAME, TARGET, DOT4)                                                         \
  template <int M>                                                                                       \
  TARGET void NAME(const IntegerArgs& a, int n0, int n1) {                                               \
    const int groups = a.k / kQuantGroup;                                                                \
    for (int n = n0; n < n1; ++n) {                                                                      \
      const uint16_t* w_scales = a.scales + static_cast<long>(n) * groups;                               \
      prefetch_ahead(a.w, a.scales, n, a.k, a.format);                                                   \
      __m256 acc[M][2];                                                                                  \
      for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                           \
      /* the lambda names its target too: it does not inherit the function's (quantized_linear.cpp) */     \
      auto add_group = [&](int g, int chain) TARGET {                                                    \
        const __m256i w = group_bytes(a, n, g);                                                          \
        const __m256 w_scale = _mm256_set1_ps(_cvtsh_ss(w_scales[g]));                                   \
        for (int i = 0; i < M; ++i) {                                                                    \
          const long at = static_cast<long>(i) * a.k + static_cast<long>(g) * kQuantGroup;               \
          const __m256i dot = DOT4(a, w, a.x.q + at, a.x.start + at / 4);                                \
          const __m256 scale = _mm256_mul_ps(w_scale, _mm256_set1_ps(a.x.scales[at / kQuantGroup]));     \
          acc[i][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i][chain]);                \
        }                                                                                                \
      };                                                                                                 \
      int g = 0;                                                                                         \
      for (; g + 2 <= groups; g += 2) {                                                                  \
        add_group(g, 0);                                                                                 \
        add_group(g + 1, 1);                                                                             \
      }                                                                                                  \
      if (g < groups) add_group(g, 0);                                                                   \
      const float b = a.bias ? a.bias[n] : 0.0f;                                                         \
      for (int i = 0; i < M; ++i)                                                                        \
        a.out[static_cast<long>(i) * a.n + n] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + b;           \
    }                                                                                                    \
  }

PYSERVE_INTEGER_ROWS(rows_avx2, PYSERVE_TARGET_AVX2, dot4_avx2)
PYSERVE_INTEGER_ROWS(rows_vnni, PYSERVE_TARGET_VNNI, dot4_vnni)
#undef PYSERVE_INTEGER_ROWS

bool has_vnni() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
}

#endif  // PYSERVE_X86

template <template <int> class Kernel>
using Table = RowKernels<IntegerArgs, Kernel>;

template <int M> struct Scalar { static void run(const IntegerArgs& a, int n0, int n1) { rows_scalar<M>(a, n0, n1); } };
#ifdef PYSERVE_X86
template <int M> struct AVX2 { static void run(const IntegerArgs& a, int n0, int n1) { rows_avx2<M>(a, n0, n1); } };
template <int M> struct VNNI { static void run(const IntegerArgs& a, int n0, int n1) { rows_vnni<M>(a, n0, n1); } };
#endif

}  // namespace

void integer_linear(const QuantizedLinearArgs& a, Isa isa) {
  static const Isa best = best_isa();
  if (isa == Isa::kAuto || static_cast<int>(isa) > static_cast<int>(best)) isa = best;
  auto fns = Table<Scalar>::fns;
  int zero_point = 0;  // of the weights' unsigned bytes, for the kernel chosen
#ifdef PYSERVE_X86
  static const bool vnni = has_vnni();
  if (isa == Isa::kAVX512 && vnni) {
    fns = Table<VNNI>::fns;
    zero_point = a.format == WeightFormat::kInt8 ? 128 : 8;
  } else if (isa >= Isa::kAVX2) {
    fns = Table<AVX2>::fns;
    zero_point = a.format == WeightFormat::kInt8 ? 0 : 8;
  }
#endif
  const long values = static_cast<long>(a.m) * a.k;
  std::vector<int8_t> q(values);
  std::vector<float> x_scales(values / kQuantGroup);
  std::vector<int32_t> start(values / 4);
  quantize_row_groups(a.x, values / kQuantGroup, reinterpret_cast<signed char*>(q.data()), x_scales.data());
  for (long d = 0; d < values / 4; ++d)
    start[d] = -zero_point * (q[4 * d] + q[4 * d + 1] + q[4 * d + 2] + q[4 * d + 3]);
  const IntegerArgs args{{q.data(), x_scales.data(), start.data()}, a.w, a.scales, a.bias, a.out, a.m, a.n, a.k,
                         a.format};
  // 32 weight rows a task, as the fp32-activation kernels
  in_row_passes(args, 32, [fns](const IntegerArgs& part, int n0, int n1) { fns[part.m - 1](part, n0, n1); });
}

}  // namespace pyserve::cpu
