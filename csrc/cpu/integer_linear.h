// Products over int8/int4 weights whose input rows are quantized too: each group of
// 32 inputs to int8 with a scale of its own (as llama.cpp quantizes activations for its Q8_0 and
// Q4_0 dot products), so that a group's 32 products are one integer dot product. Asked for with
// QuantizedLinearArgs::int8_activations; quantized_linear sends such calls here.
#pragma once

#include "cpu/quantized_linear.h"

namespace pyserve::cpu {

// How an input row is quantized, and what every back-end must reproduce: per group of 32,
// scale = amax / 127 and q = round-half-even(x * (127 / amax)) (0 for an all-zero group).
void quantize_row_groups(const float* x, long groups, signed char* q, float* scales);

void integer_linear(const QuantizedLinearArgs& args, Isa isa);

}  // namespace pyserve::cpu
