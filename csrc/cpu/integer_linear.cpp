// Widening every weight to fp32 costs about eight vector instructions per group of 32 (see
// quantized_linear.cpp). With the inputs in int8 as well, a group is one integer dot product
// (AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw and vpmaddwd) and one fp32 multiply-add per
// eight lanes: the same weight bytes for a third of the work. At batch 1 both kinds keep pace with
// memory on the 112M benchmark model (273 vs 270 tokens/s); where the same bytes feed many rows,
// under load, the integer kernels carried 64 streams 1.23x faster. Without VNNI, int8 weights take
// rows_avx2_fours and int4 weights rows_avx2_int4, which spend fewer instructions on each group.
#include "cpu/integer_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/linear.h"  // in_row_passes, RowKernels
#include "cpu/x86.h"

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

constexpr int kRowBlock = 256;  // input rows quantized and multiplied at a time

// The order a kernel reads a row's quantized inputs in, four groups (128 values) at a time.
enum class InputLayout {
  kElementOrder,  // rows_scalar, rows_vnni
  kFours,         // interleaved by fours of groups: rows_avx2_fours (int8 weights)
  kPairs,         // each pair of groups' first halves, then their last halves: rows_avx2_int4
};

// Quantized input rows, addressed like the fp32 rows they replace: `rows + r * k` is row r.
struct Int8Rows {
  const int8_t* q;          // [M, K], as the kernel's InputLayout says
  const float* scales;      // [M, K/32]
  // [M, K/4]: -zero_point x the sum of each int32 lane's inputs (4 in element order; in the AVX2
  // layouts a four of groups keeps its 8 lanes' sums in its first slots), or null where the zero
  // point is 0
  const int32_t* start;
  Int8Rows operator+(long offset) const {
    return {q + offset, scales + offset / kQuantGroup, start ? start + offset / 4 : nullptr};
  }
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

// VNNI's vpdpbusd adds unsigned-by-signed byte products to int32 lanes in one instruction. The
// weights are the unsigned side: int8 with its sign bit flipped is q + 128, int4's nibbles are
// q + 8, and each lane starts from -zero_point x its 4 inputs' sum to take the offset back out.
PYSERVE_TARGET_VNNI inline __m256i dot4_vnni(const IntegerArgs& a, __m256i w, const int8_t* xq, const int32_t* start) {
  if (a.format == WeightFormat::kInt8) w = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(start)), w,
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
}

// VNNI: each weight row's groups, for M input rows; two accumulator chains a row so that a
// group's multiply-add does not wait on the previous one's.
template <int M>
PYSERVE_TARGET_VNNI void rows_vnni(const IntegerArgs& a, int n0, int n1) {
  const int groups = a.k / kQuantGroup;
  for (int n = n0; n < n1; ++n) {
    const uint16_t* w_scales = a.scales + static_cast<long>(n) * groups;
    prefetch_ahead(a.w, a.scales, n, a.k, a.format);
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    // the lambda names its target too: it does not inherit the function's (quantized_linear.cpp)
    auto add_group = [&](int g, int chain) PYSERVE_TARGET_VNNI {
      const __m256i w = group_bytes(a, n, g);
      const __m256 w_scale = _mm256_set1_ps(_cvtsh_ss(w_scales[g]));
      for (int i = 0; i < M; ++i) {
        const long at = static_cast<long>(i) * a.k + static_cast<long>(g) * kQuantGroup;
        const __m256i dot = dot4_vnni(a, w, a.x.q + at, a.x.start + at / 4);
        const __m256 scale = _mm256_mul_ps(w_scale, _mm256_set1_ps(a.x.scales[at / kQuantGroup]));
        acc[i][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i][chain]);
      }
    };
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
      add_group(g, 0);
      add_group(g + 1, 1);
    }
    if (g < groups) add_group(g, 0);
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i)
      a.out[static_cast<long>(i) * a.n + n] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + b;
  }
}

