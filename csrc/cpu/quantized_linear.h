// CPU products over low-precision weights, for decode-sized batches (any number of rows; the
// facade sends up to kMaxPackedRows, and w8a8/w4a8 prompts too; other prompts go to GEMM):
// y[m] = dequant(W) x[m] + b, fp32 activations (or int8 ones when asked) and fp32 accumulation.
//
// Weight formats (W is [N, K], row-major; K a multiple of 32 for the grouped formats):
//   bf16  uint16 [N, K]: the top half of each fp32 weight (round to nearest even)
//   int8  int8 [N, K] and fp16 scales [N, K/32]: w = q * scale of its group of 32 (llama.cpp's Q8_0)
//   int4  uint8 [N, K/2] and fp16 scales [N, K/32]: in each group of 32, byte j holds element j in
//         its low nibble and element j + 16 in its high nibble; w = (q - 8) * scale (Q4_0)
#pragma once
#include <cstdint>
#include <cstring>

namespace pyserve::cpu {

constexpr int kQuantGroup = 32;
constexpr int kMaxPackedRows = 64;  // beyond this, unpacking once for a GEMM costs less

enum class WeightFormat : int { kBF16 = 1, kInt8 = 2, kInt4 = 3 };
// Instruction sets a kernel may use; kAuto picks the best the CPU has at run time.
enum class Isa : int { kAuto = 0, kScalar = 1, kAVX2 = 2, kAVX512 = 3 };

struct QuantizedLinearArgs {
  const float* x;        // [M, K]
  const void* w;         // packed weights, as the format says
  const uint16_t* scales;  // [N, K/32] fp16 (int8, int4) or null
  const float* bias;     // [N] or null
  float* out;            // [M, N]
  int m, n, k;
  WeightFormat format;
  // int8/int4 only: quantize the input rows to int8 per group of 32 and take integer dot products
  // (cpu/integer_linear.h) instead of fp32 ones
  bool int8_activations = false;
};

void quantized_linear(const QuantizedLinearArgs& args, Isa isa);

// An fp16 value (a scale) as fp32, in portable code; the vector paths use F16C instead.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);  // inf, nan
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa) {  // subnormal: normalise
    int shift = 0;
    while (!(mantissa & 0x400)) mantissa <<= 1, ++shift;
    bits = sign | ((113 - shift) << 23) | ((mantissa & 0x3FF) << 13);
  } else {
    bits = sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Packed bytes of one weight row.
inline long row_bytes(WeightFormat format, int k) {
  return format == WeightFormat::kInt4 ? k / 2 : (format == WeightFormat::kInt8 ? k : 2L * k);
}

// A thread streams its weight rows once, a few hundred KB a product at decode sizes: too short
// for the hardware prefetcher to reach the memory's pace before the product ends. Row n asks for
// the bytes kPrefetchBytes past its own (measured on a 112M model's products: ~28 -> ~33 GB/s).
constexpr long kPrefetchBytes = 4096;
inline void prefetch_ahead(const void* w, const uint16_t* scales, long n, int k, WeightFormat format) {
  const long bytes = row_bytes(format, k), scale_bytes = k / kQuantGroup * 2;
  const char* ahead = static_cast<const char*>(w) + n * bytes + kPrefetchBytes;
  for (long off = 0; off < bytes; off += 64) __builtin_prefetch(ahead + off);
  if (format == WeightFormat::kBF16) return;
  // the same rows ahead in the scales
  const char* scales_ahead = reinterpret_cast<const char*>(scales) + (n + kPrefetchBytes / bytes) * scale_bytes;
  for (long off = 0; off < scale_bytes; off += 64) __builtin_prefetch(scales_ahead + off);
}
// What kAuto resolves to: the widest set this CPU has, at most the process's limit. The limit
// (set_isa_limit; the Python facade sets it from PYSERVE_CPU_ISA) lets one AVX-512 machine test
// the AVX2 and scalar paths, which the machines without AVX-512 take.
Isa best_isa();
void set_isa_limit(Isa limit);
// isa as a kernel takes it: kAuto and anything wider than best_isa() become best_isa().
Isa resolve_isa(Isa isa);

}  // namespace pyserve::cpu