// int8 weights on AVX2 without VNNI, where a kernel going group by group, as the one above, spends
// four of its six vector instructions a group on multiplies (vpmaddubsw, vpmaddwd, the scales'
// product, the multiply-add) and two pipes run them. Here four groups share one int32 vector: its
// lane j sums the products of group j's first 16 values and lane j + 4 those of its last 16, so
// four groups take four dot products and one fp32 multiply-add between them. The weights come to
// that layout in registers (eight 32-bit shuffles per four groups of a weight row, shared by every
// input row); the inputs are quantized into it (quantize_rows_avx2). The weights are the unsigned
// side of vpmaddubsw, as |w| (taken once a four, for every input row) with w's sign moved onto the
// inputs: one vpsignb a product (|x| taken or stored per product as well was 1.05x to 1.3x slower).
constexpr int kFour = 4 * kQuantGroup;  // values a four of groups holds

// Four groups' vectors (bytes in element order) in the interleaved order (see above).
PYSERVE_TARGET_AVX2 inline void interleave_four(const __m256i g[4], __m256i u[4]) {
  const __m256i a = _mm256_unpacklo_epi32(g[0], g[1]), b = _mm256_unpackhi_epi32(g[0], g[1]),
                c = _mm256_unpacklo_epi32(g[2], g[3]), d = _mm256_unpackhi_epi32(g[2], g[3]);
  u[0] = _mm256_unpacklo_epi64(a, c);
  u[1] = _mm256_unpackhi_epi64(a, c);
  u[2] = _mm256_unpacklo_epi64(b, d);
  u[3] = _mm256_unpackhi_epi64(b, d);
}

// Eight int32 lanes of 4-byte dot products of 32 weights by the inputs at q. The weights' unsigned
// bytes (`magnitude`: int8's |w|, int4's nibbles as stored) are vpmaddubsw's unsigned side; int8
// inputs take the weights' signs (`signs`: the int8 weights themselves; unused for int4, whose
// zero point is in the start). |w| and x stay within 128 and 127, so no pair of products leaves
// int16, a -128 weight included.
template <WeightFormat F>
PYSERVE_TARGET_AVX2 inline __m256i dot_bytes(__m256i magnitude, __m256i signs, const int8_t* q) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  if (F == WeightFormat::kInt8) x = _mm256_sign_epi8(x, signs);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), _mm256_set1_epi16(1));
}

// What a run of int32 lanes starts from: int4's -8 x its inputs' sum (`start`), int8's zero.
template <WeightFormat F>
PYSERVE_TARGET_AVX2 inline __m256i lane_start(const int32_t* start) {
  if (F == WeightFormat::kInt8) return _mm256_setzero_si256();
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start));
}

// The groups after a row's last four of groups, in element order (as quantize_rows_avx2 leaves
// them), added to acc.
template <int M, WeightFormat F>
PYSERVE_TARGET_AVX2 inline void add_tail_groups(const IntegerArgs& a, long n, __m256 acc[M]) {
  const int groups = a.k / kQuantGroup;
  const uint16_t* w_scales = a.scales + n * groups;
  for (int g = groups / 4 * 4; g < groups; ++g) {
    const __m256i wg = group_bytes(a, n, g), magnitude = F == WeightFormat::kInt8 ? _mm256_abs_epi8(wg) : wg;
    const __m256 w_scale = _mm256_set1_ps(_cvtsh_ss(w_scales[g]));
    for (int i = 0; i < M; ++i) {
      const long at = static_cast<long>(i) * a.k + static_cast<long>(g) * kQuantGroup;
      const __m256i dot = _mm256_add_epi32(lane_start<F>(a.x.start + at / 4), dot_bytes<F>(magnitude, wg, a.x.q + at));
      const __m256 scale = _mm256_mul_ps(w_scale, _mm256_set1_ps(a.x.scales[at / kQuantGroup]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i]);
    }
  }
}

template <int M>
PYSERVE_TARGET_AVX2 void rows_avx2_fours(const IntegerArgs& a, int n0, int n1) {
  const int groups = a.k / kQuantGroup, fours = groups / 4;
  for (int n = n0; n < n1; ++n) {
    const uint16_t* w_scales = a.scales + static_cast<long>(n) * groups;
    prefetch_ahead(a.w, a.scales, n, a.k, a.format);
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int f = 0; f < fours; ++f) {
      const __m256i g[4] = {group_bytes(a, n, 4 * f), group_bytes(a, n, 4 * f + 1), group_bytes(a, n, 4 * f + 2),
                            group_bytes(a, n, 4 * f + 3)};
      __m256i u[4];
      interleave_four(g, u);
      const __m256i magnitude[4] = {_mm256_abs_epi8(u[0]), _mm256_abs_epi8(u[1]), _mm256_abs_epi8(u[2]),
                                    _mm256_abs_epi8(u[3])};
      const __m128 ws = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w_scales + 4 * f)));
      const __m256 w_scale = _mm256_set_m128(ws, ws);  // lanes j and j + 4: group j's
      // unrolled, the accumulators stay in registers (rolled, GCC kept them on the stack): 1.05x
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const unsigned long at = static_cast<unsigned long>(i) * a.k + static_cast<unsigned long>(f) * kFour;
        const int8_t* q = a.x.q + at;
        __m256i dot = _mm256_setzero_si256();
        for (int t = 0; t < 4; ++t)
          dot = _mm256_add_epi32(dot, dot_bytes<WeightFormat::kInt8>(magnitude[t], u[t], q + 32 * t));
        const __m256 x_scale = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(a.x.scales + at / kQuantGroup));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(w_scale, x_scale), acc[i]);
      }
    }
    add_tail_groups<M, WeightFormat::kInt8>(a, n, acc);
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) a.out[static_cast<long>(i) * a.n + n] = hsum(acc[i]) + b;
  }
}

// int4 weights on AVX2. 32 packed bytes hold two groups: their low nibbles are both groups' first
// 16 values, their high nibbles both groups' last 16, so an AND and a shift unpack 64 weights
// (rows_avx2_fours' layout would cost eight shuffles a four on top). The inputs are quantized into
// that order (each pair of groups: both first halves, then both last halves). Nibbles are at most
// 15, so the two byte-pair products of a pair of groups add up in int16 before one vpmaddwd, and a
// vphaddd folds two pairs' lanes into one vector, [g, g, g+2, g+2, g+1, g+1, g+3, g+3] by group,
// for one fp32 multiply-add a four of groups. Each lane starts from -8 x the sum of its inputs.
template <int M>
PYSERVE_TARGET_AVX2 void rows_avx2_int4(const IntegerArgs& a, int n0, int n1) {
  const int groups = a.k / kQuantGroup, fours = groups / 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F), pairs = _mm256_set1_epi16(1);
  const __m256i by_lane = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);  // a four's scales as the lanes hold them
  for (int n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + static_cast<long>(n) * (a.k / 2);
    const uint16_t* w_scales = a.scales + static_cast<long>(n) * groups;
    prefetch_ahead(a.w, a.scales, n, a.k, a.format);
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int f = 0; f < fours; ++f) {
      const __m256i b01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * f)),
                    b23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * f + 32));
      const __m256i first01 = _mm256_and_si256(b01, low4), last01 = _mm256_and_si256(_mm256_srli_epi16(b01, 4), low4),
                    first23 = _mm256_and_si256(b23, low4), last23 = _mm256_and_si256(_mm256_srli_epi16(b23, 4), low4);
      const __m128 ws = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w_scales + 4 * f)));
      for (int i = 0; i < M; ++i) {
        const long at = static_cast<long>(i) * a.k + static_cast<long>(f) * kFour;
        const __m256i* x = reinterpret_cast<const __m256i*>(a.x.q + at);
        const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(first01, _mm256_loadu_si256(x)),
                                             _mm256_maddubs_epi16(last01, _mm256_loadu_si256(x + 1)));
        const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(first23, _mm256_loadu_si256(x + 2)),
                                             _mm256_maddubs_epi16(last23, _mm256_loadu_si256(x + 3)));
        const __m256i dot = _mm256_add_epi32(
            _mm256_hadd_epi32(_mm256_madd_epi16(s01, pairs), _mm256_madd_epi16(s23, pairs)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x.start + at / 4)));
        const __m128 scales = _mm_mul_ps(ws, _mm_loadu_ps(a.x.scales + at / kQuantGroup));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                 _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scales), by_lane), acc[i]);
      }
    }
    add_tail_groups<M, WeightFormat::kInt4>(a, n, acc);
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int i = 0; i < M; ++i) a.out[static_cast<long>(i) * a.n + n] = hsum(acc[i]) + b;
  }
}

// One group of 32 inputs quantized as quantize_row_groups does (vcvtps2dq rounds half to even, as
// nearbyint does under the default rounding mode), its bytes in element order.
PYSERVE_TARGET_AVX2 inline __m256i quantize_group(const float* v, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8), x2 = _mm256_loadu_ps(v + 16),
               x3 = _mm256_loadu_ps(v + 24);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  *scale = amax / 127.0f;
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, inv)),
                i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, inv));
  // the packs work within 128-bit halves: the bytes come out as 4-value pieces, put back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Input rows for the integer kernels: quantized per group (quantize_row_groups), the fours of
// groups in `layout`, the groups after the last four in element order, and `start` as the
// kernel's zero point asks (or null; in a four, its 8 lanes' at the four's first slots).
PYSERVE_TARGET_AVX2 void quantize_rows_avx2(const float* x, long rows, int k, int zero_point, InputLayout layout,
                                            int8_t* q, float* scales, int32_t* start) {
  const int groups = k / kQuantGroup, fours = layout == InputLayout::kElementOrder ? 0 : groups / 4;
  const __m256i ones = _mm256_set1_epi8(1), pairs = _mm256_set1_epi16(1), minus_zero = _mm256_set1_epi32(-zero_point);
  auto store = [](int8_t* to, __m256i v) PYSERVE_TARGET_AVX2 { _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), v); };
  // -zero_point x each int32 lane's inputs
  auto lane_sums = [&](__m256i v) PYSERVE_TARGET_AVX2 {
    return _mm256_mullo_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones, v), pairs), minus_zero);
  };
  // a prompt's rows are worth splitting among threads; a decode step's few are not
#pragma omp parallel for schedule(static) if (rows >= 16)
  for (long r = 0; r < rows; ++r) {
    __m256i four[4];
    for (int g = 0; g < groups; ++g) {
      const long at = r * k + static_cast<long>(g) * kQuantGroup;
      const __m256i v = quantize_group(x + at, scales + r * groups + g);
      if (g >= 4 * fours) {
        store(q + at, v);
        if (start) _mm256_storeu_si256(reinterpret_cast<__m256i*>(start + at / 4), lane_sums(v));
      } else if ((four[g % 4] = v), g % 4 == 3) {
        __m256i u[4], lanes;
        if (layout == InputLayout::kFours) {
          interleave_four(four, u);
          lanes = _mm256_add_epi32(_mm256_add_epi32(lane_sums(u[0]), lane_sums(u[1])),
                                   _mm256_add_epi32(lane_sums(u[2]), lane_sums(u[3])));
        } else {  // kPairs: each pair of groups' first halves, then their last halves
          u[0] = _mm256_permute2x128_si256(four[0], four[1], 0x20);
          u[1] = _mm256_permute2x128_si256(four[0], four[1], 0x31);
          u[2] = _mm256_permute2x128_si256(four[2], four[3], 0x20);
          u[3] = _mm256_permute2x128_si256(four[2], four[3], 0x31);
          // folded as rows_avx2_int4 folds its dot products
          lanes = _mm256_hadd_epi32(_mm256_add_epi32(lane_sums(u[0]), lane_sums(u[1])),
                                    _mm256_add_epi32(lane_sums(u[2]), lane_sums(u[3])));
        }
        const long first = at - 3 * kQuantGroup;
        for (int t = 0; t < 4; ++t) store(q + first + 32 * t, u[t]);
        if (start) _mm256_storeu_si256(reinterpret_cast<__m256i*>(start + first / 4), lanes);
      }
    }
  }
}

bool has_vnni() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
}

#endif  // PYSERVE_X86

template <template <int> class Kernel>
using Table = RowKernels<IntegerArgs, Kernel>;

template <int M> struct Scalar { static void run(const IntegerArgs& a, int n0, int n1) { rows_scalar<M>(a, n0, n1); } };
#ifdef PYSERVE_X86
template <int M> struct AVX2Int8 { static void run(const IntegerArgs& a, int n0, int n1) { rows_avx2_fours<M>(a, n0, n1); } };
template <int M> struct AVX2Int4 { static void run(const IntegerArgs& a, int n0, int n1) { rows_avx2_int4<M>(a, n0, n1); } };
template <int M> struct VNNI { static void run(const IntegerArgs& a, int n0, int n1) { rows_vnni<M>(a, n0, n1); } };
#endif

}  // namespace

void integer_linear(const QuantizedLinearArgs& a, Isa isa) {
  isa = resolve_isa(isa);
  auto fns = Table<Scalar>::fns;
  int zero_point = 0;  // of the weights' unsigned bytes, for the kernel chosen
  InputLayout layout = InputLayout::kElementOrder;
#ifdef PYSERVE_X86
  static const bool vnni = has_vnni();
  if (isa == Isa::kAVX512 && vnni) {
    fns = Table<VNNI>::fns;
    zero_point = a.format == WeightFormat::kInt8 ? 128 : 8;
  } else if (isa >= Isa::kAVX2) {
    const bool int8 = a.format == WeightFormat::kInt8;
    fns = int8 ? Table<AVX2Int8>::fns : Table<AVX2Int4>::fns;
    zero_point = int8 ? 0 : 8;
    layout = int8 ? InputLayout::kFours : InputLayout::kPairs;
  }
#endif
  // A decode step makes dozens of these calls: the buffers are kept, one set a calling thread. A
  // prompt's rows go kRowBlock at a time, which bounds them (and keeps a block's inputs in L2).
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> x_scales;
  thread_local std::vector<int32_t> start;
  const long block_values = static_cast<long>(std::min(a.m, kRowBlock)) * a.k;
  q.resize(block_values);
  x_scales.resize(block_values / kQuantGroup);
  start.resize(zero_point ? block_values / 4 : 0);
  int32_t* starts = zero_point ? start.data() : nullptr;
  for (int r0 = 0; r0 < a.m; r0 += kRowBlock) {
    const int rows = std::min(a.m - r0, kRowBlock);
    const float* x = a.x + static_cast<long>(r0) * a.k;
    const long values = static_cast<long>(rows) * a.k;
#ifdef PYSERVE_X86
    if (isa >= Isa::kAVX2)
      quantize_rows_avx2(x, rows, a.k, zero_point, layout, q.data(), x_scales.data(), starts);
    else
#endif
    {
      quantize_row_groups(x, values / kQuantGroup, reinterpret_cast<signed char*>(q.data()), x_scales.data());
      for (long d = 0; starts && d < values / 4; ++d)
        starts[d] = -zero_point * (q[4 * d] + q[4 * d + 1] + q[4 * d + 2] + q[4 * d + 3]);
    }
    const IntegerArgs args{Int8Rows{q.data(), x_scales.data(), starts}, a.w, a.scales, a.bias,
                           a.out + static_cast<long>(r0) * a.n, rows, a.n, a.k, a.format};
    // 32 weight rows a task, as the fp32-activation kernels
    in_row_passes(args, 32, [fns](const IntegerArgs& part, int n0, int n1) { fns[part.m - 1](part, n0, n1); });
  }
}

}  // namespace pyserve::cpu
